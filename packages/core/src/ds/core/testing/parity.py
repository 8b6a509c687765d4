"""A tiny causal language model, a plain-torch reference trainer and the matching
distributed run, for the parity tests of every partitioner.

The attention key projection has no bias on purpose: a key bias adds the same value to
every score of a query, softmax cancels it, its true gradient is zero, and Adam turns
the rounding noise in that zero into visible parameter differences between layouts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

VOCAB, DIM, SEQ = 32, 16, 8


class TinyCausalLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.q = nn.Linear(DIM, DIM)
        self.k = nn.Linear(DIM, DIM, bias=False)
        self.v = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = q @ k.transpose(-1, -2) / math.sqrt(DIM)
        mask = torch.ones(SEQ, SEQ, dtype=torch.bool, device=x.device).triu(1)
        x = x + scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + self.mlp(self.norm(x))
        logits = self.head(x[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def make_model(seed: int = 0) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM()


def global_batches(steps: int, global_batch: int, seed: int = 1) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (global_batch, SEQ), generator=generator) for _ in range(steps)]


def rank_micro_batches(batch: torch.Tensor, rank: int, dp: int, gas: int) -> list[torch.Tensor]:
    """The micro-batches one data-parallel rank sees from a global batch."""
    local = batch.chunk(dp)[rank]
    return list(local.chunk(gas))


def reference_run(config: dict[str, Any], steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Plain torch training on the whole global batch: the ground truth for parity."""
    from ds.core.config import load_config
    from ds.core.schedulers import build_scheduler

    # Same global batch as the distributed run it is compared with.
    world = config["train_batch_size"] // (
        config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"]
    )
    cfg = load_config(config, world_size=world)
    model = make_model()
    params = dict(config["optimizer"]["params"])
    optimizer = torch.optim.AdamW(model.parameters(), **params)
    scheduler = build_scheduler(cfg.scheduler, optimizer) if cfg.scheduler is not None else None
    losses = []
    for batch in global_batches(steps, cfg.train_batch_size):
        loss = model(batch)
        loss.backward()
        if cfg.gradient_clipping:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.gradient_clipping)
        optimizer.step()
        optimizer.zero_grad()
        if scheduler is not None:
            scheduler.step()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def train_rank(config: dict[str, Any], steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Train with ``ds.core.initialize`` on this rank's share of the same global batches.

    Returns the global mean loss per step and the full parameters afterwards.
    """
    import ds.core

    engine, _, _, _ = ds.core.initialize(model=make_model(), config=config)
    losses = [train_step(engine, batch) for batch in global_batches(steps, engine.config.train_batch_size)]
    return losses, engine.partitioner.gather_full_parameters()


def train_step(engine: Any, batch: torch.Tensor) -> float:
    """One optimizer step of ``engine`` on this rank's share of the global ``batch``.

    Returns the window's loss averaged over its micro-batches and all ranks, which is the
    loss the single-process reference computes on the whole batch.
    """
    import torch.distributed as dist

    rank, dp = dist.get_rank(), dist.get_world_size()
    gas = engine.gradient_accumulation_steps
    device = engine.comm.device
    window = torch.zeros((), device=device)
    for micro in rank_micro_batches(batch, rank, dp, gas):
        loss = engine(micro.to(device))
        engine.backward(loss)
        engine.step()
        window += loss.detach().float() / gas
    dist.all_reduce(window)
    return window.item() / dp
