"""torch.compile of repeated blocks, and the engine training with every transform switched on."""

from __future__ import annotations

import copy
from functools import partial
from typing import Any

import pytest
import torch
import torch.distributed as dist

import ds.core
from ds.core.config import CompileConfig
from ds.core.testing import hf_models, run_distributed
from ds.core.testing.parity import make_model
from ds.core.transforms.compile import compile_blocks, repeated_blocks

pytest.importorskip("transformers")  # the models below are transformers classes

VOCAB, SEQ, LAYERS = 61, 11, 3
tiny_llama = partial(hf_models.tiny_llama, vocab=VOCAB, layers=LAYERS)
tiny_gpt2 = partial(hf_models.tiny_gpt2, vocab=VOCAB, layers=LAYERS)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2, make_model])
def test_blocks_are_ds_zero_shard_units(build) -> None:  # noqa: ANN001 - parametrised factories
    units = pytest.importorskip("ds.zero.units")
    model = build()

    assert [id(b) for b in repeated_blocks(model)] == [id(u) for u in units.shard_units(model)]


def test_compiled_blocks_keep_names_and_numbers_and_share_one_graph() -> None:
    model = tiny_llama()
    reference = copy.deepcopy(model)
    names = [name for name, _ in model.named_parameters()]
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()

    blocks = compile_blocks(model, CompileConfig(enabled=True))

    assert blocks == list(model.model.layers) and not model.config.use_cache
    assert [name for name, _ in model.named_parameters()] == names
    ids = torch.randint(0, VOCAB, (2, SEQ))
    out, ref = model(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    out.loss.backward()
    ref.loss.backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph serves every layer
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def _losses(stage: int, transformed: bool, steps: int = 3) -> list[float]:
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 1000,
                              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    if stage:
        config["zero_optimization"] = {"stage": stage}
    if transformed:
        config["kernels"] = {"inject": True, "fused_cross_entropy": True}
        config["compile"] = {"enabled": True}
    engine, _, _, _ = ds.core.initialize(model=tiny_llama(), config=config)
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1 + dist.get_rank()))
    losses = []
    for _ in range(steps):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _transformed_and_plain(stage: int) -> dict[str, list[float]]:
    return {"transformed": _losses(stage, True), "plain": _losses(stage, False)}


@pytest.mark.parametrize(("stage", "world_size"), [(0, 1), (3, 2)])
def test_engine_trains_with_every_transform_like_without(stage: int, world_size: int) -> None:
    if stage:
        pytest.importorskip("ds.zero")
    for result in run_distributed(_transformed_and_plain, world_size, stage):
        torch.testing.assert_close(result["transformed"], result["plain"], rtol=1e-4, atol=1e-5)
        assert result["plain"][-1] < result["plain"][0]
