"""ZeRO-Offload and ZeRO-Infinity optimizer offload on 2 gloo processes against no offload.

On this CPU-only machine "cpu" offload still runs the whole path: master slices and
gradients in separate CPU buffers, the step in ds-zero's CPU Adam (the native loops),
the compute-dtype slice written by CPU Adam and all-gathered. The reference is the same
ZeRO stage without offload, which steps with torch's AdamW.

Tolerances: fp32 within 1e-5 relative on losses and parameters. CPU Adam equals torch's
AdamW to about 1e-7 relative per step (it computes the same formula with fused
multiply-adds in another order), and 20 steps of Adam on the tiny model keep that well
under 1e-5. bf16 within 2e-2 relative, as test_stages: a master that differs in its
last fp32 bit can round to a neighbouring bf16 value, and training moves on from there.
Disk offload runs the same CPU Adam with the moments streamed through files, so it must
equal CPU offload bit for bit.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from ds.core.errors import ConfigError
from ds.core.testing import run_distributed
from ds.core.testing.parity import global_batches, make_model, train_step

STEPS = 8
WORLD = 2


def _config(stage: int, offload: dict[str, Any] | None, *, gas: int = 1, clip: float = 0.0,
            bf16: bool = False, reduce_dtype: str | None = None) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": 700, "stage3_param_persistence_threshold": 0}
    if offload is not None:
        zero["offload_optimizer"] = offload
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "train_batch_size": 2 * gas * WORLD,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}},
        "gradient_clipping": clip,
        "steps_per_print": 1000,
        "bf16": {"enabled": bf16},
        "communication_data_type": reduce_dtype,
        "zero_optimization": zero,
    }


def _train(config: dict[str, Any], first_step: int, steps: int, load_dir: str | None,
           save_dir: str | None) -> dict[str, Any]:
    """Runs per rank: (load,) train ``steps`` steps from ``first_step``, (save); report what it held."""
    import ds.core

    engine, _, _, _ = ds.core.initialize(model=make_model(0 if load_dir is None else 99), config=config)
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
    batches = global_batches(first_step + steps, engine.config.train_batch_size)[first_step:]
    losses = [train_step(engine, batch) for batch in batches]
    if save_dir is not None:
        engine.save_checkpoint(save_dir)
    optimizer = engine.partitioner.optimizer
    in_memory = {k for state in optimizer.state.values() for k in state}
    return {
        "losses": losses,
        "params": engine.partitioner.gather_full_parameters(),
        "optimizer": type(optimizer).__name__,
        "state_keys_in_memory": in_memory,
        "master_devices": {str(p.device) for g in optimizer.param_groups for p in g["params"]},
        "fsdp_offload": _fsdp_offload_policies(engine.module),
        "host_gradient_dtype": str(getattr(getattr(engine.partitioner, "_host", None), "gradient_dtype", None)),
    }


def _fsdp_offload_policies(module: torch.nn.Module) -> set[str]:
    """The offload policies stage 3 gave FSDP2 (private FSDP2 state: on a CPU-only machine
    parameters sit on the CPU with or without offload, so only the policy tells)."""
    from torch.distributed.fsdp import FSDPModule

    return {
        type(group.offload_policy).__name__
        for m in module.modules() if isinstance(m, FSDPModule)
        for group in m._get_fsdp_state()._fsdp_param_groups
    }


@functools.cache
def _cached_run(config_json: str, steps: int) -> list[dict[str, Any]]:
    return run_distributed(_train, WORLD, json.loads(config_json), 0, steps, None, None)


def _run(config: dict[str, Any], steps: int = STEPS) -> list[dict[str, Any]]:
    """Train from scratch; runs of the same config are shared between tests (each costs seconds)."""
    return _cached_run(json.dumps(config, sort_keys=True), steps)


def _assert_close(result: dict[str, Any], reference: dict[str, Any], rtol: float) -> None:
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=rtol, atol=0.0)
    assert result["params"].keys() == reference["params"].keys()
    for name, ref in reference["params"].items():
        torch.testing.assert_close(result["params"][name].float(), ref.float(), rtol=rtol, atol=rtol * 5e-2,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize(("stage", "gas", "clip", "bf16", "reduce_dtype"),
                         [(1, 2, 0.5, False, None), (2, 1, 1.0, False, None), (2, 2, 1.0, True, None),
                          (2, 2, 1.0, True, "fp32")])
def test_cpu_offload_follows_no_offload(stage: int, gas: int, clip: float, bf16: bool,
                                        reduce_dtype: str | None) -> None:
    offloaded = _run(_config(stage, {"device": "cpu", "pin_memory": True}, gas=gas, clip=clip, bf16=bf16,
                             reduce_dtype=reduce_dtype))
    reference = _run(_config(stage, None, gas=gas, clip=clip, bf16=bf16, reduce_dtype=reduce_dtype))
    for result, ref in zip(offloaded, reference, strict=True):
        assert result["optimizer"] == "CPUAdam" and ref["optimizer"] == "AdamW"
        assert result["master_devices"] == {"cpu"}
        # bf16 reductions reach CPU Adam as bf16: 2 bytes a parameter of host memory saved
        reduced_in_bf16 = reduce_dtype == "bf16" or (bf16 and reduce_dtype is None)  # unset: the compute dtype
        assert result["host_gradient_dtype"] == ("torch.bfloat16" if reduced_in_bf16 else "torch.float32")
        _assert_close(result, ref, 2e-2 if bf16 else 1e-5)
    assert not torch.allclose(reference[0]["params"]["head.weight"], make_model().head.weight)


def test_other_optimizers_run_as_torch_optimizers_on_cpu() -> None:
    config = _config(2, {"device": "cpu"})
    config["optimizer"] = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}
    reference_config = _config(2, None)
    reference_config["optimizer"] = config["optimizer"]
    offloaded = _run(config, 4)
    reference = _run(reference_config, 4)
    assert offloaded[0]["optimizer"] == "SGD"
    _assert_close(offloaded[0], reference[0], 1e-6)


def test_disk_offload_equals_cpu_offload(tmp_path: Path) -> None:
    disk = {"device": "nvme", "nvme_path": str(tmp_path / "swap"), "buffer_count": 2}
    on_disk = _run(_config(2, disk, gas=2, clip=1.0, bf16=True))
    on_cpu = _run(_config(2, {"device": "cpu", "pin_memory": True}, gas=2, clip=1.0, bf16=True))
    for result, ref in zip(on_disk, on_cpu, strict=True):
        assert result["optimizer"] == "DiskStateAdam"
        assert result["state_keys_in_memory"] == {"step"}  # the moments stayed on disk
        assert ref["state_keys_in_memory"] == {"step", "exp_avg", "exp_avg_sq"}
        assert result["losses"] == ref["losses"]
        for name, value in ref["params"].items():
            assert torch.equal(result["params"][name], value), name
    assert list((tmp_path / "swap").iterdir()) == []  # the swap files went with the optimizer


@pytest.mark.parametrize(("bf16", "offload_key"), [(False, "offload_optimizer"), (True, "offload_param")])
def test_stage3_cpu_offload_follows_no_offload(bf16: bool, offload_key: str) -> None:
    config = _config(3, None, gas=2, clip=1.0, bf16=bf16)
    config["zero_optimization"][offload_key] = {"device": "cpu", "pin_memory": True}
    offloaded = _run(config)
    reference = _run(_config(3, None, gas=2, clip=1.0, bf16=bf16))
    for result, ref in zip(offloaded, reference, strict=True):
        assert result["fsdp_offload"] == {"CPUOffloadPolicy"} and ref["fsdp_offload"] == {"OffloadPolicy"}
        _assert_close(result, ref, 2e-2 if bf16 else 1e-5)


@pytest.mark.parametrize(("first", "second"), [((2, "cpu"), (2, "none")), ((2, "none"), (1, "nvme")),
                                               ((2, "nvme"), (3, "cpu"))])
def test_checkpoints_move_between_offload_and_none(first: tuple[int, str], second: tuple[int, str],
                                                   tmp_path: Path) -> None:
    def config(stage: int, device: str) -> dict[str, Any]:
        offload = {"device": device, "nvme_path": str(tmp_path / "swap")} if device == "nvme" else {"device": device}
        return _config(stage, None if device == "none" else offload, clip=1.0)

    half = STEPS // 2
    whole = _run(_config(2, None, clip=1.0))[0]
    save_dir = str(tmp_path / "checkpoint")
    before = run_distributed(_train, WORLD, config(*first), 0, half, None, save_dir)[0]
    after = run_distributed(_train, WORLD, config(*second), half, half, save_dir, None)[0]
    _assert_close({"losses": before["losses"] + after["losses"], "params": after["params"]}, whole, 1e-5)


@pytest.mark.parametrize(("zero", "problem"), [
    ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, "needs stage 1, 2 or 3"),
    ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, "needs nvme_path"),
    ({"stage": 2, "offload_param": {"device": "cpu"}}, "offload_param needs stage 3"),
])
def test_offload_configs_ds_cannot_honour_are_rejected(zero: dict[str, Any], problem: str) -> None:
    from ds.core.config import load_config

    with pytest.raises(ConfigError, match=problem):
        load_config({"train_batch_size": 2, "zero_optimization": zero}, world_size=1)


@pytest.mark.parametrize("bias_correction", [True, False])
def test_fused_adam_offloads_as_cpu_adam_with_its_settings(bias_correction: bool) -> None:
    """A FusedAdam from the user's factory still runs as CPU Adam on host masters."""
    from ds.core.optimizer_classes import FusedAdam
    from ds.zero.config import OffloadConfig
    from ds.zero.cpu_adam import CPUAdam
    from ds.zero.offload import build_host_optimizer

    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(2)]

    def make(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return FusedAdam(groups, lr=1e-3, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1,
                         bias_correction=bias_correction, decoupled_weight_decay=False)

    built = build_host_optimizer(make, [{"params": params}], OffloadConfig(device="cpu"), rank=0)
    assert isinstance(built, CPUAdam)
    (group,) = built.param_groups
    assert group["bias_correction"] is bias_correction
    assert group["decoupled_weight_decay"] is False
    assert group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.1
