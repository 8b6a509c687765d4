"""Fused cross-entropy for Hugging Face causal language models.

A causal LM's forward with ``labels`` computes ``logits = lm_head(hidden)`` for every
token, upcasts them to float32 and runs ``F.cross_entropy``: with a 128k vocabulary
that is several tokens x vocabulary buffers (logits, their float32 copy, log-softmax,
and the same again in backward), the largest activations of the step. Here the loss
comes from :func:`ds.core.kernels.fused_linear_cross_entropy` on the hidden states and
``lm_head.weight``, which never holds more than one chunk of logits.

Mechanism: the model instance's ``forward`` is replaced by a bound method (the class is
untouched). Wrapping the model in a new module would prefix every parameter name and
break checkpoints; a forward hook cannot stop the original forward from computing the
logits. The new forward defers to the class's forward unless ``labels`` are given; with
labels it runs the base model (``model.model`` or ``model.transformer``) with the same
arguments Hugging Face passes it, and returns the model's own output class with
``loss`` set and ``logits`` None (not computing them is the point). ``shift_labels``,
``ignore_index`` and ``num_items_in_batch`` (gradient accumulation's token count) mean
what they mean in Hugging Face's ``ForCausalLMLoss``.

Recognised models: a ``transformers`` model with a bias-free ``nn.Linear`` ``lm_head``,
a base model under ``model`` or ``transformer``, a forward taking ``labels``, Hugging
Face's standard causal-LM loss, and none of the config switches that change the logits
or the loss after ``lm_head`` (logit soft-capping or scaling, MoE router losses). Any
other model keeps its forward, with a warning saying why.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Mapping
from types import MethodType
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ds.core.kernels import fused_linear_cross_entropy

if TYPE_CHECKING:
    from ds.core.config import DsConfig
    from ds.core.partition import PartitionContext

BASE_MODEL_ATTRIBUTES = ("model", "transformer")
LOGIT_CHANGING_CONFIG: dict[str, tuple[Any, ...]] = {
    "final_logit_softcapping": (None,),
    "logit_scale": (None, 1.0),
    "logits_scaling": (None, 1.0),
    "output_router_logits": (None, False),
}
"""Hugging Face config attributes that alter logits or loss after ``lm_head``, with their neutral values."""
NOT_FOR_BASE_MODEL = ("labels", "logits_to_keep", "return_dict")
DEFAULT_IGNORE_INDEX = -100


@functools.cache
def _signature(function: Callable[..., Any]) -> inspect.Signature:
    return inspect.signature(function)


def _base_model(model: nn.Module) -> nn.Module | None:
    return next((m for m in (getattr(model, a, None) for a in BASE_MODEL_ATTRIBUTES) if isinstance(m, nn.Module)),
                None)


def unfused_reason(model: nn.Module) -> str | None:
    """Why ``model``'s loss cannot run fused, or None when it can."""
    if "transformers" not in sys.modules:
        return "it is not a Hugging Face transformers model"
    from transformers import PreTrainedModel
    from transformers.loss.loss_utils import ForCausalLMLoss

    if not isinstance(model, PreTrainedModel):
        return "it is not a Hugging Face transformers model"
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Linear) or head.bias is not None:
        return "it has no bias-free nn.Linear lm_head"
    if _base_model(model) is None:
        return f"it has no base model under {' or '.join(BASE_MODEL_ATTRIBUTES)}"
    if "labels" not in _signature(type(model).forward).parameters:
        return "its forward takes no labels"
    if getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return "its loss is not Hugging Face's standard causal-LM loss"
    config = getattr(model, "config", None)
    for attribute, neutral in LOGIT_CHANGING_CONFIG.items():
        value = getattr(config, attribute, None)
        if value not in neutral:
            return f"its config sets {attribute}={value!r}, which changes the logits or the loss after lm_head"
    return None


def _call_arguments(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The forward's arguments by name, ``**kwargs`` flattened in, as the class's forward would see them."""
    signature = _signature(type(model).forward)
    bound = signature.bind(model, *args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in list(bound.arguments.items())[1:]:
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


def _output_class(model: nn.Module) -> type[Any]:
    annotation = _signature(type(model).forward).return_annotation
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation) and hasattr(annotation, "to_tuple"):
        return annotation
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return CausalLMOutputWithPast


def _shifted_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Token ``i``'s target is label ``i + 1``; the last position predicts nothing (Hugging Face's shift)."""
    return F.pad(labels[..., 1:], (0, 1), value=ignore_index)


def _forward_with_fused_loss(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    named = _call_arguments(self, args, kwargs)
    labels = named.get("labels")
    if labels is None:
        return type(self).forward(self, *args, **kwargs)
    return_dict = named.get("return_dict")
    base_arguments = {k: v for k, v in named.items() if k not in NOT_FOR_BASE_MODEL}
    outputs = _base_model(self)(**base_arguments)  # type: ignore[misc]
    hidden = outputs[0]

    ignore_index = named.get("ignore_index", DEFAULT_IGNORE_INDEX)
    shift_labels = named.get("shift_labels")
    targets = shift_labels if shift_labels is not None else _shifted_targets(labels, ignore_index)
    num_items = named.get("num_items_in_batch")
    loss = fused_linear_cross_entropy(hidden, self.lm_head.weight, targets.to(hidden.device),
                                      ignore_index=ignore_index, reduction="mean" if num_items is None else "sum")
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if isinstance(num_items, torch.Tensor) else num_items)

    output_class = _output_class(self)
    fields = {f.name for f in dataclasses.fields(output_class)} - {"loss", "logits"}
    carried = {k: v for k, v in outputs.items() if k in fields} if isinstance(outputs, Mapping) else {}
    output = output_class(loss=loss, **carried)
    if return_dict is None:
        return_dict = getattr(getattr(self, "config", None), "return_dict", True)
    return output if return_dict else output.to_tuple()


def use_fused_cross_entropy(model: nn.Module) -> str | None:
    """Route ``model``'s loss through the fused cross-entropy; return why not when it cannot be."""
    reason = unfused_reason(model)
    if reason is None:
        model.forward = MethodType(_forward_with_fused_loss, model)
    return reason


class FusedCrossEntropy:
    """``kernels.fused_cross_entropy``: a Hugging Face causal LM's loss without materialised logits."""

    name = "kernel-injection-cross-entropy"
    order = 610

    def applies(self, config: DsConfig) -> bool:
        return config.kernels.fused_cross_entropy

    def apply(self, module: nn.Module, context: PartitionContext) -> nn.Module:  # noqa: ARG002 - protocol
        reason = use_fused_cross_entropy(module)
        if reason is not None:
            warnings.warn(
                f"kernels.fused_cross_entropy is on but {type(module).__name__} keeps its own loss: {reason}. "
                "Set kernels.fused_cross_entropy to false to silence this.",
                stacklevel=2,
            )
        return module
