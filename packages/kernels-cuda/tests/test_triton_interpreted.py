"""The Triton kernels, run on CPU tensors through triton's interpreter, against the torch references.

The interpreter executes the same kernel code a GPU compiles (tile by tile, in numpy), so
indexing, masking, packing and the split-K reduction are checked here; speed and the GPU's
own arithmetic are checked by test_gpu_triton.py. Skipped where triton is not installed,
and on machines with a GPU, which run the compiled kernels instead.
"""

from __future__ import annotations

import os

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("a GPU is present: test_gpu_triton.py runs these kernels compiled", allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton or any kernel module is imported
pytest.importorskip("triton")

from ds.core.kernels import reference as core_reference  # noqa: E402
from ds.kernels.cuda import opdefs  # noqa: E402
from ds.kernels.cuda.triton_kernels import norms, quantize, woq_matmul  # noqa: E402
from ds.kernels.cuda.triton_kernels import opdefs as woq_opdefs  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("installed"),  # defines the plugin's ops, whose references the launchers fall back to
    # numpy's warnings about masked-off lanes (a group's unused tail divides by a zero scale)
    pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning"),
    pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning"),
]

BOUND = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def columns(rows: int, hidden: int, dtype: torch.dtype) -> torch.Tensor:
    """A non-contiguous [rows, hidden] input: every other column of a wider tensor."""
    return torch.randn(rows, 2 * hidden, dtype=dtype)[:, ::2]


@pytest.mark.parametrize(("shape", "dtype"), [((3, 5, 17), torch.float32), ((9, 130), torch.bfloat16),
                                              ((2, 20000), torch.float32), ((4, 33), torch.float16)])
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norms_match_the_float64_reference(shape: tuple[int, ...], dtype: torch.dtype, kind: str) -> None:
    hidden = shape[-1]
    x = columns(int(torch.tensor(shape[:-1]).prod()), hidden, dtype).unflatten(0, shape[:-1])
    weight = torch.rand(hidden, dtype=dtype) + 0.5
    bias = torch.randn(hidden, dtype=dtype) if kind == "layer" else None
    grad = torch.randn(shape, dtype=dtype)
    as64 = [t.double() for t in (grad, x, weight)]
    if kind == "rms":
        got = [norms.rms_norm(x, weight, 1e-6)]
        want = [core_reference.rms_norm(*as64[1:], 1e-6)]
        if hidden <= norms.MAX_FUSED_HIDDEN:
            got += norms.rms_norm_backward(grad, x, weight, 1e-6)
            want += core_reference.rms_norm_backward(*as64, 1e-6)
    else:
        got = [norms.layer_norm(x, weight, bias, 1e-5)]
        want = [core_reference.layer_norm(*as64[1:], bias.double(), 1e-5)]
        if hidden <= norms.MAX_FUSED_HIDDEN:
            got += norms.layer_norm_backward(grad, x, weight, bias, 1e-5)
            want += core_reference.layer_norm_backward(*as64, bias.double(), 1e-5)
    for out, ref in zip(got, want):
        assert out.dtype == dtype and out.shape == ref.shape and out.is_contiguous()
        assert rel_error(out, ref) < BOUND[dtype]


def test_layer_norm_backward_without_bias_returns_a_bias_gradient_in_the_weight_dtype() -> None:
    x, grad = torch.randn(6, 40), torch.randn(6, 40)
    weight = torch.rand(40) + 0.5
    got = norms.layer_norm_backward(grad, x, weight, None, 1e-5)
    want = core_reference.layer_norm_backward(grad.double(), x.double(), weight.double(), None, 1e-5)
    assert [t.dtype for t in got] == [torch.float32] * 3
    assert all(rel_error(a, b) < 1e-6 for a, b in zip(got, want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize(("numel", "group"), [(1, 32), (255, 64), (4097, 256)])
def test_quantizers_reproduce_the_reference_codes(dtype: torch.dtype, bits: int, symmetric: bool, numel: int,
                                                  group: int) -> None:
    x = torch.randn(numel, dtype=dtype) * 2 + 0.3
    codes, scales, offsets = quantize.quantize_blockwise(x, group, bits, symmetric)
    ref_codes, ref_scales, ref_offsets = opdefs.quantize_blockwise(x, group, bits, symmetric)
    assert codes.dtype == ref_codes.dtype and torch.equal(codes, ref_codes)
    assert torch.equal(scales, ref_scales) and torch.equal(offsets, ref_offsets)
    back = quantize.dequantize_blockwise(codes, scales, offsets, numel, group, bits, symmetric, dtype)
    ref_back = opdefs.dequantize_blockwise(codes, scales, offsets, numel, group, bits, symmetric, torch.float64)
    assert back.dtype == dtype and back.shape == (numel,)
    assert rel_error(back, ref_back) < BOUND[dtype]


def test_quantizer_falls_back_to_the_reference_outside_its_cases() -> None:
    x = torch.randn(100, dtype=torch.float64)  # float64 has no kernel
    for got, want in zip(quantize.quantize_blockwise(x, 64, 8, True), opdefs.quantize_blockwise(x, 64, 8, True)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize(("m", "n", "k", "group"), [(1, 40, 64, 32), (3, 17, 256, 128), (16, 33, 128, 64),
                                                     (6, 64, 512, 256)])
def test_woq_matmul_matches_dequantize_then_matmul(dtype: torch.dtype, bits: int, symmetric: bool, m: int, n: int,
                                                  k: int, group: int) -> None:
    """M <= 4 takes the split-K path (split in two under the interpreter), larger M the tiled one."""
    qweight, scales, offsets = woq_opdefs.quantize_weight(torch.randn(n, k), bits, group, symmetric)
    x = columns(m, k, dtype)
    y = woq_matmul.woq_matmul(x, qweight, scales, offsets, bits, group)
    ref = woq_opdefs.woq_matmul(x.double(), qweight, scales, offsets, bits, group)
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_error(y, ref) < BOUND[dtype]


def test_woq_matmul_takes_leading_dimensions_and_flat_quantizer_outputs() -> None:
    weight = torch.randn(24, 128)
    codes, scales, offsets = torch.ops.ds.quantize_blockwise(weight, 64, 4, False)
    x = torch.randn(2, 3, 128)
    y = woq_matmul.woq_matmul(x, codes, scales, offsets, 4, 64)
    assert y.shape == (2, 3, 24)
    assert rel_error(y, woq_opdefs.woq_matmul(x.double(), codes, scales, offsets, 4, 64)) < 1e-6
