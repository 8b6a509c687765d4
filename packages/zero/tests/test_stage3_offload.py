"""Stage 3 optimizer offload on 2 gloo processes: CPU Adam/Adagrad on FSDP2's local shards.

With ``offload_optimizer`` at stage 3 the masters are FSDP2's CPU DTensor shards and the
step runs in ds-zero's CPU optimizers on their local tensors; with ``nvme`` Adam's
moments of each local shard live in files. References and tolerances:

* CPU offload against the same stage 3 without offload (torch's AdamW or Adagrad
  stepping the DTensors): fp32 within 1e-5 relative on losses and weights, as
  test_offload (CPU Adam computes torch's formula with fused multiply-adds in another
  order, about 1e-7 relative per step);
* disk offload against CPU offload: bit for bit (the same update, moments read back);
* checkpoints saved with disk offload load without it and the reverse, and the joined
  run follows the uninterrupted run without offload within 1e-5.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ds.core.testing import run_distributed
from ds.core.testing.parity import global_batches, make_model, train_step

STEPS, WORLD, GAS = 6, 2, 2
ADAMW = {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}}
ADAGRAD = {"type": "Adagrad", "params": {"lr": 3e-2, "lr_decay": 0.01, "weight_decay": 0.01}}


def _config(offload: dict[str, Any] | None, optimizer: dict[str, Any] = ADAMW) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": 0}
    if offload is not None:
        zero["offload_optimizer"] = offload
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": GAS,
        "train_batch_size": 2 * GAS * WORLD,
        "optimizer": optimizer,
        "gradient_clipping": 1.0,
        "steps_per_print": 1000,
        "zero_optimization": zero,
    }


def _train(config: dict[str, Any], first_step: int, steps: int, load_dir: str | None,
           save_dir: str | None) -> dict[str, Any]:
    """Runs per rank: (load,) train ``steps`` steps from ``first_step``, (save); report what it held."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    import ds.core
    from ds.zero.host_shards import fsdp_reads_local_shard

    model = make_model(0 if load_dir is None else 99)
    engine, _, _, _ = ds.core.initialize(model=model, config=config)
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
    batches = global_batches(first_step + steps, engine.config.train_batch_size)[first_step:]
    losses = [train_step(engine, batch) for batch in batches]
    if save_dir is not None:
        engine.save_checkpoint(save_dir)
    optimizer = engine.partitioner.optimizer
    masters = [p for g in optimizer.param_groups for p in g["params"]]
    states = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    return {
        "losses": losses,
        "params": engine.partitioner.gather_full_parameters(),
        "optimizer": type(optimizer).__name__,
        "state_keys_in_memory": {k for state in optimizer.state.values() for k in state},
        "masters_are_cpu_dtensors": all(isinstance(p, DTensor) and p.to_local().device.type == "cpu" for p in masters),
        "states_are_cpu_dtensors": all(isinstance(v, DTensor) and v.to_local().device.type == "cpu" for v in states),
        "master_storages": len({p.to_local().untyped_storage().data_ptr() for p in masters}),
        "masters": len(masters),
        "fsdp_units": sum(isinstance(m, FSDPModule) for m in model.modules()),
        # The shards the optimizer updated are the memory FSDP2's all-gather reads.
        "fsdp_reads_updated_shards": all(fsdp_reads_local_shard(m) for m in model.modules()
                                         if isinstance(m, FSDPModule)),
    }


@functools.cache
def _cached_run(config_json: str) -> list[dict[str, Any]]:
    return run_distributed(_train, WORLD, json.loads(config_json), 0, STEPS, None, None)


def _run(config: dict[str, Any]) -> list[dict[str, Any]]:
    """Train from scratch; runs of the same config are shared between tests (each costs seconds)."""
    return _cached_run(json.dumps(config, sort_keys=True))


def _assert_close(result: dict[str, Any], reference: dict[str, Any], rtol: float) -> None:
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=rtol, atol=0.0)
    assert result["params"].keys() == reference["params"].keys()
    for name, ref in reference["params"].items():
        torch.testing.assert_close(result["params"][name], ref, rtol=rtol, atol=rtol * 5e-2,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("optimizer", "cpu_optimizer"), [(ADAMW, "CPUAdam"), (ADAGRAD, "CPUAdagrad")],
                         ids=["adamw", "adagrad"])
def test_cpu_offload_steps_local_shards_with_cpu_optimizer(optimizer: dict[str, Any], cpu_optimizer: str) -> None:
    offloaded = _run(_config({"device": "cpu", "pin_memory": True}, optimizer))
    reference = _run(_config(None, optimizer))
    for result, ref in zip(offloaded, reference, strict=True):
        assert result["optimizer"] == cpu_optimizer and ref["optimizer"] == optimizer["type"]
        assert result["masters_are_cpu_dtensors"] and result["states_are_cpu_dtensors"]
        # One host buffer per shard unit (ds.zero.host_shards); without offload one per parameter.
        assert result["master_storages"] == result["fsdp_units"] < ref["master_storages"] == ref["masters"]
        assert result["fsdp_reads_updated_shards"]
        _assert_close(result, ref, 1e-5)
    assert not torch.allclose(reference[0]["params"]["head.weight"], make_model().head.weight)


def test_disk_offload_equals_cpu_offload(tmp_path: Path) -> None:
    swap = tmp_path / "swap"
    on_disk = _run(_config({"device": "nvme", "nvme_path": str(swap), "buffer_count": 2}))
    on_cpu = _run(_config({"device": "cpu", "pin_memory": True}))
    for result, ref in zip(on_disk, on_cpu, strict=True):
        assert result["optimizer"] == "DiskStateAdam" and result["masters_are_cpu_dtensors"]
        assert result["state_keys_in_memory"] == {"step"}  # the moments stayed on disk
        assert ref["state_keys_in_memory"] == {"step", "exp_avg", "exp_avg_sq"}
        assert result["losses"] == ref["losses"]
        for name, value in ref["params"].items():
            assert torch.equal(result["params"][name], value), name
    assert list(swap.iterdir()) == []  # the swap files went with the optimizer


@pytest.mark.parametrize(("first", "second"), [("nvme", "none"), ("cpu", "nvme")])
def test_checkpoints_move_between_disk_offload_and_others(first: str, second: str, tmp_path: Path) -> None:
    def config(device: str) -> dict[str, Any]:
        if device == "none":
            return _config(None)
        return _config({"device": device, "nvme_path": str(tmp_path / "swap")} if device == "nvme" else
                       {"device": device})

    half = STEPS // 2
    whole = _run(_config(None))[0]
    save_dir = str(tmp_path / "checkpoint")
    before = run_distributed(_train, WORLD, config(first), 0, half, None, save_dir)[0]
    after = run_distributed(_train, WORLD, config(second), half, half, save_dir, None)[0]
    _assert_close({"losses": before["losses"] + after["losses"], "params": after["params"]}, whole, 1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("device", ["cpu", "nvme"])
def test_offload_on_cuda_follows_no_offload(device: str, tmp_path: Path) -> None:
    """One CUDA process, bf16: shards, gradients and the step on the CPU (pinned, non-blocking
    copies), the compute on the GPU; losses and weights within 2e-2 relative of no offload."""
    from ds.core.testing.parity import train_rank

    def config(offload: dict[str, Any] | None) -> dict[str, Any]:
        return {**_config(offload), "train_batch_size": 2 * GAS, "bf16": {"enabled": True}}

    offload = {"device": device, "pin_memory": True, "nvme_path": str(tmp_path / "swap")}
    (reference,) = run_distributed(train_rank, 1, config(None), 10)
    (result,) = run_distributed(train_rank, 1, config(offload), 10)
    torch.testing.assert_close(torch.tensor(result[0]), torch.tensor(reference[0]), rtol=2e-2, atol=1e-3)
    for name, ref in reference[1].items():
        assert result[1][name].is_cuda
        torch.testing.assert_close(result[1][name].float(), ref.float(), rtol=2e-2, atol=1e-3)


def _error_for_a_moved_shard() -> str:
    """Runs per rank: the first forward's check, against a shard moved off its unit's buffer."""
    from torch.distributed.fsdp import FSDPModule

    import ds.core
    from ds.core.errors import DsError
    from ds.zero.host_shards import fsdp_params

    model = make_model()
    config = {**_config({"device": "cpu"}), "train_batch_size": 2 * GAS}
    engine, _, _, _ = ds.core.initialize(model=model, config=config)
    train_step(engine, global_batches(1, engine.config.train_batch_size)[0])  # the check passed once
    fsdp_param = next(p for m in model.modules() if isinstance(m, FSDPModule) for p in fsdp_params(m))
    # What a lazy initialisation that re-pins a shard does: the parameter moves, the all-gather buffer stays.
    fsdp_param.sharded_param._local_tensor = fsdp_param.sharded_param._local_tensor.clone()
    try:
        engine.partitioner._host_shards._after_lazy_init(model, ())
    except DsError as error:
        return str(error)
    return "no error"


def test_a_shard_moved_off_the_all_gather_buffer_is_an_error() -> None:
    (message,) = run_distributed(_error_for_a_moved_shard, 1)
    assert "optimizer updates would never reach the forward" in message
