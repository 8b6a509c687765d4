"""ds-kernels-cuda as a ds plugin: fused CUDA kernels that core picks up at run time.

Installing the package is all it takes: its entry point ``kernels-cuda`` in the group
``ds.plugins`` registers

* the backend ``cuda-native`` (priority 100) for ``rms_norm``, ``layer_norm`` (forward and
  backward), ``adam_step``, ``swiglu``, ``bias_gelu``, the block-wise quantizers and
  ``cross_entropy_fwd_bwd`` (behind core's ``cross_entropy`` and ``fused_linear_cross_entropy``);
* the ops ``swiglu``, ``bias_gelu``, ``quantize_blockwise``, ``dequantize_blockwise``,
  ``quantize_fp8`` and ``dequantize_fp8`` (:mod:`ds.kernels.cuda.opdefs_fp8`)
  with their torch references (:mod:`ds.kernels.cuda.opdefs`), so they fall back to torch
  wherever the kernels cannot run;
* the backend ``cuda-triton`` (priority 90, needs triton) for the norms, the block-wise
  quantizers and ``woq_matmul``, the weight-only int8/int4 matmul it defines
  (:mod:`ds.kernels.cuda.triton_kernels`); where both backends run an op, core times them
  and keeps the faster;
* the mixture-of-experts routing ops ``topk_gating``, ``moe_permute`` and ``moe_unpermute``
  (:mod:`ds.kernels.cuda.opdefs_moe`), likewise.

Nothing here imports the compiled extension: ``ds report`` and the CPU tests work on any
machine, and a GPU without a matching build gets the reason instead of an error::

    from ds.core.kernels import install_kernels
    selection = install_kernels()
    print(selection.choice("rms_norm", "cuda").reason)
"""

from __future__ import annotations

from collections.abc import Callable

from ds.core import hookimpl

from ._native import NativeLibrary
from .backend import NativeBackend
from .opdefs import define_ops
from .opdefs_fp8 import define_fp8_ops
from .opdefs_moe import define_ops as define_moe_ops
from .triton_kernels.backend import TritonBackend
from .triton_kernels.opdefs import define_ops as define_woq_ops

BACKEND_NAME = "cuda-native"

LIBRARY = NativeLibrary(
    package="ds.kernels.cuda",
    runtime="cuda",
    build_hint=(
        "reinstall ds-kernels-cuda from a wheel built with CUDA, or build it with "
        "`pip install packages/kernels-cuda` on a machine with nvcc (DS_CUDA_ARCHS=<arch> "
        "for a faster single-architecture build)"
    ),
)


@hookimpl
def ds_define_kernel_ops(define: Callable[..., None]) -> None:
    define_ops(define)
    define_fp8_ops(define)
    define_moe_ops(define)
    define_woq_ops(define)


@hookimpl
def ds_register_kernel_backends(register: Callable[..., None]) -> None:
    register(NativeBackend(BACKEND_NAME, LIBRARY))
    register(TritonBackend("cuda-triton", runtime="cuda", install_hint="pip install 'ds-kernels-cuda[triton]'"))


@hookimpl
def ds_report_lines() -> list[str]:
    return [LIBRARY.report_line()]
