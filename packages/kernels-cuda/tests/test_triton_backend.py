"""The cuda-triton backend and ds::woq_matmul as core sees them, on any machine (no triton needed)."""

from __future__ import annotations

import pytest
import torch

from ds.core.kernels import plan_kernels
from ds.kernels.cuda.triton_kernels.backend import _BENCHMARK_INPUTS, KERNELS, TritonBackend
from ds.kernels.cuda.triton_kernels.opdefs import quantize_weight

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def test_plugin_registers_the_triton_backend_and_defines_woq_matmul(components) -> None:
    backend = components.kernel_backends.registration("cuda-triton").value
    assert isinstance(backend, TritonBackend) and backend.runtime == "cuda"
    assert backend.priority < components.kernel_backends.registration("cuda-native").value.priority
    assert "woq_matmul" in components.kernel_ops.names()
    assert set(backend.ops()) == set(KERNELS) == set(_BENCHMARK_INPUTS)


def test_every_listed_kernel_exists_with_the_op_name() -> None:
    pytest.importorskip("triton")
    backend = TritonBackend("t", runtime="cuda", install_hint="")
    for op in KERNELS:
        assert callable(backend.implementation(op, "cuda")) and backend.implementation(op, "cuda").__name__ == op


def test_availability_names_the_reason(components) -> None:
    backend = TritonBackend("t", runtime="cuda", install_hint="pip install it")
    assert backend.availability("rms_norm", "cpu").reason == "runs on torch's 'cuda' devices only, not 'cpu'"
    assert not backend.availability("adam_step", "cuda").available
    rocm = TritonBackend("r", runtime="hip", install_hint="")
    if torch.version.hip is None:
        assert "not built for ROCm/HIP" in rocm.availability("rms_norm", "cuda").reason


@needs_no_cuda
def test_without_a_gpu_every_triton_op_runs_on_the_reference(components) -> None:
    selection = plan_kernels(components, ["cpu", "cuda"])
    for op in KERNELS:
        for device_type in ("cpu", "cuda"):
            choice = selection.choice(op, device_type)
            assert choice.backend == "torch-reference"
            assert {r.backend for r in choice.rejected} >= {"cuda-triton"}


@pytest.mark.parametrize(("bits", "symmetric"), [(4, True), (4, False), (8, True), (8, False)])
def test_woq_matmul_op_is_a_matmul_with_the_dequantized_weight(installed, bits: int, symmetric: bool) -> None:
    weight = torch.randn(48, 256, dtype=torch.float64)
    qweight, scales, offsets = quantize_weight(weight.float(), bits, 64, symmetric)
    assert qweight.shape == (48, 256 * bits // 8) and scales.shape == (48, 4)
    assert (offsets is None) == symmetric
    flat_offsets = scales.new_empty(0) if symmetric else offsets.reshape(-1)
    dequantized = torch.ops.ds.dequantize_blockwise(qweight.reshape(-1), scales.reshape(-1), flat_offsets,
                                                    weight.numel(), 64, bits, symmetric, torch.float64)
    x = torch.randn(5, 256, dtype=torch.float64)
    torch.testing.assert_close(torch.ops.ds.woq_matmul(x, qweight, scales, offsets, bits, 64),
                               x @ dequantized.view(48, 256).t())
    step = scales.double().max().item()
    assert (dequantized.view(48, 256) - weight).abs().max().item() <= step * (0.5 + 1e-3) + 1e-6


def test_woq_matmul_compiles(installed) -> None:
    qweight, scales, _ = quantize_weight(torch.randn(16, 64), 4, 32)
    compiled = torch.compile(lambda x: torch.ops.ds.woq_matmul(x, qweight, scales, None, 4, 32), fullgraph=True)
    x = torch.randn(3, 64)
    torch.testing.assert_close(compiled(x), torch.ops.ds.woq_matmul(x, qweight, scales, None, 4, 32))


@pytest.mark.parametrize(("k", "codes", "message"), [
    (96, 16 * 48, "multiple of group_size 64"),
    (128, 16 * 32, "code bytes"),
])
def test_woq_matmul_rejects_mismatched_inputs_with_the_fix(installed, k: int, codes: int, message: str) -> None:
    scales = torch.rand(16, 2)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.ds.woq_matmul(torch.randn(1, k), torch.zeros(codes, dtype=torch.uint8), scales, None, 4, 64)
