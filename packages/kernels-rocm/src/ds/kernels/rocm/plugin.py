"""ds-kernels-rocm as a ds plugin: the fused kernels on AMD GPUs through PyTorch's ROCm build.

Its entry point ``kernels-rocm`` registers the backend ``rocm-native`` (priority 100) for
``rms_norm``, ``layer_norm`` (forward and backward), ``adam_step`` and, when they are
defined, the ops ds-kernels-cuda adds (``swiglu``, ``bias_gelu``, the quantizers; their
definitions live in that package until core adopts them, so this plugin does not declare
them twice). On a machine without ROCm each op reports "not built for HIP" and runs on the
next backend.
It also registers ``rocm-triton`` (priority 90, needs triton): ds-kernels-cuda's Triton
kernels (a linked folder) for the norms, the quantizers and ``woq_matmul``; core times it
against ``rocm-native`` where both run an op and keeps the faster.
"""

from __future__ import annotations

from collections.abc import Callable

from ds.core import hookimpl

from ._native import NativeLibrary
from .backend import NativeBackend
from .triton_kernels.backend import TritonBackend

BACKEND_NAME = "rocm-native"

LIBRARY = NativeLibrary(
    package="ds.kernels.rocm",
    runtime="hip",
    build_hint=(
        "reinstall ds-kernels-rocm from a wheel built with ROCm, or build it with "
        "`pip install packages/kernels-rocm` where ROCm's clang is installed "
        "(DS_HIP_ARCHS=<gfx target> for a single-architecture build)"
    ),
)


@hookimpl
def ds_register_kernel_backends(register: Callable[..., None]) -> None:
    register(NativeBackend(BACKEND_NAME, LIBRARY))
    register(TritonBackend("rocm-triton", runtime="hip", install_hint="pip install 'ds-kernels-rocm[triton]'"))


@hookimpl
def ds_report_lines() -> list[str]:
    return [LIBRARY.report_line()]
