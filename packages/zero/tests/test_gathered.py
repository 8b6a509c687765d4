"""``ds.zero.GatheredParameters`` with the partitioners that exist.

Parity: a run that reads and edits parameters through GatheredParameters (once on a
freshly built model, once between optimizer steps) trains to the same losses and
parameters as plain torch making the same edits (fp32, 1e-5 relative, as
test_stages.py). Ranks other than the modifier write different values, which must not
survive; a read-only block's edits must not survive either.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from ds.core.testing import run_distributed
from ds.core.testing.parity import TinyCausalLM, global_batches, make_model, rank_micro_batches

STEPS, EDIT_AFTER = 6, 3
EDITED = ("head.weight", "q.bias")


def _edit_before_training(embedding: torch.Tensor) -> None:
    embedding[3].zero_()


def _edit_between_steps(head_weight: torch.Tensor, q_bias: torch.Tensor) -> None:
    head_weight.mul_(0.5)
    q_bias.fill_(0.1)


def _config(world: int, stage: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 2 * world,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}},
        "steps_per_print": 1000,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 700, "stage3_param_persistence_threshold": 0},
    }


def _reference(config: dict[str, Any]) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), **config["optimizer"]["params"])
    with torch.no_grad():
        _edit_before_training(model.embed.weight)
    losses = []
    for step, batch in enumerate(global_batches(STEPS, config["train_batch_size"])):
        if step == EDIT_AFTER:
            with torch.no_grad():
                _edit_between_steps(model.head.weight, model.q.bias)
        loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _edit_and_train(config: dict[str, Any]) -> tuple[list[float], dict[str, torch.Tensor]]:
    import ds.core
    import ds.zero
    from ds.core.comm import init_distributed

    init_distributed()  # before the first block, so that its broadcast is a real one
    rank, world = dist.get_rank(), dist.get_world_size()
    if config["zero_optimization"]["stage"] == 3:
        torch.manual_seed(0)  # make_model's seed
        with ds.zero.Init(config):
            model = TinyCausalLM()
        assert isinstance(model.embed.weight, DTensor)
    else:
        model = make_model()
    with torch.no_grad(), ds.zero.GatheredParameters(model.embed.weight, modifier_rank=0) as embedding:
        assert embedding.shape == (32, 16)  # one parameter: one whole tensor
        if rank == 0:
            _edit_before_training(embedding)
        else:
            embedding.fill_(5.0)
    engine, _, _, _ = ds.core.initialize(model=model, config=config)
    params = [engine.module.get_parameter(name) for name in EDITED]
    losses = []
    for step, batch in enumerate(global_batches(STEPS, config["train_batch_size"])):
        if step == EDIT_AFTER:
            _read_then_edit(engine, params, rank)
        (micro,) = rank_micro_batches(batch, rank, world, 1)
        loss = engine(micro)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses, engine.partitioner.gather_full_parameters()


def _read_then_edit(engine: Any, params: list[nn.Parameter], rank: int) -> None:
    import ds.zero

    before = engine.partitioner.gather_full_parameters()
    sharded = isinstance(params[0], DTensor)
    with torch.no_grad(), ds.zero.GatheredParameters(params) as wholes:
        for name, param, whole in zip(EDITED, params, wholes, strict=True):
            assert torch.equal(whole, before[name]), name
            if sharded:  # the parameter object itself stands whole for the block
                assert torch.equal(param.to_local(), whole)
                whole.fill_(7.0)  # read-only: dropped on exit
    if sharded:
        assert all(p.to_local().numel() < p.numel() for p in params)  # sharded again
        after = engine.partitioner.gather_full_parameters()
        assert all(torch.equal(after[name], before[name]) for name in EDITED)
    with torch.no_grad(), ds.zero.GatheredParameters(params, modifier_rank=0) as (head_weight, q_bias):
        if rank == 0:
            _edit_between_steps(head_weight, q_bias)
        else:
            head_weight.fill_(123.0)
            q_bias.fill_(-1.0)
    # What the optimizer updates from: stage 3's shards, or stage 1/2's fp32 master slices.
    edited = engine.partitioner.gather_full_parameters()
    torch.testing.assert_close(edited["head.weight"], before["head.weight"] * 0.5)
    torch.testing.assert_close(edited["q.bias"], torch.full_like(before["q.bias"], 0.1))


@pytest.mark.parametrize(("stage", "world"), [(3, 2), (1, 2), (2, 4)])
def test_edits_reach_every_rank_and_training_continues_from_them(stage: int, world: int) -> None:
    config = _config(world, stage)
    ref_losses, ref_params = _reference(config)
    for losses, params in run_distributed(_edit_and_train, world, config):
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5, atol=1e-7)
        assert params.keys() == ref_params.keys()
        for name, ref in ref_params.items():
            torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    assert not torch.allclose(ref_params["head.weight"], make_model().head.weight)


def test_edit_refreshes_only_changed_master_elements_in_low_precision() -> None:
    """bf16 parameters, fp32 masters: an untouched master keeps its fp32 bits, so listing
    a parameter in a modifying block costs it no precision. One process, no collectives."""
    import ds.zero
    from ds.zero.flat_group import FlatGroup

    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(5))
    group = FlatGroup([("a", a), ("b", b)], world=1, rank=0, param_dtype=torch.bfloat16, device=torch.device("cpu"))
    group.master.copy_(torch.randn(group.shard_numel))  # masters drift below bf16 resolution in training
    group.full.copy_(group.master.to(torch.bfloat16))  # what the all-gather after a step leaves
    before = group.master.clone()
    assert not torch.equal(before, before.to(torch.bfloat16).float())  # rounding would show
    with torch.no_grad(), ds.zero.GatheredParameters([a, b], modifier_rank=0) as (whole_a, _):
        assert whole_a is a  # whole parameters are not copied
        whole_a[:2] = 4.0
    assert torch.equal(group.master[:2], torch.full((2,), 4.0))
    assert torch.equal(group.master[2:], before[2:])
