"""Stage 3 with parameter shards on disk (``offload_param: nvme``) on 2 gloo processes.

References and tolerances:

* against ``offload_param: cpu`` (the same CPU shards, kept in memory): bit for bit in
  losses and weights, with gradient accumulation and clipping, with the optimizer's
  moments on disk too and with activation checkpointing. The swap only moves bytes, and
  stepping one unit per optimizer call runs the same per-parameter update;
* host memory: at every unit's forward the swapped units' shards in memory are at most
  ``1 + 2 * ahead`` units' worth (here ahead is 1 unit: 3 of 6 blocks);
* a checkpoint saved with the shards on disk loads without offload (torch's AdamW then,
  1e-5 relative as in test_stage3_offload) and with them on disk (bit for bit), and the
  joined run follows the uninterrupted one.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ds.core.errors import ConfigError
from ds.core.testing import run_distributed
from ds.core.testing.parity import DIM, VOCAB, global_batches, train_step

STEPS, WORLD, GAS, BLOCKS = 4, 2, 2, 6
HIDDEN = 37  # odd: the second rank's shard of each block's weights is padded
ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}}


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class BlockLM(nn.Module):
    """Six shard units (the blocks) around root-held embedding and head."""

    def __init__(self, recompute: bool) -> None:
        super().__init__()
        self.recompute = recompute
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.recompute else block(x)
        logits = self.head(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _block_numel() -> int:
    return sum(p.numel() for p in Block().parameters())


def _config(param: dict[str, Any] | None, optimizer: dict[str, Any] | None = None) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0,
                            "stage3_prefetch_bucket_size": _block_numel()}  # one unit ahead
    if param is not None:
        zero["offload_param"] = param
    if optimizer is not None:
        zero["offload_optimizer"] = optimizer
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": GAS,
        "train_batch_size": 2 * GAS * WORLD,
        "optimizer": ADAMW,
        "gradient_clipping": 0.05,  # below the gradient norm: clipping acts on every step
        "steps_per_print": 1000,
        "zero_optimization": zero,
    }


def _shard_bytes(shards: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages under ``shards`` (a unit's shards share one buffer)."""
    storages = {s.data_ptr(): s.nbytes() for s in (p.to_local().untyped_storage() for p in shards)}
    return sum(storages.values())


def _train(config: dict[str, Any], recompute: bool, first_step: int, steps: int, load_dir: str | None,
           save_dir: str | None, sharded_init: bool = False) -> dict[str, Any]:
    """Runs per rank: (load,) train, (save); report losses, weights and the host's block shards."""
    import ds.core
    import ds.zero

    torch.manual_seed(0 if load_dir is None else 99)
    if sharded_init:
        with ds.zero.Init(config):
            model = BlockLM(recompute)
    else:
        model = BlockLM(recompute)
    engine, _, _, _ = ds.core.initialize(model=model, config=config)
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
    # The sharded parameters (inside forward a unit's parameters are the gathered ones);
    # every unit is in memory until the first forward begins.
    shards = [list(block.parameters()) for block in model.blocks]
    every_shard = [p for unit in shards for p in unit]
    unit_bytes, all_units_bytes = max(_shard_bytes(unit) for unit in shards), _shard_bytes(every_shard)
    in_memory: list[int] = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda *_: in_memory.append(_shard_bytes(every_shard)))
    batches = global_batches(first_step + steps, engine.config.train_batch_size)[first_step:]
    losses = [train_step(engine, batch) for batch in batches]
    if save_dir is not None:
        engine.save_checkpoint(save_dir)
    return {
        "losses": losses,
        "params": {name: p.cpu() for name, p in engine.partitioner.gather_full_parameters().items()},
        "unit_bytes": unit_bytes,
        "all_units_bytes": all_units_bytes,
        "in_memory": in_memory,
        "state_bytes": engine.partitioner.state_bytes(),
    }


@functools.cache
def _cached_run(config_json: str, recompute: bool) -> list[dict[str, Any]]:
    return run_distributed(_train, WORLD, json.loads(config_json), recompute, 0, STEPS, None, None)


def _run(config: dict[str, Any], recompute: bool = False) -> list[dict[str, Any]]:
    return _cached_run(json.dumps(config, sort_keys=True), recompute)


def _assert_equal(result: dict[str, Any], reference: dict[str, Any]) -> None:
    assert result["losses"] == reference["losses"]
    assert result["params"].keys() == reference["params"].keys()
    for name, value in reference["params"].items():
        assert torch.equal(result["params"][name], value), name


def _nvme(tmp_path: Path, name: str) -> dict[str, Any]:
    return {"device": "nvme", "nvme_path": str(tmp_path / name), "buffer_count": 2}


def test_param_nvme_trains_as_param_cpu_and_holds_a_window(tmp_path: Path) -> None:
    on_disk = _run(_config(_nvme(tmp_path, "params")))
    on_cpu = _run(_config({"device": "cpu"}))
    torch.manual_seed(0)
    initial = BlockLM(recompute=False).state_dict()
    assert not any(torch.equal(on_cpu[0]["params"][name], initial[name]) for name in on_cpu[0]["params"])
    for result, ref in zip(on_disk, on_cpu, strict=True):
        _assert_equal(result, ref)
        # Forward holds the unit, the one FSDP2 prefetches and one read ahead: 3 of 6 blocks.
        assert result["unit_bytes"] <= min(result["in_memory"])
        assert max(result["in_memory"]) <= 3 * result["unit_bytes"] < result["all_units_bytes"]
        assert ref["in_memory"] == [ref["all_units_bytes"]] * len(ref["in_memory"])
        assert result["state_bytes"]["params_on_disk"] == result["all_units_bytes"]
        assert result["state_bytes"]["params"] < ref["state_bytes"]["params"]
    assert list((tmp_path / "params").iterdir()) == []  # the swap files went with the engine


def test_param_and_optimizer_nvme_with_recompute_train_as_param_cpu(tmp_path: Path) -> None:
    both = _run(_config(_nvme(tmp_path, "params"), _nvme(tmp_path, "moments")), recompute=True)
    on_cpu = _run(_config({"device": "cpu"}))
    for result, ref in zip(both, on_cpu, strict=True):
        _assert_equal(result, ref)
        assert max(result["in_memory"]) <= 3 * result["unit_bytes"]


def test_checkpoint_saved_with_params_on_disk_loads_without_and_with(tmp_path: Path) -> None:
    half = STEPS // 2
    whole = _run(_config({"device": "cpu"}))[0]
    save_dir = str(tmp_path / "checkpoint")
    first = run_distributed(_train, WORLD, _config(_nvme(tmp_path, "a")), False, 0, half, None, save_dir)[0]
    plain = run_distributed(_train, WORLD, _config(None), False, half, half, save_dir, None)[0]
    torch.testing.assert_close(torch.tensor(first["losses"] + plain["losses"]), torch.tensor(whole["losses"]),
                               rtol=1e-5, atol=0.0)
    for name, value in whole["params"].items():
        torch.testing.assert_close(plain["params"][name], value, rtol=1e-5, atol=5e-7,
                                   msg=lambda m, n=name: f"{n}: {m}")
    disk = run_distributed(_train, WORLD, _config(_nvme(tmp_path, "b")), False, half, half, save_dir, None)[0]
    _assert_equal({"losses": first["losses"] + disk["losses"], "params": disk["params"]}, whole)


def test_param_nvme_takes_a_model_built_sharded_by_init(tmp_path: Path) -> None:
    """ds.zero.Init's shards become FSDP2's (re-padded) at its lazy init, after which the files are written."""
    on_disk, on_cpu = (run_distributed(_train, WORLD, _config(param), False, 0, 2, None, None, True)
                       for param in (_nvme(tmp_path, "params"), {"device": "cpu"}))
    for result, ref in zip(on_disk, on_cpu, strict=True):
        _assert_equal(result, ref)
        assert max(result["in_memory"]) < result["all_units_bytes"]


@pytest.mark.parametrize(("zero", "problem"), [
    ({"stage": 3, "offload_param": {"device": "nvme"}}, "offload_param.device nvme needs nvme_path"),
    ({"stage": 2, "offload_param": {"device": "nvme", "nvme_path": "/tmp"}}, "offload_param needs stage 3"),
])
def test_bad_param_nvme_configs_are_rejected(zero: dict[str, Any], problem: str) -> None:
    from ds.core.config import load_config

    with pytest.raises(ConfigError, match=problem):
        load_config({"train_batch_size": 2, "zero_optimization": zero}, world_size=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pin_memory", [True, False], ids=["pinned", "pageable"])
def test_param_nvme_on_cuda_follows_param_cpu(pin_memory: bool, tmp_path: Path) -> None:
    """One CUDA process, bf16, activation checkpointing: non-blocking copies out of shards that
    are freed and read again (pageable shards either way; pin_memory pins the swap buffers and,
    for the reference, the shards) give the losses and weights of ``offload_param: cpu`` within
    2e-2 relative, holding 3 of 6 blocks."""
    def config(param: dict[str, Any]) -> dict[str, Any]:
        return {**_config({**param, "pin_memory": pin_memory}), "train_batch_size": 2 * GAS, "bf16": {"enabled": True}}

    (on_disk,) = run_distributed(_train, 1, config(_nvme(tmp_path, "params")), True, 0, STEPS, None, None)
    (on_cpu,) = run_distributed(_train, 1, config({"device": "cpu"}), True, 0, STEPS, None, None)
    torch.testing.assert_close(torch.tensor(on_disk["losses"]), torch.tensor(on_cpu["losses"]), rtol=2e-2, atol=1e-3)
    for name, ref in on_cpu["params"].items():
        torch.testing.assert_close(on_disk["params"][name].float(), ref.float(), rtol=2e-2, atol=1e-3)
    assert on_disk["unit_bytes"] <= min(on_disk["in_memory"])
    assert max(on_disk["in_memory"]) <= 3 * on_disk["unit_bytes"] < on_disk["all_units_bytes"]
