"""What a kernel backend is, and core's torch reference backend.

A backend is any object with the attributes of :class:`KernelBackend`; kernel packages
register one through the hook ``ds_register_kernel_backends``. Core asks each backend,
once per op and device type, whether it can run the op there; the answer carries a
reason so ``ds report`` can say why an op runs where it does. Answering must be cheap:
check that the device type matches and that the extension *file* exists, and defer
loading the extension to :meth:`KernelBackend.implementation`, which is called only for
the backend that is chosen. Either method may raise; core then reports the backend
unavailable for that op with the error and moves on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ds.core.kernels.registry import defined_ops, get_op

REFERENCE_BACKEND = "torch-reference"


@dataclass(frozen=True)
class Availability:
    """Whether a backend can run an op on a device type, and why (not)."""

    available: bool
    reason: str = ""


@runtime_checkable
class KernelBackend(Protocol):
    """A named source of op implementations.

    ``priority``: higher is tried first; core's reference is always tried last.
    ``ops()``: the op names (``"rms_norm"``, ``"rms_norm_backward"``, ...) it implements.
    ``implementation(op, device_type)`` returns a callable with the same signature and
    semantics as the op's reference; outputs must be new, contiguous tensors (a compiled
    graph checks their strides against the reference's).
    """

    name: str
    priority: int

    def ops(self) -> Iterable[str]: ...

    def availability(self, op: str, device_type: str) -> Availability: ...

    def implementation(self, op: str, device_type: str) -> Callable[..., Any]: ...


class TorchReferenceBackend:
    """Every defined op, on every device, in plain torch: the fallback that always exists."""

    name = REFERENCE_BACKEND
    priority = 0

    def ops(self) -> list[str]:
        return [op.name for op in defined_ops()]

    def availability(self, op: str, device_type: str) -> Availability:
        return Availability(True, "plain torch reference, runs on every device")

    def implementation(self, op: str, device_type: str) -> Callable[..., Any]:
        return get_op(op).reference

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
