"""Engine behaviour: fp16 overflow handling, bf16 master weights, checkpoint resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import ds.core
from ds.core.errors import CheckpointError, ConfigError
from ds.core.testing import run_distributed
from ds.core.testing.parity import SEQ, VOCAB, make_model


def _config(**overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "steps_per_print": 1000,
    }
    config.update(overrides)
    return config


def _batch() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, SEQ))


def _fp16_overflow() -> dict[str, Any]:
    fp16 = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1, "loss_scale_window": 1000}
    engine, optimizer, _, _ = ds.core.initialize(model=make_model(), config=_config(fp16=fp16))
    for _ in range(2):
        engine.backward(engine(_batch()))
        engine.step()
    params = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    scale_before = engine.loss_scaler.scale
    loss = engine(_batch())
    engine.backward(loss * float("inf"))  # every gradient becomes inf or nan
    engine.step()
    unchanged = all(torch.equal(params[n], p) for n, p in engine.module.named_parameters())
    state_unchanged = all(torch.equal(state[id(p)][k], v) for p, s in optimizer.state.items() for k, v in s.items())
    result = {
        "dtype": str(next(engine.module.parameters()).dtype),
        "unchanged": unchanged,
        "state_unchanged": state_unchanged,
        "scale_before": scale_before,
        "scale_after": engine.loss_scaler.scale,
        "skipped": engine.skipped_steps,
        "global_steps": engine.global_steps,
    }
    engine.backward(engine(_batch()))
    engine.step()
    result["moved_after"] = any(not torch.equal(params[n], p) for n, p in engine.module.named_parameters())
    return result


def test_fp16_overflow_skips_exactly_that_step() -> None:
    (result,) = run_distributed(_fp16_overflow, 1)
    assert result["dtype"] == "torch.float16"
    assert result["unchanged"] and result["state_unchanged"]
    assert result["scale_after"] == result["scale_before"] / 2
    assert result["skipped"] == 1
    assert result["global_steps"] == 3
    assert result["moved_after"]


def _bf16_masters() -> dict[str, Any]:
    engine, optimizer, _, _ = ds.core.initialize(model=make_model(), config=_config(bf16={"enabled": True}))
    for _ in range(3):
        engine.backward(engine(_batch()))
        engine.step()
    model_dtypes = {str(p.dtype) for p in engine.module.parameters()}
    master_dtypes = {str(p.dtype) for g in optimizer.param_groups for p in g["params"]}
    close = all(
        torch.equal(p.detach(), m.detach().to(torch.bfloat16))
        for p, m in zip(
            engine.module.parameters(), (m for g in optimizer.param_groups for m in g["params"]), strict=True
        )
    )
    return {"model": model_dtypes, "master": master_dtypes, "rounded_copy": close}


def test_bf16_trains_with_fp32_master_weights() -> None:
    (result,) = run_distributed(_bf16_masters, 1)
    assert result == {"model": {"torch.bfloat16"}, "master": {"torch.float32"}, "rounded_copy": True}


def _train(engine: Any, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = engine(torch.randint(0, VOCAB, (2, SEQ)))  # data depends on the restored RNG
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _resume(directory: str) -> dict[str, list[float]]:
    config = _config(
        gradient_accumulation_steps=2,
        scheduler={"type": "WarmupLR", "params": {"warmup_max_lr": 1e-2, "warmup_num_steps": 10}},
    )
    torch.manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    engine, _, _, _ = ds.core.initialize(model=make_model(), config=config)
    torch.manual_seed(100 + dist.get_rank())
    _train(engine, 6)
    engine.save_checkpoint(directory, client_state={"epoch": 3})
    continued = _train(engine, 6)

    fresh, _, _, _ = ds.core.initialize(model=make_model(seed=7), config=config)
    _, client_state = fresh.load_checkpoint(directory)
    resumed = _train(fresh, 6)
    assert client_state == {"epoch": 3}
    assert fresh.global_steps == engine.global_steps
    return {"continued": continued, "resumed": resumed}


def test_resume_gives_bitwise_equal_losses(tmp_path: Path) -> None:
    for result in run_distributed(_resume, 2, str(tmp_path)):
        assert result["continued"] == result["resumed"]
    files = {p.suffix or p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert files <= {".safetensors", ".json", "latest"}, files


def _bad_client_state(directory: str) -> str:
    engine, _, _, _ = ds.core.initialize(model=make_model(), config=_config())
    try:
        engine.save_checkpoint(directory, client_state={"tensor": torch.zeros(1)})
    except CheckpointError as exc:
        return str(exc)
    return "no error"


def test_client_state_must_be_json(tmp_path: Path) -> None:
    (message,) = run_distributed(_bad_client_state, 1, str(tmp_path))
    assert "JSON" in message


def _initialize_without_optimizer() -> str:
    config = _config()
    del config["optimizer"]
    try:
        ds.core.initialize(model=make_model(), config=config)
    except ConfigError as exc:
        return str(exc)
    return "no error"


def test_missing_optimizer_is_a_clear_error() -> None:
    (message,) = run_distributed(_initialize_without_optimizer, 1)
    assert "no optimizer" in message and '"optimizer"' in message
