"""The Triton kernel backend: ``cuda-triton`` in ds-kernels-cuda, ``rocm-triton`` in ds-kernels-rocm.

Availability is answered without importing triton (only that it could be imported); the
kernel modules are imported by :meth:`TritonBackend.implementation`, which core calls only
for the backend it runs. Where a native backend offers the same op, core times both on
:meth:`TritonBackend.benchmark_input` and keeps the faster (:mod:`ds.core.kernels.autotune`).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from ds.core.kernels import Availability

KERNELS: dict[str, str] = {
    "rms_norm": "norms",
    "rms_norm_backward": "norms",
    "layer_norm": "norms",
    "layer_norm_backward": "norms",
    "quantize_blockwise": "quantize",
    "dequantize_blockwise": "quantize",
    "woq_matmul": "woq_matmul",
}
"""Each op the Triton kernels implement, and the module (of this package) whose function of the same name runs it."""

_RUNTIMES = {"cuda": "CUDA", "hip": "ROCm/HIP"}


class TritonBackend:
    """Ops run by the Triton kernels of this package on torch's ``cuda`` devices.

    ``runtime`` is the attribute of ``torch.version`` that must be set (``"cuda"`` or
    ``"hip"``), so the CUDA and ROCm packages never both claim one GPU. ``install_hint``
    is the pip command that adds triton.
    """

    def __init__(self, name: str, *, runtime: str, install_hint: str, priority: int = 90) -> None:
        self.name = name
        self.runtime = runtime
        self.install_hint = install_hint
        self.priority = priority

    def ops(self) -> list[str]:
        return list(KERNELS)

    def availability(self, op: str, device_type: str) -> Availability:
        if op not in KERNELS:
            return Availability(False, f"{self.name} has no kernel for {op!r}")
        if device_type != "cuda":
            return Availability(False, f"runs on torch's 'cuda' devices only, not {device_type!r}")
        if getattr(torch.version, self.runtime, None) is None:
            return Availability(False, f"this torch ({torch.__version__}) is not built for {_RUNTIMES[self.runtime]}")
        if importlib.util.find_spec("triton") is None:
            return Availability(False, f"triton is not installed; {self.install_hint}")
        if not torch.cuda.is_available():
            return Availability(False, "torch sees no GPU in this process")
        return Availability(True, "Triton kernel, compiled for this GPU on first use")

    def implementation(self, op: str, device_type: str) -> Callable[..., Any]:
        module = importlib.import_module(f"{__package__}.{KERNELS[op]}")
        return getattr(module, op)  # type: ignore[no-any-return]

    def benchmark_input(self, op: str, device_type: str) -> tuple[Any, ...] | None:
        """Arguments of a typical large call of ``op``, on which core times the competing backends."""
        maker = _BENCHMARK_INPUTS.get(op)
        return None if maker is None else maker(torch.device(device_type, torch.cuda.current_device()))

    def __repr__(self) -> str:
        return f"TritonBackend(name={self.name!r}, runtime={self.runtime!r}, priority={self.priority})"


_ROWS, _HIDDEN = 8192, 4096
"""A micro-batch of 8k tokens of a 4096-wide model: the norms' benchmark shape."""


def _norm_input(device: torch.device, *, backward: bool, bias: bool) -> tuple[Any, ...]:
    x = torch.randn(_ROWS, _HIDDEN, device=device, dtype=torch.bfloat16)
    weight = torch.rand(_HIDDEN, device=device, dtype=torch.bfloat16) + 0.5
    tensors = (x, weight, torch.randn_like(weight)) if bias else (x, weight)
    eps = 1e-5 if bias else 1e-6
    return (torch.randn_like(x), *tensors, eps) if backward else (*tensors, eps)


def _woq_input(device: torch.device) -> tuple[Any, ...]:
    """Batch-1 decoding through a 4096x4096 int4 weight, groups of 128."""
    n = k = 4096
    codes = torch.randint(0, 256, (n, k // 2), device=device, dtype=torch.uint8)
    scales = torch.rand(n, k // 128, device=device) * 0.01
    return torch.randn(1, k, device=device, dtype=torch.bfloat16), codes, scales, None, 4, 128


def _dequantize_input(device: torch.device) -> tuple[Any, ...]:
    numel = 1 << 24
    codes = torch.randint(-127, 128, (numel,), device=device, dtype=torch.int8)
    scales = torch.rand(numel // 128, device=device)
    return codes, scales, scales.new_empty(0), numel, 128, 8, True, torch.bfloat16


_BENCHMARK_INPUTS: dict[str, Callable[[torch.device], tuple[Any, ...]]] = {
    "rms_norm": lambda d: _norm_input(d, backward=False, bias=False),
    "rms_norm_backward": lambda d: _norm_input(d, backward=True, bias=False),
    "layer_norm": lambda d: _norm_input(d, backward=False, bias=True),
    "layer_norm_backward": lambda d: _norm_input(d, backward=True, bias=True),
    "quantize_blockwise": lambda d: (torch.randn(1 << 24, device=d, dtype=torch.bfloat16), 128, 8, True),
    "dequantize_blockwise": _dequantize_input,
    "woq_matmul": _woq_input,
}
