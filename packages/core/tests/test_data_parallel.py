"""Data-parallel training on gloo processes matches a single-process torch reference.

Tolerance: fp32, 1e-5 relative on losses and on every parameter after 20 steps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ds.core.testing import run_distributed
from ds.core.testing.parity import make_model, reference_run, train_rank

STEPS = 20
RTOL = 1e-5


def _config(world: int, gas: int, clip: float, scheduler: dict[str, Any] | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "train_batch_size": 2 * gas * world,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}},
        "gradient_clipping": clip,
        "steps_per_print": 1000,
    }
    if scheduler is not None:
        config["scheduler"] = scheduler
    return config


SCHEDULERS = {
    "none": None,
    "WarmupLR": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3, "warmup_num_steps": 5}},
    "WarmupDecayLR": {
        "type": "WarmupDecayLR",
        "params": {"warmup_max_lr": 3e-3, "warmup_num_steps": 5, "total_num_steps": 20},
    },
    "WarmupCosineLR": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 5, "total_num_steps": 20}},
    "OneCycle": {
        "type": "OneCycle",
        "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 3e-3, "cycle_first_step_size": 6, "cycle_momentum": False},
    },
    "LRRangeTest": {"type": "LRRangeTest", "params": {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 4}},
}

CASES = [
    # world, gas, clip, scheduler
    (2, 1, 0.0, "none"),
    (2, 2, 0.5, "WarmupLR"),
    (4, 1, 1.0, "WarmupDecayLR"),
    (4, 2, 0.0, "WarmupCosineLR"),
    (2, 1, 0.3, "OneCycle"),
    (2, 2, 0.0, "LRRangeTest"),
]


@pytest.mark.parametrize(("world", "gas", "clip", "scheduler"), CASES)
def test_data_parallel_matches_single_process(world: int, gas: int, clip: float, scheduler: str) -> None:
    config = _config(world, gas, clip, SCHEDULERS[scheduler])
    ref_losses, ref_params = reference_run(config, STEPS)
    results = run_distributed(train_rank, world, config, STEPS)
    for losses, params in results:
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=RTOL, atol=1e-7)
        for name, ref in ref_params.items():
            torch.testing.assert_close(params[name], ref, rtol=RTOL, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # The run must have moved the weights, or the comparison above proves nothing.
    assert not torch.allclose(ref_params["head.weight"], make_model().head.weight)
