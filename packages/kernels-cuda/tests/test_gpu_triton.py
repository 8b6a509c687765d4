"""Every Triton kernel of the cuda-triton backend against a float64 torch computation, on a GPU.

The ops run through ``torch.ops.ds`` with ``cuda-triton`` forced for them (so selection,
dispatch and autograd are exercised too), on fresh random data, odd and non-contiguous
shapes, with the memory the outputs come from poisoned with NaN bytes first, so an element
a kernel forgets to write fails. Relative error ||out - ref|| / ||ref|| bounds per output
dtype: float32 3e-5, float16 2e-3, bfloat16 1.2e-2 (an output rounded to bf16 alone is off
by up to 2**-9); reductions over rows (weight/bias gradients) get twice that.
``DS_TRITON_AUTOTUNE=0`` keeps woq_matmul on one config per path (compiling every config
for every shape would take minutes); one test runs the autotuned kernels.
"""

from __future__ import annotations

import pytest
import torch

from ds.core.kernels import MeasurePolicy, install_kernels, reset_kernels
from ds.core.testing.kernel_checks import poison, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]
triton = pytest.importorskip("triton")

from ds.kernels.cuda import opdefs  # noqa: E402
from ds.kernels.cuda.triton_kernels import opdefs as woq_opdefs  # noqa: E402
from ds.kernels.cuda.triton_kernels.backend import KERNELS  # noqa: E402

BACKEND = "rocm-triton" if torch.version.hip else "cuda-triton"
BOUND = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    """Selection with the Triton backend forced for its ops (the plugins installed: ds-kernels-cuda and/or -rocm)."""
    monkeypatch.setenv("DS_TRITON_AUTOTUNE", "0")
    selection = install_kernels(policy=MeasurePolicy(overrides={op: BACKEND for op in KERNELS}))
    for op in KERNELS:
        assert selection.choice(op, "cuda").backend == BACKEND, selection.choice(op, "cuda")
    yield selection
    reset_kernels()


def randn(*shape: int, dtype: torch.dtype, noncontiguous: bool = False) -> torch.Tensor:
    if noncontiguous:  # every other column of a wider tensor
        return torch.randn(*shape[:-1], shape[-1] * 2, device="cuda", dtype=dtype)[..., ::2]
    return torch.randn(*shape, device="cuda", dtype=dtype)


# (2, 20000): wider than a program holds, so the forward streams it (the backward falls back to torch).
NORM_SHAPES = [(1, 8), (3, 17, 1000), (64, 4096), (7, 5120), (2, 16384), (5, 3001), (33, 8192), (2, 20000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_forward_and_backward(dtype: torch.dtype, shape: tuple[int, ...], kind: str) -> None:
    hidden = shape[-1]
    x = randn(*shape, dtype=dtype, noncontiguous=hidden % 2 == 1).requires_grad_()
    weight = (torch.rand(hidden, device="cuda", dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(hidden, device="cuda", dtype=dtype, requires_grad=True) if kind == "layer" else None
    grad = torch.randn(*shape, device="cuda", dtype=dtype)
    poison()
    if kind == "rms":
        y = torch.ops.ds.rms_norm(x, weight, 1e-6)
        inputs = (x, weight)
    else:
        y = torch.ops.ds.layer_norm(x, weight, bias, 1e-5)
        inputs = (x, weight, bias)
    poison()
    grads = torch.autograd.grad(y, inputs, grad)
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    if kind == "rms":
        ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
        ref_inputs = (x64, w64)
    else:
        b64 = bias.detach().double().requires_grad_()
        ref = torch.nn.functional.layer_norm(x64, (hidden,), w64, b64, 1e-5)
        ref_inputs = (x64, w64, b64)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
    assert y.dtype == dtype and y.is_contiguous() and rel_error(y, ref) < BOUND[dtype]
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and got.dtype == dtype
        assert rel_error(got, want) < BOUND[dtype] * 2


def test_norm_with_float32_weight_on_bf16_input() -> None:
    x = randn(128, 2048, dtype=torch.bfloat16)
    weight = torch.rand(2048, device="cuda") + 0.5
    grad = randn(128, 2048, dtype=torch.bfloat16)
    poison()
    y = torch.ops.ds.rms_norm(x, weight, 1e-6)
    dx, dweight = torch.ops.ds.rms_norm_backward(grad, x, weight, 1e-6)
    from ds.core.kernels import reference

    ref_dx, ref_dweight = reference.rms_norm_backward(grad.double(), x.double(), weight.double(), 1e-6)
    ref = reference.rms_norm(x.double(), weight.double(), 1e-6)
    assert y.dtype == torch.bfloat16 and rel_error(y, ref) < BOUND[torch.bfloat16]
    assert dweight.dtype == torch.float32 and rel_error(dweight, ref_dweight) < 2 * BOUND[torch.bfloat16]
    assert rel_error(dx, ref_dx) < 2 * BOUND[torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (8, False), (4, True), (4, False)])
@pytest.mark.parametrize(("numel", "group"), [(1, 32), (1000, 64), (4097, 128), ((1 << 20) + 3, 256)])
def test_blockwise_quantization(dtype: torch.dtype, bits: int, symmetric: bool, numel: int, group: int) -> None:
    x = (randn(numel + 1, dtype=dtype) * 2 + 0.3)[1:]  # starts one element into its allocation: unaligned
    poison()
    codes, scales, offsets = torch.ops.ds.quantize_blockwise(x, group, bits, symmetric)
    ref_codes, ref_scales, ref_offsets = opdefs.quantize_blockwise(x, group, bits, symmetric)
    assert codes.dtype == ref_codes.dtype and codes.shape == ref_codes.shape
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(offsets, ref_offsets, rtol=0, atol=0)
    # A scale one ulp apart, or the GPU fusing the multiply into the rounding add, can move a
    # value on a rounding tie one code; the round-trip bound below holds for every element.
    assert (codes != ref_codes).float().mean().item() <= 1e-2
    if bits == 8:
        assert (codes.int() - ref_codes.int()).abs().max().item() <= 1
    poison()
    back = torch.ops.ds.dequantize_blockwise(codes, scales, offsets, numel, group, bits, symmetric, dtype)
    ref_back = opdefs.dequantize_blockwise(codes, scales, offsets, numel, group, bits, symmetric, torch.float64)
    assert back.dtype == dtype and rel_error(back, ref_back) < BOUND[dtype]
    step = scales.double().repeat_interleave(group)[:numel]
    rounding = (x.double().abs() + step) * torch.finfo(dtype).eps
    assert torch.all((back.double() - x.double()).abs() <= step / 2 * (1 + 1e-5) + rounding)


WOQ_SHAPES = [(1000, 512, 128), (333, 1024, 32), (4096, 4096, 128), (256, 768, 256)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
@pytest.mark.parametrize("m", [1, 3, 16, 128])
@pytest.mark.parametrize(("n", "k", "group"), WOQ_SHAPES)
def test_woq_matmul(dtype: torch.dtype, bits: int, symmetric: bool, m: int, n: int, k: int, group: int) -> None:
    weight = torch.randn(n, k, device="cuda")
    qweight, scales, offsets = woq_opdefs.quantize_weight(weight, bits, group, symmetric)
    x = randn(m, k, dtype=dtype, noncontiguous=m == 3)
    poison()
    y = torch.ops.ds.woq_matmul(x, qweight, scales, offsets, bits, group)
    ref = woq_opdefs.woq_matmul(x.double(), qweight, scales, offsets, bits, group)
    assert y.dtype == dtype and y.shape == (m, n) and y.is_contiguous()
    assert rel_error(y, ref) < BOUND[dtype]


@pytest.mark.parametrize("m", [1, 128])
def test_woq_matmul_autotuned(monkeypatch, m: int) -> None:
    monkeypatch.setenv("DS_TRITON_AUTOTUNE", "1")
    qweight, scales, offsets = woq_opdefs.quantize_weight(torch.randn(4096, 4096, device="cuda"), 4, 128, False)
    x = randn(m, 4096, dtype=torch.bfloat16)
    poison()
    y = torch.ops.ds.woq_matmul(x, qweight, scales, offsets, 4, 128)
    ref = woq_opdefs.woq_matmul(x.double(), qweight, scales, offsets, 4, 128)
    assert rel_error(y, ref) < BOUND[torch.bfloat16]


def test_timing_picks_a_backend_and_reports_the_times() -> None:
    """With nothing forced, the native and Triton norms are timed against each other (both must be there)."""
    selection = install_kernels(policy=MeasurePolicy())
    choice = selection.choice("rms_norm", "cuda")
    native = BACKEND.replace("triton", "native")
    if any(r.backend == native and r.reason.startswith("unavailable") for r in choice.rejected):
        pytest.skip(f"{native} cannot run here, so there is nothing to time against")
    assert choice.backend in (BACKEND, native)
    assert f"{BACKEND}: " in choice.reason and f"{native}: " in choice.reason
    assert choice.reason.endswith("the benchmark input"), choice.reason
