"""The process-wide table of ds's named ops, each a ``torch.library`` custom op.

An op is defined once per process under the ``ds`` namespace from its reference
function: the schema is inferred from the reference's type hints, the reference run on
fake tensors is the op's fake implementation (so torch.compile can trace it without
running anything), and a differentiable op gets a second op for its backward, joined to
the first through ``torch.library.register_autograd``. Because the backward is an op of
its own, a kernel backend can supply a fused backward exactly as it supplies a forward.

Until kernels are selected, every device runs a first-call kernel that triggers the
selection (:mod:`ds.core.kernels.selection`) and then the chosen implementation; after
that the dispatcher calls the chosen implementation directly, with no Python in between.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch._library.custom_ops import CustomOpDef

from ds.core.errors import PluginError

NAMESPACE = "ds"
CORE_OWNER = "core"
DEFINE_OPTIONS = frozenset({"mutates_args", "fake", "backward", "saves"})
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

Saves = Literal["inputs", "output"]


@dataclass(frozen=True)
class KernelOp:
    """One named op: its reference, its torch custom op, and how it relates to others.

    ``backward`` names the op that computes this op's gradients; ``forward`` is set on
    that backward op and names the op it differentiates.
    """

    name: str
    reference: Callable[..., Any]
    owner: str
    custom_op: CustomOpDef
    backward: str | None = None
    forward: str | None = None

    @property
    def qualified_name(self) -> str:
        return f"{NAMESPACE}::{self.name}"


_OPS: dict[str, KernelOp] = {}
_LOCK = threading.RLock()


def get_op(name: str) -> KernelOp:
    """The op called ``name``; a clear error lists the defined ops when it is unknown."""
    try:
        return _OPS[name]
    except KeyError:
        raise KeyError(f"no ds kernel op named {name!r}; defined ops: {', '.join(sorted(_OPS))}") from None


def defined_ops() -> list[KernelOp]:
    """Every op defined in this process, in definition order."""
    return list(_OPS.values())


def define_op(
    name: str,
    reference: Callable[..., Any],
    *,
    owner: str = CORE_OWNER,
    mutates_args: Iterable[str] = (),
    fake: Callable[..., Any] | None = None,
    backward: Callable[..., Any] | None = None,
    saves: Saves = "inputs",
) -> KernelOp:
    """Define ``ds::<name>`` (and ``ds::<name>_backward`` when ``backward`` is given).

    ``reference`` must carry type hints torch.library understands (``Tensor``,
    ``Tensor | None``, ``list[Tensor]``, ``int``, ``float``, ``bool``, ...); tensor
    arguments may not be keyword-only. ``mutates_args`` names the arguments the op
    writes in place. ``fake`` replaces the reference as the fake implementation when the
    reference cannot run on fake tensors (data-dependent shapes, ``.item()``).

    ``backward`` is the reference of the backward op, which returns one gradient per
    tensor argument of the forward (a tuple when there are several) and receives the
    gradient of the output followed by, for ``saves="inputs"``, all of the forward's
    arguments, or for ``saves="output"``, the forward's output and then its non-tensor
    arguments. Only ops with a single tensor output can be differentiable this way.

    Defining the same name again with the same reference returns the existing op (each
    plugin set in a process re-declares its ops); another reference is an error.
    """
    with _LOCK:
        existing = _OPS.get(name)
        if existing is not None:
            same_backward = backward is None if existing.backward is None else (
                _OPS[existing.backward].reference is backward
            )
            if existing.reference is reference and same_backward:
                return existing
            raise PluginError(
                f"kernel op {name!r} is already defined by plugin {existing.owner!r} with "
                f"another reference; plugin {owner!r} must choose a different op name"
            )
        mutated = tuple(mutates_args)
        schema = _infer_schema(name, reference, owner, mutated)
        if backward is None:
            op = _define_custom_op(name, reference, owner, schema, mutated, fake)
        else:
            backward_name = f"{name}_backward"
            backward_schema = _infer_schema(backward_name, backward, owner, ())
            _check_backward(name, schema, backward_schema, saves)
            op = _define_custom_op(name, reference, owner, schema, mutated, fake, backward=backward_name)
            backward_op = _define_custom_op(backward_name, backward, owner, backward_schema, (), None, forward=name)
            _attach_autograd(op, backward_op, saves)
        return op


def _infer_schema(name: str, reference: Callable[..., Any], owner: str, mutates_args: tuple[str, ...]) -> str:
    """The op's schema from the reference's type hints, checked before anything is defined."""
    if not _NAME.match(name):
        raise PluginError(
            f"plugin {owner!r}: kernel op name {name!r} is not valid; use lower case letters, "
            "digits and underscores, starting with a letter"
        )
    if name in _OPS:
        raise PluginError(f"plugin {owner!r}: kernel op {name!r} is already defined by plugin {_OPS[name].owner!r}")
    try:
        schema = torch.library.infer_schema(reference, mutates_args=mutates_args)
        torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}")
    except (ValueError, RuntimeError, TypeError) as exc:
        raise PluginError(
            f"plugin {owner!r}: kernel op {name!r} cannot be defined from {reference.__qualname__}: "
            f"{exc}. Give its reference torch.library-compatible type hints."
        ) from exc
    return schema


def _parsed(name: str, schema: str) -> Any:
    return torch._C.parse_schema(f"{NAMESPACE}::{name}{schema}")


def _tensor_positions(schema: Any) -> list[int]:
    optional_tensor = torch.OptionalType(torch.TensorType.get())
    return [i for i, arg in enumerate(schema.arguments) if arg.type.isSubtypeOf(optional_tensor)]


def _check_backward(name: str, schema: str, backward_schema: str, saves: str) -> None:
    forward = _parsed(name, schema)
    if saves not in ("inputs", "output"):
        raise PluginError(f"kernel op {name!r}: saves must be 'inputs' or 'output', got {saves!r}")
    if len(forward.returns) != 1 or str(forward.returns[0].type) != "Tensor":
        raise PluginError(f"kernel op {name!r}: only ops returning one Tensor can be given a backward")
    tensors = len(_tensor_positions(forward))
    returns = len(_parsed(f"{name}_backward", backward_schema).returns)
    if returns != tensors:
        raise PluginError(
            f"kernel op {name!r} has {tensors} tensor arguments but its backward returns {returns} "
            "values; return one gradient per tensor argument"
        )


def _define_custom_op(
    name: str,
    reference: Callable[..., Any],
    owner: str,
    schema: str,
    mutates_args: tuple[str, ...],
    fake: Callable[..., Any] | None,
    *,
    forward: str | None = None,
    backward: str | None = None,
) -> KernelOp:
    custom_op = torch.library.custom_op(f"{NAMESPACE}::{name}", reference, mutates_args=mutates_args, schema=schema)
    custom_op.register_fake(fake or reference)
    custom_op.register_kernel(None, _first_call_kernel(name))
    op = KernelOp(name, reference, owner, custom_op, backward=backward, forward=forward)
    _OPS[name] = op
    return op


def _first_call_kernel(name: str) -> Callable[..., Any]:
    """A kernel that selects the implementations for the calling device, then runs one."""

    def first_call(*args: Any, **kwargs: Any) -> Any:
        from ds.core.kernels.selection import implementation_for

        return implementation_for(name, _device_type(args, kwargs))(*args, **kwargs)

    first_call.__qualname__ = f"select_then_run_{name}"
    return first_call


def reset_to_first_call(op: KernelOp, device_types: Iterable[str]) -> None:
    """Route ``device_types`` back through selection (used when selection is redone)."""
    kernel = _first_call_kernel(op.name)
    for device_type in device_types:
        op.custom_op.register_kernel(device_type, kernel)


def _device_type(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    for value in (*args, *kwargs.values()):
        candidates = value if isinstance(value, (list, tuple)) else (value,)
        for candidate in candidates:
            if isinstance(candidate, torch.Tensor):
                return candidate.device.type
    raise TypeError("a ds kernel op was called without any tensor argument")


def _attach_autograd(op: KernelOp, backward_op: KernelOp, saves: Saves) -> None:
    """Make ``op`` differentiable through ``backward_op`` (checked by :func:`_check_backward`)."""
    schema = op.custom_op._opoverload._schema
    positional_count = sum(1 for arg in schema.arguments if not arg.kwarg_only)
    tensor_positions = _tensor_positions(schema)  # tensors are never keyword-only
    backward_call = getattr(torch.ops.ds, backward_op.name).default

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor,
                      keyword_only_inputs: dict[str, Any] | None = None) -> None:
        ctx.save_for_backward(*([output] if saves == "output" else [inputs[i] for i in tensor_positions]))
        ctx.non_tensors = {i: v for i, v in enumerate(inputs) if i not in tensor_positions}
        ctx.keywords = dict(keyword_only_inputs or {})
        ctx.absent = {i for i in tensor_positions if inputs[i] is None}

    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        values = dict(ctx.non_tensors)
        if saves == "output":
            leading = [grad_output, saved[0]]
        else:
            leading = [grad_output]
            values.update(zip(tensor_positions, saved))
        grads = backward_call(*leading, *(values[i] for i in sorted(values)), **ctx.keywords)
        grads = grads if isinstance(grads, tuple) else (grads,)
        result: list[torch.Tensor | None] = [None] * positional_count
        for position, grad in zip(tensor_positions, grads):
            result[position] = None if position in ctx.absent else grad
        return tuple(result)

    op.custom_op.register_autograd(backward, setup_context=setup_context)
