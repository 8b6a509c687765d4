"""``overlap_comm`` at stages 1 and 2, on 2 gloo processes.

With it (the default) a step's parameter all-gathers are still in flight when ``step``
returns and the next forward leaves none pending: every bucket is waited for by a module
holding its parameters (:mod:`ds.zero.refresh_waits`); ``state_dict`` right after a
step waits too and returns the stepped weights. Reduce-scatters outlive their gradient
hooks. Without it nothing is in flight after a hook or a step. Both settings train to
identical losses and parameters (the same arithmetic in another order); parity with a
single process is test_stages.py's.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from ds.core.testing import run_distributed
from ds.core.testing.parity import global_batches, make_model, rank_micro_batches

STEPS = 3


def _config(stage: int, overlap: bool) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_batch_size": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        "steps_per_print": 1000,
        # Small buckets: the tiny model spans several flat groups.
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 700, "overlap_comm": overlap},
    }


def _pending(groups: list[Any]) -> int:
    return sum(group.refresh_pending for group in groups)


def _rank(stage: int, overlap: bool) -> dict[str, Any]:
    import ds.core

    engine, _, _, _ = ds.core.initialize(model=make_model(), config=_config(stage, overlap))
    partitioner = engine.partitioner
    groups = partitioner._groups
    rank, world = dist.get_rank(), dist.get_world_size()
    record: dict[str, Any] = {"groups": len(groups), "losses": [], "in_flight": [], "after_step": [],
                              "after_forward": []}
    for batch in global_batches(STEPS, 4):
        (micro,) = rank_micro_batches(batch, rank, world, 1)
        loss = engine(micro)
        record["after_forward"].append(_pending(groups))
        engine.backward(loss)
        record["in_flight"].append(len(partitioner._in_flight))
        engine.step()
        record["after_step"].append(_pending(groups))
        record["losses"].append(loss.item())
    state = {name: tensor.clone() for name, tensor in engine.module.state_dict().items()}
    record["after_state_dict"] = _pending(groups)
    record["state"] = state
    record["masters"] = partitioner.gather_full_parameters()
    return record


@pytest.mark.parametrize("stage", [1, 2])
def test_overlap_comm_defers_waits_to_the_readers(stage: int) -> None:
    overlapped = run_distributed(_rank, 2, stage, True)
    synchronous = run_distributed(_rank, 2, stage, False)
    for on, off in zip(overlapped, synchronous, strict=True):
        assert on["groups"] > 2
        assert all(n == on["groups"] for n in on["after_step"]), on["after_step"]
        assert on["after_forward"] == [0] * STEPS  # the first forward has nothing to wait for; later ones waited
        assert on["after_state_dict"] == 0
        assert min(on["in_flight"]) >= 1
        assert off["after_step"] == [0] * STEPS and off["in_flight"] == [0] * STEPS
        assert on["losses"] == off["losses"]
        for name, master in on["masters"].items():
            torch.testing.assert_close(on["state"][name], master, rtol=0, atol=0, msg=name)
            torch.testing.assert_close(off["masters"][name], master, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("zero", "problem"), [
    ({"stage": 3, "overlap_comm": False}, "overlap_comm false is not supported at stage 3"),
    ({"stage": 2, "allgather_partitions": False}, "allgather_partitions is not supported"),
])
def test_settings_ds_cannot_honour_are_rejected(zero: dict[str, Any], problem: str) -> None:
    from ds.core.config import load_config
    from ds.core.errors import ConfigError

    with pytest.raises(ConfigError, match=problem):
        load_config({"train_batch_size": 2, "zero_optimization": zero}, world_size=1)


def test_overlap_comm_false_is_accepted_at_stages_1_and_2() -> None:
    from ds.core.config import load_config

    for stage in (1, 2):
        config = load_config({"train_batch_size": 2, "zero_optimization": {"stage": stage, "overlap_comm": False}},
                             world_size=1)
        assert config.section("zero_optimization").overlap_comm is False
