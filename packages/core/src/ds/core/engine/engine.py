"""The training engine: one loop for every parallel layout.

Everything that differs between plain data parallelism and the ZeRO stages lives in
the :class:`~ds.core.partition.Partitioner`; the engine only sequences a step. Per
optimizer step it makes exactly one host synchronisation: reading the global gradient
norm, which both clipping and overflow detection need.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ds.core.engine.loss_scaler import LossScaler
from ds.core.engine.state import load_engine_checkpoint, save_engine_checkpoint

if TYPE_CHECKING:
    from ds.core.comm import Communicator
    from ds.core.config import DsConfig
    from ds.core.mesh import Mesh
    from ds.core.partition import Partitioner, PrecisionPolicy


class Engine(nn.Module):
    """Wraps the user's model: ``engine(batch)``, ``engine.backward(loss)``, ``engine.step()``.

    ``engine.module`` is the user's model (cast to the compute dtype). Calls that are
    not accumulation boundaries only accumulate gradients locally.
    """

    def __init__(
        self,
        *,
        config: DsConfig,
        comm: Communicator,
        mesh: Mesh,
        partitioner: Partitioner,
        precision: PrecisionPolicy,
        lr_scheduler: Any = None,
        partitioner_name: str = "data_parallel",
    ) -> None:
        super().__init__()
        self.module = partitioner.module
        self.config = config
        self.comm = comm
        self.mesh = mesh
        self.partitioner = partitioner
        self.partitioner_name = partitioner_name
        self.precision = precision
        self.optimizer = partitioner.optimizer
        self.lr_scheduler = lr_scheduler
        self.loss_scaler = LossScaler.from_config(config.fp16)
        self.gradient_accumulation_steps = config.gradient_accumulation_steps
        self.micro_steps = 0
        self.global_steps = 0
        self.global_samples = 0
        self.skipped_steps = 0
        self._window_loss: torch.Tensor | None = None
        self._window_tokens = 0
        self._step_started = time.perf_counter()
        from ds.core.monitors import ThroughputLogger, build_monitors

        self.monitors = build_monitors(config, comm.rank)
        self.throughput = ThroughputLogger(steps_per_print=config.steps_per_print, rank=comm.rank)

    # -- forward / backward ---------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        dtype = self.precision.param_dtype
        if dtype != torch.float32:
            args, kwargs = _cast_floats((args, kwargs), dtype)
        self._window_tokens += _count_tokens(args, kwargs)
        return self.module(*args, **kwargs)

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps == 0

    def backward(self, loss: torch.Tensor) -> torch.Tensor:
        """Backpropagate ``loss`` (the micro-batch mean), scaled for accumulation and fp16."""
        if loss.dim() != 0:
            raise ValueError(
                f"engine.backward expects a scalar loss, got shape {tuple(loss.shape)}; "
                "reduce it first (e.g. loss.mean())."
            )
        self.partitioner.set_gradient_sync(self.is_gradient_accumulation_boundary())
        detached = loss.detach().float()
        self._window_loss = detached if self._window_loss is None else self._window_loss + detached
        scale = self.loss_scaler.scale / self.gradient_accumulation_steps
        (loss.float() * scale).backward()
        return loss

    # -- optimizer step -------------------------------------------------------------

    def step(self) -> None:
        """Apply the optimizer at an accumulation boundary; otherwise only count."""
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        self.partitioner.finish_gradient_sync()
        grads = self.partitioner.owned_gradients()
        norm = self._global_grad_norm(grads)  # the step's one host sync
        applied = math.isfinite(norm)
        if applied:
            coefficient = 1.0 / self.loss_scaler.scale
            clip = float(self.config.gradient_clipping or 0.0)
            if clip > 0 and clip / (norm + 1e-6) < 1.0:  # torch.nn.utils.clip_grad_norm_'s rule
                coefficient *= clip / (norm + 1e-6)
            self.partitioner.step(coefficient)
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
        else:
            self.skipped_steps += 1
            if not self.loss_scaler.dynamic:
                warnings.warn(
                    f"step {self.global_steps}: gradient norm is {norm}; the step was skipped "
                    "and no parameter changed. Lower the learning rate or enable fp16 loss "
                    "scaling / bf16.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self.loss_scaler.update(overflow=not applied)
        self.partitioner.zero_grad()
        self.global_steps += 1
        samples = self.config.train_batch_size
        self.global_samples += samples
        self._report(samples)

    def _global_grad_norm(self, grads: list[torch.Tensor]) -> float:
        """The global L2 norm of the true (loss-scale-free) gradients; inf on overflow."""
        device = self.comm.device
        if grads:
            norms = torch._foreach_norm(grads, 2.0, dtype=torch.float32)  # bf16 gradients: a norm in fp32
            total = torch.linalg.vector_norm(torch.stack(norms), 2.0) ** 2
        else:
            total = torch.zeros((), device=device)
        total = total.to(device=device, dtype=torch.float32)
        group = self.partitioner.gradient_norm_group
        if group is not None:
            self.comm.all_reduce(total, group=group)
        norm = math.sqrt(float(total)) if math.isfinite(float(total)) else float("inf")
        return norm / self.loss_scaler.scale if self.loss_scaler.scale != 1.0 else norm

    def _report(self, samples: int) -> None:
        loss = self._window_loss / self.gradient_accumulation_steps if self._window_loss is not None else None
        lr = self.optimizer.param_groups[0]["lr"] if self.optimizer.param_groups else 0.0
        self.throughput.record(
            step=self.global_steps, loss=loss, lr=lr, samples=samples, tokens=self._window_tokens * self.mesh.dp_size
        )
        if self.monitors.enabled and loss is not None:
            # The loss stays a tensor: monitors read it in batches when they flush.
            events = [
                ("Train/Samples/train_loss", loss, self.global_samples),
                ("Train/Samples/lr", float(lr), self.global_samples),
            ]
            if self.loss_scaler.dynamic:
                events.append(("Train/Samples/loss_scale", self.loss_scaler.scale, self.global_samples))
            self.monitors.write_events(events)
        self._window_loss = None
        self._window_tokens = 0

    # -- conveniences ---------------------------------------------------------------

    def train_batch(self, data_iter: Iterator[Any]) -> torch.Tensor:
        """Run one full accumulation window from ``data_iter``; return the mean loss."""
        total = torch.zeros(())
        for _ in range(self.gradient_accumulation_steps):
            batch = next(data_iter)
            if isinstance(batch, dict):
                output = self(**batch)
            elif isinstance(batch, (tuple, list)):
                output = self(*batch)
            else:
                output = self(batch)
            loss = output.loss if hasattr(output, "loss") else output
            self.backward(loss)
            self.step()
            total = total + loss.detach().float().cpu()
        return total / self.gradient_accumulation_steps

    def close(self) -> None:
        """Flush and close monitors and the progress display (call at the end of training)."""
        self.throughput.close()
        self.monitors.close()

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - nn.Module signature
        self.partitioner.zero_grad()

    # -- checkpoints ----------------------------------------------------------------

    def save_checkpoint(
        self, save_dir: str | Path, tag: str | None = None, client_state: dict[str, Any] | None = None
    ) -> Path:
        """Write a universal checkpoint; every rank must call it."""
        return save_engine_checkpoint(self, Path(save_dir), tag, client_state or {})

    def load_checkpoint(self, load_dir: str | Path, tag: str | None = None) -> tuple[Path, dict[str, Any]]:
        """Restore everything ``save_checkpoint`` wrote; returns (path, client_state)."""
        return load_engine_checkpoint(self, Path(load_dir), tag)


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast_floats(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast_floats(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _count_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Tokens in a language-model batch: the integer [batch, sequence] input, if any."""
    first = kwargs.get("input_ids", args[0] if args else None)
    if isinstance(first, torch.Tensor) and first.dim() == 2 and not first.is_floating_point():
        return first.numel()
    return 0
