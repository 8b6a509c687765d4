"""The benchmark's model: Llama-style decoder shapes, construction per mode, per-layer
activation checkpointing and torch.compile, and the FLOP count behind MFU.

Construction follows what each mode can hold. Plain torch and FSDP2 build fp32 weights
on the device (their optimizers step fp32 parameters). ds and DeepSpeed stages 0-2 cast
the module to bf16 and keep fp32 masters themselves, so the model is built in bf16
straight away: a 6.7B model then never holds 27 GB of fp32 weights on the GPU. Stage 3
builds under ``ds.zero.Init`` / ``deepspeed.zero.Init``: each rank materialises one
module at a time and keeps only its shards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ConfigDict, PositiveInt
from torch import nn
from torch.utils.checkpoint import checkpoint

if TYPE_CHECKING:
    from train_llm_modes import Mode


class ModelShape(BaseModel):
    """A Llama decoder's size; ``head_dim = hidden / heads``, SwiGLU width ``ffn``."""

    model_config = ConfigDict(frozen=True)

    hidden: PositiveInt
    layers: PositiveInt
    heads: PositiveInt
    ffn: PositiveInt
    vocab: PositiveInt = 32000
    seq: PositiveInt = 2048


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(hidden=64, layers=2, heads=4, ffn=176, vocab=512, seq=64),
    "1.3b": ModelShape(hidden=2048, layers=24, heads=16, ffn=5504),
    "6.7b": ModelShape(hidden=4096, layers=32, heads=32, ffn=11008),
    "13b": ModelShape(hidden=5120, layers=40, heads=40, ffn=13824),
}
"""The family the issue measures: 1.3B (the speed runs), 6.7B and 13B (offload capacity),
and a tiny one that trains in seconds on a CPU for smoke tests."""


def resolve_shape(preset: str, overrides: dict[str, int | None]) -> ModelShape:
    """The preset with every explicitly given dimension replacing the preset's."""
    given = {key: value for key, value in overrides.items() if value is not None}
    shape = ModelShape.model_validate({**PRESETS[preset].model_dump(), **given})
    if shape.hidden % shape.heads:
        raise SystemExit(f"--hidden {shape.hidden} is not a multiple of --heads {shape.heads}; pick sizes that divide.")
    return shape


def _hf_config(shape: ModelShape) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.ffn,
        vocab_size=shape.vocab,
        max_position_embeddings=shape.seq,
        attn_implementation="sdpa",
        use_cache=False,
    )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def build_model(shape: ModelShape, mode: Mode, device: torch.device, engine_config: dict[str, Any] | None) -> nn.Module:
    """Random-weight ``LlamaForCausalLM`` placed and typed the way ``mode`` trains it."""
    from transformers import LlamaForCausalLM

    config = _hf_config(shape)
    torch.manual_seed(0)
    if mode.stage == 3 and mode.framework == "ds":
        from ds.zero import Init

        with Init(config=engine_config, seed=0):
            model = LlamaForCausalLM(config)
    elif mode.stage == 3 and mode.framework == "deepspeed":
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=engine_config):
            model = LlamaForCausalLM(config)
    else:
        dtype = torch.bfloat16 if mode.framework in ("ds", "deepspeed") else torch.float32
        with torch.device(device), _default_dtype(dtype):
            model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model.train()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers  # type: ignore[no-any-return]


def checkpoint_layers(model: nn.Module) -> None:
    """Recompute each decoder layer's activations in backward (non-reentrant checkpoint).

    The layer's ``forward`` is checkpointed rather than its ``__call__``, so module hooks
    (FSDP2's unshard, ds's gradient hooks) stay outside the checkpoint and do not run a
    second time in the recompute; this is torch's own per-layer recipe and does not depend
    on which transformers version provides ``gradient_checkpointing_enable``.
    """
    for layer in decoder_layers(model):
        layer.forward = partial(checkpoint, layer.forward, use_reentrant=False)  # type: ignore[method-assign]


def compile_layers(model: nn.Module, backend: str) -> None:
    """``torch.compile`` each decoder layer in place (``Module.compile``).

    In place keeps every module and parameter name, so the per-layer wrapping that comes
    next (``fully_shard`` for FSDP2 and ds stage 3, ds's flat buckets, DeepSpeed's hooks)
    sees the same model it would see uncompiled; hooks registered later run at the
    compiled layer's boundary.
    """
    for layer in decoder_layers(model):
        layer.compile(backend=backend)


def matmul_params(model: nn.Module) -> int:
    """Parameters of every linear layer (LM head included, embeddings not).

    Counted from the weights' global shapes (``ds_shape`` under DeepSpeed's Init, where a
    local tensor is empty; a DTensor reports its global ``numel``)."""
    return sum(_global_numel(m.weight) for m in model.modules() if isinstance(m, nn.Linear))


def total_params(model: nn.Module) -> int:
    return sum(_global_numel(p) for p in model.parameters())


def _global_numel(param: torch.Tensor) -> int:
    shape = getattr(param, "ds_shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else param.numel()


def flops_per_token(shape: ModelShape, n_matmul: int) -> float:
    """Model FLOPs per trained token: 6 N_matmul + 12 L h s (PaLM's MFU count).

    Recomputation under activation checkpointing is not counted: MFU measures useful work.
    """
    return 6.0 * n_matmul + 12.0 * shape.layers * shape.hidden * shape.seq
