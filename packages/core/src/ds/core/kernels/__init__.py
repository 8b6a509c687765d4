"""ds's named ops and the backends that run them.

Core defines each op once as a ``torch.library`` custom op (``torch.ops.ds.rms_norm``,
...) from a plain-torch reference; kernel packages offer faster implementations through
backends; core picks, per op and device type, the best backend that can run it, and
falls back to the reference. To call an op::

    from ds.core.kernels import ops
    y = ops.rms_norm(x, weight, 1e-6)

To offer a backend from a plugin::

    class FusedNorms:
        name = "my-fused"
        priority = 100                      # higher is tried first

        def ops(self):
            return ["rms_norm", "rms_norm_backward"]

        def availability(self, op, device_type):
            if device_type != "cuda":
                return Availability(False, "CUDA only")
            return Availability(True, "fused CUDA kernel")

        def implementation(self, op, device_type):
            from my_plugin import _native   # loaded only once chosen
            return getattr(_native, op)

    @ds.core.hookimpl
    def ds_register_kernel_backends(register):
        register(FusedNorms())

To declare a new op from a plugin, implement ``ds_define_kernel_ops(define)`` and call
``define(name, reference, mutates_args=(), fake=None, backward=None, saves="inputs")``
(see :func:`ds.core.kernels.registry.define_op`). ``ds report`` shows which backend runs
each op on each device type and why the others do not. Where several kernel backends can
run an op on a GPU, the fastest on this card wins (:mod:`ds.core.kernels.autotune`); add an
optional ``benchmark_input(op, device_type)`` to a backend to say what to time it on.
Importing this package defines core's ops.
"""

from ds.core.kernels import ops
from ds.core.kernels.autotune import MeasurePolicy
from ds.core.kernels.backend import REFERENCE_BACKEND, Availability, KernelBackend, TorchReferenceBackend
from ds.core.kernels.losses import LossInputError, cross_entropy, fused_linear_cross_entropy
from ds.core.kernels.registry import KernelOp, define_op, defined_ops, get_op
from ds.core.kernels.selection import (
    BackendInfo,
    KernelSelection,
    KernelUnavailableError,
    OpChoice,
    Rejection,
    install_kernels,
    installed_kernels,
    local_device_types,
    plan_kernels,
    reset_kernels,
)

__all__ = [
    "REFERENCE_BACKEND",
    "Availability",
    "BackendInfo",
    "KernelBackend",
    "KernelOp",
    "KernelSelection",
    "KernelUnavailableError",
    "MeasurePolicy",
    "LossInputError",
    "OpChoice",
    "Rejection",
    "TorchReferenceBackend",
    "cross_entropy",
    "define_op",
    "defined_ops",
    "fused_linear_cross_entropy",
    "get_op",
    "install_kernels",
    "installed_kernels",
    "local_device_types",
    "ops",
    "plan_kernels",
    "reset_kernels",
]
