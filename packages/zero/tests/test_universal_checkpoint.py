"""Universal checkpoints: saved under one layout (world size x ZeRO stage), loaded under another.

A chain of phases trains a few steps each; every phase after the first starts from a
model with different random weights, loads the previous phase's checkpoint and carries
on. Every phase sees the same global batches an uninterrupted run sees (the global
batch stays 8 samples; fewer ranks accumulate more micro-batches), under a warmup-decay
LR schedule and gradient clipping. The concatenated losses and the final weights must
match the uninterrupted run: fp32 within 1e-5 relative (Adam state moves exactly, so
only the layouts' reduction order differs), bf16 within 2e-2 relative of ds's own
uninterrupted single-process bf16 run (as in test_stages). Right after each load the
phase saves again, and that checkpoint must equal the one it loaded bit for bit:
weights and optimizer state (exp_avg, exp_avg_sq, step) moved exactly, and so did what
no partitioner owns (frozen parameters, persistent buffers) and a scalar parameter's
state, which a ZeRO flat group shares with other parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ds.core.checkpoint import CheckpointReader
from ds.core.testing import run_distributed
from ds.core.testing.parity import global_batches, make_model, reference_run, train_rank, train_step

GLOBAL_BATCH = 8
MICRO_BATCH = 2
STEPS_PER_PHASE = 3
RELOADED, TRAINED = "reloaded", "trained"


def _config(world: int, stage: int, precision: str = "fp32") -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": GLOBAL_BATCH // (MICRO_BATCH * world),
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}},
        "scheduler": {
            "type": "WarmupDecayLR",
            "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3, "warmup_num_steps": 4,
                       "total_num_steps": 40, "warmup_type": "linear"},
        },
        "gradient_clipping": 1.0,
        "steps_per_print": 1000,
        # Small buckets: stages 1 and 2 cut parameters across several flat groups and ranks.
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 700, "stage3_param_persistence_threshold": 0},
    }
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    return config


class _WithExtras(nn.Module):
    """The parity model plus state the partitioners treat specially: a learned temperature
    (0-dim unless ``scalar`` is false: FSDP2 cannot shard 0-dim parameters), a frozen
    parameter and a persistent buffer that counts forward calls."""

    def __init__(self, seed: int, *, scalar: bool) -> None:
        super().__init__()
        self.lm = make_model(seed)
        self.temperature = nn.Parameter(torch.ones(() if scalar else (1,)))
        self.frozen = nn.Parameter(torch.randn(5, 3), requires_grad=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lm(tokens) * self.temperature.sum() + self.frozen.sum() * 0.0


def _model(kind: str, seed: int) -> nn.Module:
    if kind == "parity":
        return make_model(seed)
    return _WithExtras(seed, scalar=kind == "scalar-extras")


def _train_phase(
    config: dict[str, Any], first_step: int, load_dir: str | None, save_dir: str, model: str
) -> dict[str, Any]:
    """One phase on this rank: (load,) train ``STEPS_PER_PHASE`` steps, save. Runs per rank."""
    import ds.core

    # Other weights than the first phase's: only the checkpoint can make the losses match.
    engine, _, _, _ = ds.core.initialize(model=_model(model, seed=0 if load_dir is None else 1234), config=config)
    restored_steps = None
    if load_dir is not None:
        engine.load_checkpoint(load_dir)
        restored_steps = engine.global_steps
        engine.save_checkpoint(save_dir, tag=RELOADED)
    batches = global_batches(first_step + STEPS_PER_PHASE, GLOBAL_BATCH)[first_step:]
    losses = [train_step(engine, batch) for batch in batches]
    engine.save_checkpoint(save_dir, tag=TRAINED)
    return {
        "losses": losses,
        "params": engine.partitioner.gather_full_parameters(),
        "restored_steps": restored_steps,
        "lr": engine.get_lr()[0],
    }


def _assert_same_training_state(loaded: Path, resaved: Path) -> None:
    with CheckpointReader(loaded, TRAINED) as before, CheckpointReader(resaved, RELOADED) as after:
        state = [n for n in before.names() if n.startswith(("model/", "optimizer/"))]
        assert state == [n for n in after.names() if n.startswith(("model/", "optimizer/"))]
        keys = {n.rpartition("/")[2] for n in state if n.startswith("optimizer/")}
        assert keys == {"exp_avg", "exp_avg_sq", "step"}
        for name in state:
            assert before.dtype(name) == after.dtype(name), name
            assert torch.equal(before.read_full(name), after.read_full(name)), f"{name} changed on reload"
        masters = [n for n in state if n.startswith("model/") and f"optimizer/{n[len('model/'):]}/step" in before]
        assert masters and all(before.dtype(n) == torch.float32 for n in masters)


def _run_chain(
    layouts: list[tuple[int, int]], precision: str, tmp_path: Path, model: str = "parity"
) -> dict[str, Any]:
    losses: list[float] = []
    result: dict[str, Any] = {}
    load_dir: Path | None = None
    for index, (world, stage) in enumerate(layouts):
        save_dir = tmp_path / f"phase{index}-world{world}-stage{stage}"
        first_step = index * STEPS_PER_PHASE
        config = _config(world, stage, precision)
        loaded = None if load_dir is None else str(load_dir)
        results = run_distributed(_train_phase, world, config, first_step, loaded, str(save_dir), model)
        result = results[0]
        if load_dir is not None:
            assert result["restored_steps"] == first_step
            _assert_same_training_state(load_dir, save_dir)
        for other in results[1:]:
            assert other["losses"] == result["losses"]
        losses += result["losses"]
        load_dir = save_dir
    return {"losses": losses, "params": result["params"], "lr": result["lr"]}


def _assert_matches(chain: dict[str, Any], reference: tuple[list[float], dict[str, torch.Tensor]], *,
                    rtol: float, atol: float) -> None:
    ref_losses, ref_params = reference
    torch.testing.assert_close(torch.tensor(chain["losses"]), torch.tensor(ref_losses), rtol=rtol, atol=0.0)
    assert chain["params"].keys() == ref_params.keys()
    for name, ref in ref_params.items():
        torch.testing.assert_close(chain["params"][name].float(), ref.float(), rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_fp32_reshaping_continues_the_uninterrupted_trajectory(tmp_path: Path) -> None:
    # 2 -> 4 ranks with stage 1 -> 3, then 4 -> 2 -> 1 ranks with stage 3 -> 1 -> 0.
    layouts = [(2, 1), (4, 3), (2, 1), (1, 0)]
    chain = _run_chain(layouts, "fp32", tmp_path)
    config = {k: v for k, v in _config(1, 0).items() if k != "zero_optimization"}
    reference = reference_run(config, len(layouts) * STEPS_PER_PHASE)
    _assert_matches(chain, reference, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(reference[1]["head.weight"], make_model(seed=1234).head.weight)


def test_bf16_reshaping_keeps_fp32_masters_and_the_trajectory(tmp_path: Path) -> None:
    # bf16 rounding differs with the reduction layout, so near-zero weights may differ by
    # a few bf16 ulps of their neighbours: atol 1e-3 on weights of magnitude ~0.1-1.
    layouts = [(2, 3), (1, 0), (2, 2)]
    chain = _run_chain(layouts, "bf16", tmp_path)
    (reference,) = run_distributed(train_rank, 1, _config(1, 0, "bf16"), len(layouts) * STEPS_PER_PHASE)
    _assert_matches(chain, reference, rtol=2e-2, atol=1e-3)


def test_scalar_parameter_state_survives_zero_flat_groups(tmp_path: Path) -> None:
    _run_chain([(1, 0), (2, 1)], "fp32", tmp_path, model="scalar-extras")


def test_frozen_parameters_and_buffers_move_between_layouts(tmp_path: Path) -> None:
    _run_chain([(1, 0), (2, 3)], "fp32", tmp_path, model="extras")
    with CheckpointReader(tmp_path / "phase1-world2-stage3", TRAINED) as reader:
        assert torch.equal(reader.read_full("model/frozen"), _model("extras", seed=0).frozen)
        # Rank 0's forward calls: 4 micro-batches a step alone, then 2 a step beside another rank.
        assert reader.read_full("model/calls").item() == STEPS_PER_PHASE * (4 + 2)
