"""Resolving ``"auto"`` values, as Hugging Face's Trainer writes them.

Any field of a section model accepts ``"auto"`` (any letter case). The loader resolves
it before validation, from an :class:`AutoContext` built from the world size and the
model:

* a field annotated with :class:`AutoResolve` gets ``resolve(context)``; for example
  core's ``gradient_clipping: Annotated[float, AutoResolve(lambda ctx: 1.0)] = 0.0``,
  or a ZeRO section's ``reduce_bucket_size: Annotated[int, AutoResolve(lambda ctx:
  ctx.hidden_size**2 if ctx.hidden_size else 500_000_000)] = 500_000_000``;
* any other field with a default takes its default (``"auto"`` means "you choose");
* a required field without a resolver stays ``"auto"`` and fails validation with a
  message that asks for a value.

A resolver that cannot decide raises ``ValueError`` with the reason; the loader turns
it into a :class:`~ds.core.errors.ConfigError` naming the key. Plugins need nothing else:
their section models use the same marker, and ``load_config`` walks their sections too.

Core's ``"auto"`` rules (the Trainer's semantics where ds has the same information):

====================================  ==============================================
``train_batch_size`` & co.            batch arithmetic (:mod:`ds.core.config.batch`)
``gradient_clipping``                 1.0 (the Trainer's ``max_grad_norm`` default)
``fp16.enabled`` / ``bf16.enabled``   true when the model's weights already are in
                                      that dtype, else false
``optimizer.params.*``                removed, so the optimizer's own default applies
``scheduler.params.warmup_min_lr``    0
``scheduler.params.warmup_max_lr``,   the optimizer's ``lr`` when the config sets
``cycle_max_lr``,                     one, else the scheduler's default
``lr_range_test_min_lr``
``scheduler.params.total_num_steps``  ``total_num_steps`` given to ``load_config``
                                      (an error when unknown)
other scheduler params, other keys    the default
====================================  ==============================================
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from ds.core.config.base import Visitor, field_for_key, join_path
from ds.core.errors import ConfigError

if TYPE_CHECKING:
    from torch import nn

AUTO = "auto"

_DTYPE_NAMES = {"torch.float32": "fp32", "torch.float16": "fp16", "torch.bfloat16": "bf16"}


def is_auto(value: object) -> bool:
    """Whether a config value is the ``"auto"`` placeholder."""
    return isinstance(value, str) and value.strip().lower() == AUTO


@dataclass(frozen=True)
class AutoContext:
    """What ``"auto"`` values are resolved from.

    ``hidden_size``, ``num_parameters`` and ``param_dtype`` (``"fp32"``, ``"fp16"`` or
    ``"bf16"``) are None when no model was given; ``learning_rate`` is the optimizer's
    ``lr`` when the config sets a number; ``total_num_steps`` is the run's number of
    optimizer steps when the caller knows it.
    """

    world_size: int = 1
    dp_world_size: int = 1
    hidden_size: int | None = None
    num_parameters: int | None = None
    param_dtype: str | None = None
    learning_rate: float | None = None
    total_num_steps: int | None = None

    @classmethod
    def from_model(
        cls,
        model: nn.Module | None,
        *,
        world_size: int = 1,
        dp_world_size: int | None = None,
        total_num_steps: int | None = None,
    ) -> AutoContext:
        """Read hidden size, parameter count and weight dtype from a model.

        The hidden size is the Hugging Face ``model.config.hidden_size`` when present
        (or the largest of ``hidden_sizes``); otherwise it is inferred from the weights.
        """
        context = cls(world_size, dp_world_size or world_size, total_num_steps=total_num_steps)
        if model is None:
            return context
        params = list(model.parameters())
        dtypes = Counter(_DTYPE_NAMES.get(str(p.dtype)) for p in params if p.is_floating_point())
        return cls(
            world_size=context.world_size,
            dp_world_size=context.dp_world_size,
            hidden_size=hf_hidden_size(model) or infer_hidden_size(params),
            num_parameters=sum(p.numel() for p in params),
            param_dtype=dtypes.most_common(1)[0][0] if dtypes else None,
            total_num_steps=total_num_steps,
        )


def hf_hidden_size(model: object) -> int | None:
    """``model.config.hidden_size`` (or max of ``hidden_sizes``) of a Hugging Face model."""
    hf_config = getattr(model, "config", None)
    size = getattr(hf_config, "hidden_size", None)
    if isinstance(size, int) and size > 0:
        return size
    sizes = getattr(hf_config, "hidden_sizes", None)
    if isinstance(sizes, (list, tuple)) and sizes and all(isinstance(s, int) for s in sizes):
        return int(max(sizes))
    return None


def infer_hidden_size(params: list[Any]) -> int | None:
    """The dimension that weight matrices share most often.

    In a transformer every projection has the hidden size on one side (four square
    attention matrices, both MLP matrices, the embedding), so it is the most common
    dimension; ties go to the larger one. Models without matrices have no hidden size.
    """
    dims = Counter(size for p in params if p.dim() >= 2 for size in p.shape)
    if not dims:
        return None
    return int(max(dims, key=lambda size: (dims[size], size)))


@dataclass(frozen=True)
class AutoResolve:
    """Field metadata: how ``"auto"`` resolves for this field.

    ``resolve(context)`` returns the value, or raises ``ValueError`` saying why it
    cannot (the loader reports it with the key path).
    """

    resolve: Callable[[AutoContext], Any]


def auto_resolver(context: AutoContext) -> Visitor:
    """A :func:`~ds.core.config.base.walk_models` visitor that resolves ``"auto"``."""

    def visit(model: type[BaseModel], data: dict[str, Any], path: str) -> dict[str, Any]:
        resolved: dict[str, Any] = {}
        for key, value in data.items():
            field = field_for_key(model, key)
            if field is None or not is_auto(value):
                resolved[key] = value
                continue
            marker = next((m for m in field.metadata if isinstance(m, AutoResolve)), None)
            if marker is not None:
                try:
                    resolved[key] = marker.resolve(context)
                except ValueError as exc:
                    raise ConfigError(f"'{join_path(path, key)}' is \"auto\", but {exc}") from None
            elif field.is_required():
                resolved[key] = value  # validation reports it, asking for a value
        return resolved

    return visit


def drop_auto_values(params: dict[str, Any]) -> dict[str, Any]:
    """Remove ``"auto"`` entries so the component's own defaults apply."""
    return {key: value for key, value in params.items() if not is_auto(value)}


def optimizer_learning_rate(data: dict[str, Any]) -> float | None:
    """The ``optimizer.params.lr`` a config sets, when it is a number."""
    optimizer = data.get("optimizer")
    params = optimizer.get("params") if isinstance(optimizer, dict) else None
    lr = params.get("lr") if isinstance(params, dict) else None
    if isinstance(lr, (int, float)) and not isinstance(lr, bool):
        return float(lr)
    return None
