"""The CUDA decode kernels of ``ds::woq_matmul`` (1-4 rows of x) against float64, on a GPU.

Relative error ``||out - ref|| / ||ref||`` against the op's reference run in float64 on the
same quantized weight; bounds per output dtype as in test_gpu_kernels.py: float32 3e-5,
float16 2e-3, bfloat16 1.2e-2. Memory is poisoned with NaN bytes before each call, so an
output element a kernel skips fails. The shapes reach both designs: the SIMT one (one row of
int8 codes, float32 x, groups smaller than an mma k-block) and the tensor-core one (bf16/fp16
x: 2-4 rows, or one row of int4 codes, whose 16, 8 or 4 warps a tile depend on N), with N not a
multiple of either's rows per block and K shorter than a block's warps.
"""

from __future__ import annotations

import pytest
import torch

from ds.core.kernels import MeasurePolicy, install_kernels, reset_kernels
from ds.core.testing.kernel_checks import poison, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.version.hip is not None, reason="needs a CUDA GPU"),
]

from ds.kernels.cuda import launch_woq  # noqa: E402
from ds.kernels.cuda.triton_kernels import opdefs as woq_opdefs  # noqa: E402

BOUND = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = [(4, True), (4, False), (8, True), (8, False)]

# (K, N, group): decoder projections (N = 4100 and 37 leave partial blocks of 8 and 16 rows),
# K = 384 has 3 mma k-blocks for 8 warps, groups 32/64 send int4 (and 32 int8) to the SIMT design.
# One row of int4 takes 16 warps a tile up to N = 4224 on an H100 (132 multiprocessors), 8 up to
# 8448 (N = 6001, 8 k-blocks) and 4 beyond (N = 9000, 5 k-blocks for 4 warps).
SHAPES = [(4096, 4096, 128), (4096, 4100, 128), (11008, 4096, 128), (384, 37, 128), (384, 37, 32),
          (768, 1001, 64), (2048, 333, 256), (1024, 6001, 128), (640, 9000, 128)]


@pytest.fixture(autouse=True)
def native_woq(components, monkeypatch):
    """Pin woq_matmul to the CUDA kernels, whatever core's timing would pick on this card.

    Triton (the hand-on for larger batches, and the timing test's contender) runs one config
    per path instead of compiling every autotuning config for every shape.
    """
    monkeypatch.setenv("DS_TRITON_AUTOTUNE", "0")
    installed = install_kernels(components, policy=MeasurePolicy(overrides={"woq_matmul": "cuda-native"}))
    assert installed.choice("woq_matmul", "cuda").backend == "cuda-native", installed.choice("woq_matmul", "cuda")
    yield installed
    reset_kernels()


def x_of(rows: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """``rows`` rows of x: 3 rows as a strided view, 4 as a [2, 2, K] batch, else plain."""
    if rows == 3:
        return torch.randn(rows, 2 * k, device="cuda", dtype=dtype)[:, ::2]
    if rows == 4:
        return torch.randn(2, 2, k, device="cuda", dtype=dtype)
    return torch.randn(rows, k, device="cuda", dtype=dtype)


def check(x: torch.Tensor, n: int, k: int, group: int, bits: int, symmetric: bool, *, native: bool) -> None:
    """The op against float64; ``native``: whether the CUDA kernels (not the hand-on) must run it."""
    weight = torch.randn(n, k, device="cuda")
    qweight, scales, offsets = woq_opdefs.quantize_weight(weight, bits, group, symmetric)
    assert launch_woq.covers(x, qweight, scales, offsets, bits, group) == native
    poison()
    y = torch.ops.ds.woq_matmul(x, qweight, scales, offsets, bits, group)
    ref = woq_opdefs.woq_matmul(x.double(), qweight, scales, offsets, bits, group)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], n) and y.is_contiguous()
    assert rel_error(y, ref) < BOUND[x.dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "symmetric"), MODES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize(("k", "n", "group"), SHAPES)
def test_decode_rows_match_float64(dtype: torch.dtype, bits: int, symmetric: bool, rows: int, k: int, n: int,
                                   group: int) -> None:
    check(x_of(rows, k, dtype), n, k, group, bits, symmetric, native=True)


def test_a_vector_x_gives_a_vector() -> None:
    check(torch.randn(4096, device="cuda", dtype=torch.bfloat16), 4100, 4096, 128, 4, True, native=True)


@pytest.mark.parametrize("rows", [5, 64])
@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (8, False)])
def test_larger_batches_are_handed_on(rows: int, bits: int, symmetric: bool) -> None:
    """More than 4 rows run on Triton's kernel (or the reference without triton), still correct."""
    check(torch.randn(rows, 1024, device="cuda", dtype=torch.bfloat16), 515, 1024, 128, bits, symmetric, native=False)


def test_empty_x_gives_an_empty_result() -> None:
    qweight, scales, _ = woq_opdefs.quantize_weight(torch.randn(64, 256, device="cuda"), 4, 128, True)
    y = torch.ops.ds.woq_matmul(torch.empty(0, 256, device="cuda", dtype=torch.bfloat16), qweight, scales, None, 4, 128)
    assert y.shape == (0, 64)


def test_the_extension_refuses_what_the_launcher_hands_on() -> None:
    from ds.kernels.cuda.plugin import LIBRARY

    ext = LIBRARY.load()
    assert ext.WOQ_MAX_ROWS == launch_woq.MAX_ROWS
    x = torch.randn(5, 256, device="cuda", dtype=torch.bfloat16)
    codes = torch.zeros(8, 128, dtype=torch.uint8, device="cuda")
    scales = torch.ones(8, 2, device="cuda")
    y = torch.empty(5, 8, device="cuda", dtype=torch.bfloat16)
    stream = torch.cuda.current_stream().cuda_stream
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        ext.woq_matmul(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), 0, y.data_ptr(), 5, 8, 256, 128, 4, True, 2,
                       stream)
    with pytest.raises(RuntimeError, match="group_size"):
        ext.woq_matmul(x.data_ptr(), codes.data_ptr(), scales.data_ptr(), 0, y.data_ptr(), 1, 8, 256, 96, 4, True, 2,
                       stream)


def test_timing_compares_the_native_and_triton_kernels(components) -> None:
    """Unpinned, core times both backends on the decoding input and keeps the faster one."""
    pytest.importorskip("triton")
    selection = install_kernels(components, policy=MeasurePolicy())
    choice = selection.choice("woq_matmul", "cuda")
    assert choice.backend in ("cuda-native", "cuda-triton"), choice
    assert "cuda-native: " in choice.reason and "cuda-triton: " in choice.reason, choice.reason
