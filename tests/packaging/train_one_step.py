"""Run inside the packaging test's fresh environment: one training step and one plugin op.

The config names ds-example-plugin's optimizer, so ``ds.core.initialize`` can only
succeed if the installed plugin was discovered through its entry point. Prints one JSON
object for the test to check.
"""

from __future__ import annotations

import json

import torch

import ds.core
from ds.core.kernels import install_kernels

LR = 0.5


def main() -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = [param.detach().clone() for param in model.parameters()]
    config = {
        "train_batch_size": 2,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "ExampleSignSGD", "params": {"lr": LR}},
    }
    engine, _, _, _ = ds.core.initialize(model=model, config=config)
    loss = engine(torch.randn(2, 4)).pow(2).mean()
    engine.backward(loss)
    engine.step()
    moves = [(param.detach() - old).abs().flatten().tolist() for param, old in zip(engine.module.parameters(), before)]

    selection = install_kernels()
    x = torch.randn(16)
    silu_matches = torch.allclose(torch.ops.ds.example_silu(x), x * torch.sigmoid(x))
    print(json.dumps({
        "lr": LR,
        "global_steps": engine.global_steps,
        "moves": [move for param_moves in moves for move in param_moves],
        "example_silu_backend": selection.choice("example_silu", "cpu").backend,
        "example_silu_matches_reference": silu_matches,
    }))


if __name__ == "__main__":
    main()
