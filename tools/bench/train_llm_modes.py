"""The benchmark's training modes: what each one wraps the model in and how it steps.

Every mode trains the same thing: bf16 compute, fp32 master weights, AdamW (lr 1e-4,
betas 0.9/0.95, weight decay 0.1), global-norm clipping at 1.0, and one optimizer step per
``grad_accum`` micro-batches. ``ds-*`` modes run ds's engine, ``deepspeed-*`` the same
config through DeepSpeed, ``fsdp2`` torch's ``fully_shard`` per decoder layer, ``torch``
plain autocast with fused AdamW.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

Framework = Literal["torch", "fsdp2", "ds", "deepspeed"]
Offload = Literal["none", "cpu", "nvme"]
Trainer = Callable[[Sequence[torch.Tensor]], torch.Tensor]
"""Runs one optimizer step over the given micro-batches; returns the last micro-batch's loss."""

LR, BETAS, WEIGHT_DECAY, CLIP = 1e-4, (0.9, 0.95), 0.1, 1.0
BUCKET = 50_000_000


@dataclass(frozen=True)
class Mode:
    """One way to train; ``offload`` says where optimizer state (and at stage 3 parameters) live.

    ``params_on_disk``: ZeRO-Infinity at stage 3, the parameter shards in files under
    ``--nvme-path`` too (``offload_param: {device: nvme}``), not in host memory.
    """

    name: str
    framework: Framework
    stage: int | None = None
    offload: Offload = "none"
    params_on_disk: bool = False

    @property
    def needs_deepspeed(self) -> bool:
        return self.framework == "deepspeed"

    @property
    def peer(self) -> str | None:
        """The DeepSpeed mode with the same stage and offload, which a ds mode is compared to."""
        return "deepspeed" + self.name[2:] if self.framework == "ds" else None


def _modes() -> dict[str, Mode]:
    modes = [Mode("torch", "torch"), Mode("fsdp2", "fsdp2")]
    modes += [Mode(f"ds-zero{stage}", "ds", stage) for stage in range(4)]
    modes += [Mode(f"deepspeed-zero{stage}", "deepspeed", stage) for stage in (2, 3)]
    for framework in ("ds", "deepspeed"):
        modes += [Mode(f"{framework}-zero{stage}-offload-cpu", framework, stage, "cpu") for stage in (2, 3)]  # type: ignore[arg-type]
    modes.append(Mode("ds-zero2-offload-nvme", "ds", 2, "nvme"))
    modes += [Mode(f"{framework}-zero3-offload-nvme-param", framework, 3, "nvme", params_on_disk=True)  # type: ignore[arg-type]
              for framework in ("ds", "deepspeed")]
    return {mode.name: mode for mode in modes}


MODES = _modes()


def engine_config(mode: Mode, *, micro_batch: int, grad_accum: int, nvme_path: Path | None) -> dict[str, Any] | None:
    """The DeepSpeed-format config both ds and DeepSpeed run (None for torch and FSDP2)."""
    if mode.stage is None:
        return None
    zero: dict[str, Any] = {
        "stage": mode.stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": BUCKET,
        "allgather_bucket_size": BUCKET,
        "stage3_prefetch_bucket_size": BUCKET,
        "stage3_param_persistence_threshold": 100_000,
    }
    if mode.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if mode.stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    elif mode.offload == "nvme":
        assert nvme_path is not None, "train_llm.parse_args asks for --nvme-path"
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": str(nvme_path), "pin_memory": True}
    if mode.params_on_disk:
        # DeepSpeed's parameter swap buffers must each hold the largest parameter (a 6.7B
        # model's embedding is 131M elements); ds reads through its own 16 MiB buffers.
        zero["offload_param"] = {"device": "nvme", "nvme_path": str(nvme_path), "pin_memory": True,
                                 "buffer_count": 5, "buffer_size": 200_000_000}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "weight_decay": WEIGHT_DECAY}},
        "bf16": {"enabled": True},
        "communication_data_type": "bf16",  # DeepSpeed's and ds's default under bf16, stated for the table
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
        "zero_optimization": zero,
    }


def make_trainer(mode: Mode, model: nn.Module, device: torch.device, config: dict[str, Any] | None) -> Trainer:
    """Wrap ``model`` for ``mode`` (after any per-layer compile/checkpointing) and return its step."""
    if mode.framework == "torch":
        return _torch_trainer(model, device)
    if mode.framework == "fsdp2":
        return _fsdp2_trainer(model, device)
    assert config is not None
    if mode.framework == "ds":
        import ds.core

        engine, _, _, _ = ds.core.initialize(model=model, config=config)
    else:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)

    def train(batches: Sequence[torch.Tensor]) -> torch.Tensor:
        for tokens in batches:  # the engine scales for accumulation and steps at the window's end
            loss = engine(input_ids=tokens, labels=tokens).loss
            engine.backward(loss)
            engine.step()
        return loss.detach()

    return train


def _adamw(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        model.parameters(), lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, fused=device.type == "cuda"
    )


def _torch_trainer(model: nn.Module, device: torch.device) -> Trainer:
    optimizer = _adamw(model, device)

    def train(batches: Sequence[torch.Tensor]) -> torch.Tensor:
        for tokens in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return train


def _fsdp2_trainer(model: nn.Module, device: torch.device) -> Trainer:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # Gradients reduced in bf16, as ds and DeepSpeed reduce them under bf16 (and FSDP2 by default).
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    for layer in model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy, reshard_after_forward=False)
    optimizer = _adamw(model, device)

    def train(batches: Sequence[torch.Tensor]) -> torch.Tensor:
        for index, tokens in enumerate(batches):
            model.set_requires_gradient_sync(index == len(batches) - 1)  # type: ignore[operator]
            loss = model(input_ids=tokens, labels=tokens).loss
            (loss / len(batches)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return train
