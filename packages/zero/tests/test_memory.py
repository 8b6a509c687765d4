"""Per-rank state follows the ZeRO paper's formulas for mixed-precision Adam.

Counted from the tensors each rank holds right after gradients are synchronised
(``finish_gradient_sync``), i.e. with parameters, gradients and optimizer state all
present. Transient fp32 copies of gradients made for the step are not counted, as the
paper does not count them. Ψ = number of parameters, N = data-parallel size:
stage 0: 16Ψ, stage 1: 4Ψ + 12Ψ/N, stage 2: 2Ψ + 14Ψ/N, stage 3: 16Ψ/N.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ds.core
from ds.core.testing import run_distributed

FORMULAS = {
    0: lambda psi, n: 16 * psi,
    1: lambda psi, n: 4 * psi + 12 * psi / n,
    2: lambda psi, n: 2 * psi + 14 * psi / n,
    3: lambda psi, n: 16 * psi / n,
}


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(64, 64) for _ in range(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.float().pow(2).mean()


def _held_bytes(stage: int) -> tuple[int, int]:
    torch.manual_seed(0)
    model = Blocks()
    psi = sum(p.numel() for p in model.parameters())
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "bf16": {"enabled": True},
        "communication_data_type": "bf16",
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 5000, "stage3_param_persistence_threshold": 0},
    }
    engine, _, _, _ = ds.core.initialize(model=model, config=config)
    for _ in range(2):  # the first step creates Adam's state
        engine.backward(engine(torch.randn(4, 64)))
        if _ == 0:
            engine.step()
    engine.partitioner.finish_gradient_sync()
    return psi, sum(engine.partitioner.state_bytes().values())


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_bytes_follow_zero_formulas(stage: int, world: int) -> None:
    for psi, held in run_distributed(_held_bytes, world, stage):
        expected = FORMULAS[stage](psi, world)
        assert abs(held - expected) / expected < 0.10, (
            f"stage {stage}, N={world}: {held} bytes vs formula {expected:.0f}"
        )
