"""torch's optimizers and LAMB under DeepSpeed's config names, and building one from a config.

A DeepSpeed config names an optimizer and its keyword arguments::

    "optimizer": {"type": "Adam", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}}

Core registers ``Adam``, ``AdamW``, ``Lamb``, ``SGD``, ``Adagrad`` and ``RMSprop`` through
the ``ds_register_optimizers`` hook; pillars add theirs (ds-zero: CPU Adam, ds-kernels-cuda:
the 1-bit optimizers). Names compare case-insensitively.

DeepSpeed's Adam differs from ``torch.optim.Adam`` in ways that change training results,
and ds keeps DeepSpeed's meaning so existing configs train the same:

* ``"type": "Adam"`` decouples weight decay (AdamW) unless ``adam_w_mode`` is false;
* ``bias_correction: false`` turns Adam's bias correction off (BERT-style recipes rely on it);
* ``torch_adam: false`` (the default) asks for a fused kernel: when every parameter is on
  CUDA, :class:`~ds.core.optimizer_classes.FusedAdam` steps them all through
  ``torch.ops.ds.adam_step`` (ds-kernels-cuda's multi-tensor kernel where installed, the op's
  torch reference elsewhere); ``true``, ``amsgrad`` or CPU parameters (ZeRO-Offload's masters,
  which ds-zero hands to CPU Adam) get torch's implementation, the same arithmetic.

``Lamb`` is :class:`~ds.core.optimizer_classes.FusedLamb` on every device, through
``torch.ops.ds.lamb_step``.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from difflib import get_close_matches
from typing import TYPE_CHECKING, Annotated, Any, Protocol, TypeVar

import torch
from pydantic import ConfigDict, SkipValidation, ValidationError, validate_call
from torch.optim import Optimizer

from ds.core.errors import ConfigError, MissingPillarError, PluginError
from ds.core.optimizer_classes import AdamWithoutBiasCorrection, FusedAdam, FusedLamb
from ds.core.state_names import local

if TYPE_CHECKING:
    from ds.core.plugins import Registry

F = TypeVar("F", bound=Callable[..., Any])

_VALIDATION = ConfigDict(arbitrary_types_allowed=True)

Params = Annotated[Iterable[Any], SkipValidation]
"""What a torch optimizer accepts: tensors or param-group dicts (passed through unvalidated)."""

PILLAR_OPTIMIZERS: dict[str, tuple[str, str]] = {
    "onebitadam": ("ds-kernels-cuda", "cuda"),
    "onebitlamb": ("ds-kernels-cuda", "cuda"),
    "zerooneadam": ("ds-kernels-cuda", "cuda"),
    "cpuadam": ("ds-zero", "zero"),
    "deepspeedcpuadam": ("ds-zero", "zero"),
}
"""DeepSpeed optimizer types that another ds distribution provides: (distribution, extra)."""


# -------------------------------------------------------------------------------------
# parameter validation shared by optimizer factories and schedulers
# -------------------------------------------------------------------------------------


def validated_params(description: str) -> Callable[[F], F]:
    """Make a factory reject unknown keyword names and ill-typed values with ConfigError.

    Parameters come from JSON written by people: a typo such as ``"weight_decy"`` must
    fail with the closest valid name instead of silently training with a default, and
    ``"betas": [0.9, 0.95]`` (JSON has no tuples) must be accepted where a pair is meant.
    Only keyword-only parameters are config parameters; positional ones (the params or
    the optimizer) are passed by code. ``ValueError`` raised by the wrapped call (torch's
    own range checks) becomes a ConfigError too, prefixed with ``description``.
    """

    def decorate(func: F) -> F:
        names = {p.name for p in inspect.signature(func).parameters.values() if p.kind is p.KEYWORD_ONLY}
        checked = validate_call(config=_VALIDATION)(func)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            unknown = sorted(set(kwargs) - names)
            if unknown:
                raise ConfigError(unknown_key_message(description, unknown[0], names))
            try:
                return checked(*args, **kwargs)
            except ValidationError as exc:
                raise ConfigError(_invalid_message(description, exc)) from None
            except ConfigError:
                raise
            except ValueError as exc:
                raise ConfigError(f"{description}: {exc}") from exc

        return wrapper  # type: ignore[return-value]

    return decorate


def unknown_key_message(description: str, key: str, valid: Iterable[str]) -> str:
    """``description: unknown parameter 'x'. Did you mean 'y'? Valid parameters: ...``."""
    valid = sorted(valid)
    close = get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"{description}: unknown parameter {key!r}.{hint} Valid parameters: {', '.join(valid)}."


def _invalid_message(description: str, exc: ValidationError) -> str:
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"])
        if error["type"].startswith("missing"):
            problems.append(f"parameter {where!r} is required")
        else:
            problems.append(f"parameter {where!r}: {error['msg']} (got {error.get('input')!r})")
    return f"{description}: " + "; ".join(problems) + "."


# -------------------------------------------------------------------------------------
# factories, under DeepSpeed's names
# -------------------------------------------------------------------------------------


def _materialize(params: Iterable[Any]) -> list[Any]:
    """Params as a list (of tensors or of groups with list params), safe to iterate twice."""
    items = list(params)
    return [dict(item, params=_as_list(item["params"])) if isinstance(item, dict) else item for item in items]


def _as_list(params: Any) -> list[Any]:
    return [params] if isinstance(params, torch.Tensor) else list(params)


def _all_on_cuda(params: list[Any]) -> bool:
    """Whether every parameter's data is on a CUDA device; a DTensor reports its mesh's device,
    so its local shard is asked instead (FSDP2's CPU offload keeps CUDA-mesh shards on the host)."""
    tensors = [local(t) for item in params for t in (item["params"] if isinstance(item, dict) else [item])]
    return bool(tensors) and all(t.is_cuda and t.is_floating_point() for t in tensors)


def _adam(
    params: Iterable[Any],
    *,
    decoupled: bool,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    bias_correction: bool,
    torch_adam: bool,
) -> Optimizer:
    params = _materialize(params)
    if not torch_adam and not amsgrad and _all_on_cuda(params):
        return FusedAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                         bias_correction=bias_correction, decoupled_weight_decay=decoupled)
    if not bias_correction:
        return AdamWithoutBiasCorrection(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                         amsgrad=amsgrad, decoupled_weight_decay=decoupled)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


@validated_params("optimizer 'Adam'")
def make_adam(
    params: Params,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    bias_correction: bool = True,
    adam_w_mode: bool = True,
    torch_adam: bool = False,
) -> Optimizer:
    """DeepSpeed's ``Adam``: AdamW unless ``adam_w_mode`` is false (then L2-regularised Adam)."""
    return _adam(params, decoupled=adam_w_mode, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                 amsgrad=amsgrad, bias_correction=bias_correction, torch_adam=torch_adam)


@validated_params("optimizer 'AdamW'")
def make_adamw(
    params: Params,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    bias_correction: bool = True,
    adam_w_mode: bool = True,
    torch_adam: bool = False,
) -> Optimizer:
    """DeepSpeed's ``AdamW``: always decoupled weight decay.

    DeepSpeed ignores ``adam_w_mode: false`` for AdamW; ds refuses it instead, because the
    config then says two contradicting things about weight decay.
    """
    if not adam_w_mode:
        raise ConfigError(
            "optimizer 'AdamW': adam_w_mode false contradicts AdamW, which always decouples weight "
            "decay. Use \"type\": \"Adam\" with adam_w_mode false for L2-regularised Adam, or drop "
            "adam_w_mode."
        )
    return _adam(params, decoupled=True, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                 amsgrad=amsgrad, bias_correction=bias_correction, torch_adam=torch_adam)


@validated_params("optimizer 'Lamb'")
def make_lamb(
    params: Params,
    *,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    bias_correction: bool = True,
    max_coeff: float = 10.0,
    min_coeff: float = 0.01,
    eps_inside_sqrt: bool = False,
    max_grad_norm: float = 0.0,
    amsgrad: bool = False,
) -> Optimizer:
    """DeepSpeed's ``Lamb`` (FusedLamb): per-tensor trust ratio ``||w|| / ||update||`` in ``[min_coeff, max_coeff]``.

    DeepSpeed accepts ``max_grad_norm`` but its engine never passes the norms it would
    clip by, so the option does nothing there; ds refuses a positive value rather than
    pretend, and points at the engine's clipping. ``amsgrad`` is refused as in DeepSpeed.
    """
    if max_grad_norm > 0:
        raise ConfigError(
            "optimizer 'Lamb': max_grad_norm is not applied by the optimizer (DeepSpeed ignores it too); "
            "set the top-level \"gradient_clipping\" instead and drop max_grad_norm."
        )
    if amsgrad:
        raise ConfigError("optimizer 'Lamb': LAMB has no AMSGrad variant; drop amsgrad or use \"type\": \"Adam\".")
    return FusedLamb(_materialize(params), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                     bias_correction=bias_correction, max_coeff=max_coeff, min_coeff=min_coeff,
                     eps_inside_sqrt=eps_inside_sqrt)


@validated_params("optimizer 'SGD'")
def make_sgd(
    params: Params,
    *,
    lr: float = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> Optimizer:
    """torch's SGD; nesterov needs momentum > 0 and dampening 0."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, dampening=dampening,
                           weight_decay=weight_decay, nesterov=nesterov)


@validated_params("optimizer 'Adagrad'")
def make_adagrad(
    params: Params,
    *,
    lr: float = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> Optimizer:
    """torch's Adagrad."""
    return torch.optim.Adagrad(params, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                               initial_accumulator_value=initial_accumulator_value, eps=eps)


@validated_params("optimizer 'RMSprop'")
def make_rmsprop(
    params: Params,
    *,
    lr: float = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
) -> Optimizer:
    """torch's RMSprop."""
    return torch.optim.RMSprop(params, lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                               momentum=momentum, centered=centered)


def register_torch_optimizers(register: Callable[..., None]) -> None:
    """Register core's optimizers (torch's and LAMB); core's ``ds_register_optimizers`` calls this."""
    register("Adam", make_adam)
    register("AdamW", make_adamw)
    register("Lamb", make_lamb)
    register("SGD", make_sgd)
    register("Adagrad", make_adagrad)
    register("RMSprop", make_rmsprop)


# -------------------------------------------------------------------------------------
# building from a config
# -------------------------------------------------------------------------------------


class OptimizerSpec(Protocol):
    """What :func:`build_optimizer` reads from ``ds.core.config.OptimizerConfig``."""

    type: str
    params: dict[str, Any]


class _HasOptimizers(Protocol):
    optimizers: Registry[Callable[..., Any]]


def build_optimizer(
    config: OptimizerSpec, params: Iterable[Any], components: _HasOptimizers | None = None
) -> Optimizer:
    """Build the optimizer a config's ``optimizer`` section names over ``params``.

    ``params`` is what a torch optimizer accepts (tensors or param-group dicts).
    ``components`` defaults to the installed plugins' components. A DeepSpeed type that
    another ds distribution provides raises :class:`MissingPillarError` with the pip
    command; any other unknown type raises ConfigError listing the known ones.
    """
    if components is None:
        from ds.core.plugins import default_components

        components = default_components()
    registry = components.optimizers
    name = config.type
    if name not in registry:
        pillar = PILLAR_OPTIMIZERS.get(name.lower())
        if pillar is not None:
            distribution, extra = pillar
            raise MissingPillarError(
                f"optimizer.type {name!r} is provided by {distribution}, which is not installed. "
                f"Install it with: pip install \"ds-core[{extra}]\""
            )
        known = registry.names()
        close = get_close_matches(name, known, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"optimizer.type {name!r} is unknown.{hint} Known optimizers: {', '.join(sorted(known))}.")
    registration = registry.registration(name)
    optimizer = registration.value(params, **dict(config.params or {}))
    if not isinstance(optimizer, Optimizer):
        raise PluginError(
            f"optimizer {registration.name!r} from plugin {registration.plugin!r} returned "
            f"{type(optimizer).__name__}, not a torch.optim.Optimizer."
        )
    return optimizer


__all__ = [
    "PILLAR_OPTIMIZERS",
    "AdamWithoutBiasCorrection",
    "FusedAdam",
    "FusedLamb",
    "OptimizerSpec",
    "Params",
    "build_optimizer",
    "make_adagrad",
    "make_adam",
    "make_adamw",
    "make_lamb",
    "make_rmsprop",
    "make_sgd",
    "register_torch_optimizers",
    "unknown_key_message",
    "validated_params",
]
