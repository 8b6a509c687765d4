"""Stages 1 and 2 with FusedAdam: the fused step against the generic one, on 2 gloo processes.

With FusedAdam the partitioner hands the optimizer each reduced gradient slice as it is
(bf16 under a bf16 reduction, never copied to fp32), the engine's clipping and loss-scale
factor as ``grad_scale``, and the compute-dtype slices to write in the same pass. The
generic path (torch's AdamW, the same arithmetic) converts and scales the gradients
first and copies the weights after. Both must train to the same losses and weights: in
fp32 within 1e-6 relative; in bf16 and fp16 within 1e-3 (the same float32 arithmetic;
only the order of a few roundings into 16-bit weights differs). In fp32 the fused run
also matches plain torch on the whole global batch in one process (1e-5, as
test_stages.py). On CPU the fused step runs the op's torch reference, which the CUDA
kernel is tested against. With ``reduce_bucket_size`` 700 the model has several buckets, so
the fused step runs in its two phases (the first buckets of the forward, then the rest).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ds.core.testing import run_distributed
from ds.core.testing.parity import global_batches, make_model, reference_run, train_step
from ds.zero.stage12 import _step_phases

STEPS = 8
ADAM = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.01}


def _fused_adam(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    from ds.core.optimizer_classes import FusedAdam

    return FusedAdam(groups, **ADAM, bias_correction=True, decoupled_weight_decay=True)


def _torch_adamw(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, **ADAM)


def _config(stage: int, precision: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 8,
        "gradient_clipping": 0.05,  # small enough to clip every step: grad_scale is never 1
        "steps_per_print": 1000,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 700},
    }
    if precision != "fp32":
        config[precision] = {"enabled": True, **({"initial_scale_power": 8} if precision == "fp16" else {})}
    return config


def _rank(stage: int, precision: str, fused: bool) -> tuple[list[float], dict[str, torch.Tensor], bool]:
    import ds.core

    engine, _, _, _ = ds.core.initialize(model=make_model(), config=_config(stage, precision),
                                         optimizer=_fused_adam if fused else _torch_adamw)
    losses = [train_step(engine, batch) for batch in global_batches(STEPS, engine.config.train_batch_size)]
    masters_have_grads = any(g.master.grad is not None for g in engine.partitioner._groups)
    engine.backward(engine(global_batches(1, 2)[0]))
    engine.partitioner.finish_gradient_sync()
    masters_have_grads |= any(g.master.grad is not None for g in engine.partitioner._groups)
    return losses, engine.partitioner.gather_full_parameters(), masters_have_grads


@pytest.mark.parametrize(("stage", "precision"), [(1, "fp32"), (2, "fp32"), (1, "bf16"), (2, "bf16"), (2, "fp16")])
def test_fused_step_matches_the_generic_one(stage: int, precision: str) -> None:
    rtol = 1e-6 if precision == "fp32" else 1e-3
    fused = run_distributed(_rank, 2, stage, precision, True)
    generic = run_distributed(_rank, 2, stage, precision, False)
    for (losses, params, fused_grads), (ref_losses, ref_params, generic_grads) in zip(fused, generic, strict=True):
        assert not fused_grads, "the fused step must not give the fp32 masters a .grad"
        assert generic_grads
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=rtol, atol=0)
        for name, ref in ref_params.items():
            torch.testing.assert_close(params[name], ref, rtol=rtol, atol=rtol * 1e-2, msg=name)
        assert not torch.allclose(ref_params["head.weight"], make_model().head.weight)
    if precision == "fp32":
        single = reference_run({**_config(stage, precision), "optimizer": {"type": "AdamW", "params": ADAM}}, STEPS)
        for losses, params, _ in fused:
            torch.testing.assert_close(torch.tensor(losses), torch.tensor(single[0]), rtol=1e-5, atol=5e-7)
            for name, ref in single[1].items():
                torch.testing.assert_close(params[name], ref, rtol=1e-5, atol=5e-7, msg=name)


def test_the_step_updates_and_gathers_the_forwards_first_buckets_first() -> None:
    groups: Any = [SimpleNamespace(numel=n) for n in [10] * 14 + [30, 5]]  # cut in backward order
    early, rest = _step_phases(groups, split=True)
    assert early == [15, 14]  # the forward's first two buckets hold 35 of 175 elements, over an eighth
    assert rest == list(range(13, -1, -1))
    assert _step_phases(groups, split=False) == [list(range(15, -1, -1))]
    assert _step_phases(groups[:1], split=True) == [[0]]
    assert _step_phases([SimpleNamespace(numel=100), SimpleNamespace(numel=1)], split=True) == [[1], [0]]
