"""The kernel backend core consults: which ops the compiled kernels run, and where.

Shared by ds-kernels-cuda and ds-kernels-rocm (the ROCm package links this file); each
builds a :class:`NativeBackend` around its own :class:`NativeLibrary`. Availability is
answered without importing the extension; the extension is imported by
``implementation()``, which core calls only for the backend it chose, so a broken build
costs one recorded reason and a fallback to the next backend, never an import error.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from ds.core.kernels import Availability

from . import (
    launch_activations,
    launch_adam,
    launch_fp8,
    launch_lamb,
    launch_loss,
    launch_moe,
    launch_norms,
    launch_quantize,
    launch_woq,
)
from ._native import NativeLibrary

LAUNCHERS: dict[str, Callable[..., Any]] = {
    "rms_norm": launch_norms.rms_norm,
    "rms_norm_backward": launch_norms.rms_norm_backward,
    "layer_norm": launch_norms.layer_norm,
    "layer_norm_backward": launch_norms.layer_norm_backward,
    "adam_step": launch_adam.adam_step,
    "lamb_step": launch_lamb.lamb_step,
    "swiglu": launch_activations.swiglu,
    "swiglu_backward": launch_activations.swiglu_backward,
    "bias_gelu": launch_activations.bias_gelu,
    "bias_gelu_backward": launch_activations.bias_gelu_backward,
    "quantize_blockwise": launch_quantize.quantize_blockwise,
    "dequantize_blockwise": launch_quantize.dequantize_blockwise,
    "quantize_fp8": launch_fp8.quantize_fp8,
    "dequantize_fp8": launch_fp8.dequantize_fp8,
    "cross_entropy_fwd_bwd": launch_loss.cross_entropy_fwd_bwd,
    "topk_gating": launch_moe.topk_gating,
    "moe_permute": launch_moe.moe_permute,
    "moe_permute_backward": launch_moe.moe_permute_backward,
    "moe_unpermute": launch_moe.moe_unpermute,
    "moe_unpermute_backward": launch_moe.moe_unpermute_backward,
    "woq_matmul": launch_woq.woq_matmul,
}
"""Each op the compiled kernels implement, and the launcher that runs it."""

REQUIREMENTS: dict[str, Callable[[NativeLibrary], str | None]] = {
    "quantize_fp8": launch_fp8.fp8_problem,
    "dequantize_fp8": launch_fp8.fp8_problem,
}
"""Ops that need more than a working extension (a GPU generation, a platform): why not, or None."""


class NativeBackend:
    """Ops run by a package's compiled ``_C`` extension on torch's ``cuda`` devices."""

    def __init__(self, name: str, library: NativeLibrary, *, priority: int = 100) -> None:
        self.name = name
        self.priority = priority
        self.library = library

    def ops(self) -> list[str]:
        return list(LAUNCHERS)

    def availability(self, op: str, device_type: str) -> Availability:
        if op not in LAUNCHERS:
            return Availability(False, f"{self.name} has no kernel for {op!r}")
        problem = self.library.problem(device_type)
        if problem is None and op in REQUIREMENTS:
            problem = REQUIREMENTS[op](self.library)
        if problem is not None:
            return Availability(False, problem)
        return Availability(True, f"fused kernel from {self.library.module_name}")

    def implementation(self, op: str, device_type: str) -> Callable[..., Any]:
        module = self.library.load()
        return functools.partial(LAUNCHERS[op], module)

    def __repr__(self) -> str:
        return f"NativeBackend(name={self.name!r}, priority={self.priority})"
