"""LAMB's reference against a plain per-tensor LAMB, the op-stepped optimizers against torch's, and training with Lamb.

The per-tensor LAMB below is written from DeepSpeed FusedLamb's kernel semantics
(uncorrected moments in the update, eps outside the square root unless asked, trust
ratio clamped to max_coeff then min_coeff, step size lr * sqrt(1 - beta2^t) / (1 - beta1^t))
in float64, one tensor at a time, with none of the reference's foreach calls.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

import ds.core
from ds.core.errors import ConfigError
from ds.core.kernels import ops
from ds.core.optimizer_classes import AdamWithoutBiasCorrection, FusedAdam, FusedLamb
from ds.core.optimizers import build_optimizer
from ds.core.testing import run_distributed
from ds.core.testing.parity import SEQ, VOCAB, make_model


def lamb_one_tensor(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, step: int, bias_correction: bool,
                    max_coeff: float, min_coeff: float, eps_inside_sqrt: bool) -> tuple[torch.Tensor, ...]:
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = torch.sqrt(v + eps) if eps_inside_sqrt else torch.sqrt(v) + eps
    update = m / denom + weight_decay * p
    w_norm, u_norm = p.norm().item(), update.norm().item()
    ratio = 1.0
    if w_norm != 0 and u_norm != 0:
        ratio = min(w_norm / u_norm, max_coeff)
        ratio = max(ratio, min_coeff)
    step_size = lr * math.sqrt(1 - beta2**step) / (1 - beta1**step) if bias_correction else lr
    return p - step_size * ratio * update, m, v


HYPER = {"lr": 0.02, "beta1": 0.9, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.05}


@pytest.mark.parametrize(
    ("bias_correction", "eps_inside_sqrt", "max_coeff", "min_coeff"),
    [(True, False, 10.0, 0.01), (False, True, 10.0, 0.01), (True, False, 0.3, 0.01), (True, False, 10.0, 5.0)],
)
def test_lamb_reference_matches_per_tensor_lamb(bias_correction: bool, eps_inside_sqrt: bool, max_coeff: float,
                                                min_coeff: float) -> None:
    torch.manual_seed(0)
    sizes = [1, 7, 130, 4097]
    params = [torch.randn(n, dtype=torch.float64) * (i + 1) for i, n in enumerate(sizes)]
    params.append(torch.zeros(5, dtype=torch.float64))  # both norms zero: ratio 1
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    expected = [(p.clone(), m.clone(), v.clone()) for p, m, v in zip(params, exp_avgs, exp_avg_sqs)]
    options = {"bias_correction": bias_correction, "max_coeff": max_coeff, "min_coeff": min_coeff,
               "eps_inside_sqrt": eps_inside_sqrt, **HYPER}
    for step in range(1, 4):
        grads = [torch.randn_like(p) for p in params]
        ops.lamb_step(params, grads, exp_avgs, exp_avg_sqs, [], step=step, **options)
        expected = [lamb_one_tensor(p, g, m, v, step=step, **options) for (p, m, v), g in zip(expected, grads)]
    for i, (p, m, v) in enumerate(expected):
        torch.testing.assert_close(params[i], p, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(exp_avgs[i], m, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(exp_avg_sqs[i], v, rtol=1e-12, atol=1e-14)


def test_lamb_reference_updates_low_precision_params_and_copies() -> None:
    torch.manual_seed(1)
    params = [torch.randn(33), torch.randn(8, dtype=torch.bfloat16)]
    grads = [torch.randn(33, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)]
    exp_avgs, exp_avg_sqs = [torch.zeros(33), torch.zeros(8)], [torch.zeros(33), torch.zeros(8)]
    copies = [torch.full((33,), float("nan"), dtype=torch.bfloat16), torch.full((8,), float("nan"))]
    before = [p.double() for p in params]
    options = {"step": 1, "bias_correction": True, "max_coeff": 10.0, "min_coeff": 0.01, "eps_inside_sqrt": False}
    ops.lamb_step(params, grads, exp_avgs, exp_avg_sqs, copies, **options, **HYPER)
    for i, p0 in enumerate(before):
        ref, _, _ = lamb_one_tensor(p0, grads[i].double(), torch.zeros_like(p0), torch.zeros_like(p0), **options,
                                    **HYPER)
        torch.testing.assert_close(params[i].double(), ref.to(params[i].dtype).double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(copies[i], params[i].to(copies[i].dtype), rtol=0, atol=0)


def test_lamb_step_rejects_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="lamb_step got 1 params but 2 exp_avgs; pass one per param"):
        ops.lamb_step([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)] * 2, [torch.zeros(2)], [], lr=0.1,
                      beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, step=1, bias_correction=True,
                      max_coeff=10.0, min_coeff=0.01, eps_inside_sqrt=False)


def _two_models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    twin = torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    twin.load_state_dict(model.state_dict())
    return model, twin


def _train_side_by_side(ours: torch.optim.Optimizer, theirs: torch.optim.Optimizer, model: torch.nn.Module,
                        twin: torch.nn.Module, steps: int = 5) -> None:
    for _ in range(steps):
        x = torch.randn(4, 13)
        for net, optimizer in ((model, ours), (twin, theirs)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoupled", [True, False])
def test_fused_adam_matches_torch_adam_on_cpu(decoupled: bool) -> None:
    model, twin = _two_models()
    groups = [{"params": list(model[0].parameters()), "lr": 0.05}, {"params": list(model[2].parameters())}]
    twin_groups = [{"params": list(twin[0].parameters()), "lr": 0.05}, {"params": list(twin[2].parameters())}]
    hyper = {"lr": 0.01, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.1}
    ours = FusedAdam(groups, bias_correction=True, decoupled_weight_decay=decoupled, **hyper)
    theirs = (torch.optim.AdamW if decoupled else torch.optim.Adam)(twin_groups, **hyper)
    _train_side_by_side(ours, theirs, model, twin)
    # State dicts use torch's keys, so they load into torch's optimizer (a copy: CPU state
    # would otherwise be shared between the two).
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    _train_side_by_side(ours, theirs, model, twin, steps=2)


def test_fused_adam_without_bias_correction_matches_the_cpu_class() -> None:
    model, twin = _two_models()
    hyper = {"lr": 0.01, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.01, "decoupled_weight_decay": True}
    ours = FusedAdam(model.parameters(), bias_correction=False, **hyper)
    theirs = AdamWithoutBiasCorrection(twin.parameters(), amsgrad=False, **hyper)
    _train_side_by_side(ours, theirs, model, twin)


def test_a_parameter_that_joins_late_keeps_its_own_step_count() -> None:
    first, late = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    optimizer = FusedLamb([first, late], lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                          bias_correction=True, max_coeff=10.0, min_coeff=0.01, eps_inside_sqrt=False)
    first.grad = torch.full((3,), 0.5)
    optimizer.step()
    late.grad = torch.full((3,), 0.5)
    first.grad = torch.full((3,), 0.5)
    optimizer.step()
    assert [int(optimizer.state[p]["step"]) for p in (first, late)] == [2, 1]
    # First LAMB step of a constant gradient: update = 1 per element, ratio = ||1|| / ||1|| = 1.
    assert late.detach().tolist() == pytest.approx([0.9] * 3, abs=1e-6)


class _Section:
    def __init__(self, type_: str, params: dict[str, Any]) -> None:
        self.type, self.params = type_, params


def test_lamb_config_builds_fused_lamb_and_refuses_what_it_does_not_apply() -> None:
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer(_Section("Lamb", {"lr": 1e-3, "max_coeff": 0.3, "min_coeff": 0.01}), [param])
    assert isinstance(optimizer, FusedLamb) and optimizer.defaults["max_coeff"] == 0.3
    with pytest.raises(ConfigError, match="max_grad_norm.*gradient_clipping"):
        build_optimizer(_Section("lamb", {"max_grad_norm": 1.0}), [param])
    with pytest.raises(ConfigError, match="min_coeff <= max_coeff"):
        build_optimizer(_Section("Lamb", {"max_coeff": 0.1, "min_coeff": 0.2}), [param])
    with pytest.raises(ConfigError, match="unknown parameter 'max_coef'"):
        build_optimizer(_Section("Lamb", {"max_coef": 0.1}), [param])


def _train_with_lamb() -> dict[str, Any]:
    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Lamb", "params": {"lr": 0.1, "weight_decay": 0.01, "max_coeff": 0.5}},
        "steps_per_print": 1000,
    }
    engine, optimizer, _, _ = ds.core.initialize(model=make_model(), config=config)
    batch = torch.randint(0, VOCAB, (2, SEQ))
    losses = []
    for _ in range(8):
        loss = engine(batch)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"optimizer": type(optimizer).__name__, "losses": losses}


def test_engine_trains_with_lamb() -> None:
    (result,) = run_distributed(_train_with_lamb, 1)
    assert result["optimizer"] == "FusedLamb"
    losses = result["losses"]
    assert all(math.isfinite(x) for x in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.8 * losses[0], losses
