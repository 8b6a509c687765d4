"""ZeRO stages 1-3 on gloo processes against single-process references.

fp32: losses and every parameter within 1e-5 relative of a plain-torch run on the whole
global batch (same tolerance as core's data-parallel test). fp16 and bf16: against
ds's own single-process run in the same precision, within 2e-2 relative on losses and
parameters, since low-precision rounding differs with the reduction layout; gradients are
reduced and accumulated in fp32 there, so the comparison is of the partitioning (bf16
reductions, the default under bf16, are compared in test_offload.py and on the GPU).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ds.core.testing import run_distributed
from ds.core.testing.parity import global_batches, make_model, reference_run, train_rank, train_step

STEPS = 20


def _config(world: int, stage: int, *, gas: int = 1, clip: float = 0.0, **extra: Any) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "train_batch_size": 2 * gas * world,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}},
        "gradient_clipping": clip,
        "steps_per_print": 1000,
        # Small buckets so the model spans several flat groups / reduce-scatters.
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 700, "stage3_param_persistence_threshold": 0},
        **extra,
    }


def _assert_close(
    result: tuple[list[float], dict[str, torch.Tensor]],
    reference: tuple[list[float], dict[str, torch.Tensor]],
    rtol: float,
) -> None:
    losses, params = result
    ref_losses, ref_params = reference
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=rtol * 5e-2)
    assert params.keys() == ref_params.keys()
    for name, ref in ref_params.items():
        torch.testing.assert_close(
            params[name].float(), ref.float(), rtol=rtol, atol=rtol * 5e-2, msg=lambda m, n=name: f"{n}: {m}"
        )


@pytest.mark.parametrize(
    ("world", "stage", "gas", "clip"),
    [(2, 1, 1, 0.0), (4, 1, 2, 0.5), (2, 2, 2, 0.0), (4, 2, 1, 1.0), (2, 3, 1, 0.5), (4, 3, 2, 0.0)],
)
def test_fp32_stage_matches_single_process(world: int, stage: int, gas: int, clip: float) -> None:
    config = _config(world, stage, gas=gas, clip=clip)
    reference = reference_run({k: v for k, v in config.items() if k != "zero_optimization"}, STEPS)
    for result in run_distributed(train_rank, world, config, STEPS):
        _assert_close(result, reference, 1e-5)
    assert not torch.allclose(reference[1]["head.weight"], make_model().head.weight)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_mixed_precision_stage_matches_single_process(stage: int, precision: str) -> None:
    extra = {precision: {"enabled": True, **({"initial_scale_power": 8} if precision == "fp16" else {})},
             "communication_data_type": "fp32"}
    single = _config(1, 0, gas=4, clip=1.0, **extra)  # the same 8 samples per step
    (reference,) = run_distributed(train_rank, 1, single, STEPS)
    for result in run_distributed(train_rank, 2, _config(2, stage, gas=2, clip=1.0, **extra), STEPS):
        _assert_close(result, reference, 2e-2)


class _WithUnusedLayer(torch.nn.Module):
    """The parity model with a layer in the middle of its parameters that forward never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.model = make_model()
        self.unused = torch.nn.Linear(8, 8)
        self.tail = torch.nn.Linear(1, 1)  # used (with a zero gradient): unused is no bucket's edge

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens) + 0 * self.tail.weight.sum()


def _train_with_unused_layer(config: dict[str, Any], steps: int) -> tuple[torch.Tensor, torch.Tensor, bool]:
    import ds.core

    module = _WithUnusedLayer()
    before = module.unused.weight.detach().clone()
    engine, _, _, _ = ds.core.initialize(model=module, config=config)
    shares_bucket = any(module.unused.weight in g and len(g.params) > 2 for g in engine.partitioner._groups)
    for batch in global_batches(steps, engine.config.train_batch_size):
        train_step(engine, batch)
    return before, engine.partitioner.gather_full_parameters()["unused.weight"], shares_bucket


@pytest.mark.parametrize("stage", [1, 2])
def test_parameter_without_gradient_is_reduced_as_zero(stage: int) -> None:
    """Gradient buckets are allocated uninitialised; a parameter no gradient reaches must
    still be reduced as zeros: AdamW then only decays it, ``p * (1 - lr * wd)`` a step."""
    config = _config(2, stage, gas=2)
    decay = (1 - 3e-3 * 0.01) ** STEPS
    for before, after, shares_bucket in run_distributed(_train_with_unused_layer, 2, config, STEPS):
        assert shares_bucket, "the unused layer should share a gradient bucket with trained parameters"
        torch.testing.assert_close(after, before * decay, rtol=1e-5, atol=0)
