"""Stage 3 traces the order its shard units run on the first step and prefetches in it after.

The model registers four blocks 0, 1, 2, 3 but runs them in another order, once as a
permutation and once with block 0 used twice, so registration order is the wrong guess.
On 2 gloo ranks: the traced order equals the order forward really ran (recorded by the
model itself), FSDP2's forward and backward prefetch lists are the ones that order
implies (written out by hand below for two units ahead), the trace hooks are gone after
the first step, and losses and weights follow a plain-torch single-process run on the
same global batches within 1e-5 relative (fp32, as test_stages).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ds.core.testing import run_distributed
from ds.core.testing.parity import DIM, VOCAB, global_batches, train_step
from ds.zero.stage3_trace import prefetch_plan

WORLD, STEPS, GAS = 2, 6, 2
PERMUTED, REUSED = (2, 0, 3, 1), (2, 0, 3, 0, 1)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.up = nn.Linear(DIM, 2 * DIM)
        self.down = nn.Linear(2 * DIM, DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class _OutOfOrderModel(nn.Module):
    """Blocks registered 0..3, run in ``run_order``; ``ran`` records the order of the last forward."""

    def __init__(self, run_order: tuple[int, ...]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(_Block() for _ in range(4))
        self.head = nn.Linear(DIM, VOCAB)
        self.run_order = run_order
        self.ran: list[str] = []

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        self.ran = []
        x = self.embed(tokens)
        for index in self.run_order:
            self.ran.append(f"blocks.{index}")
            x = self.blocks[index](x)
        logits = self.head(x[:, :-1])
        return F.cross_entropy(logits.float().reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _block_numel() -> int:
    return sum(p.numel() for p in _Block().parameters())


def _config() -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": GAS,
        "train_batch_size": 2 * GAS * WORLD,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "betas": [0.9, 0.95], "weight_decay": 0.01}},
        "steps_per_print": 1000,
        # Every block is freed after forward (threshold 0); the budget covers two blocks.
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "stage3_prefetch_bucket_size": 2 * _block_numel() + 1},
    }


def _fsdp_lists(unit: nn.Module, names: dict[nn.Module, str]) -> tuple[list[str], list[str]]:
    """What FSDP2 will prefetch from ``unit`` (private FSDP2 state: the public API only sets it)."""
    state = unit._get_fsdp_state()
    return ([names[s._modules[0]] for s in state._states_to_forward_prefetch],
            [names[s._modules[0]] for s in state._states_to_backward_prefetch])


def _train(config: dict[str, Any], run_order: tuple[int, ...]) -> dict[str, Any]:
    import ds.core

    engine, _, _, _ = ds.core.initialize(model=_OutOfOrderModel(run_order), config=config)
    model = engine.module
    names = {m: n for n, m in model.named_modules()}
    blocks = list(model.blocks)
    hooks_before = [len(b._forward_pre_hooks) for b in blocks]
    losses, hooks_after_first_step = [], []
    for step, batch in enumerate(global_batches(STEPS, engine.config.train_batch_size)):
        losses.append(train_step(engine, batch))
        if step == 0:
            hooks_after_first_step = [len(b._forward_pre_hooks) for b in blocks]
    plan = engine.partitioner.prefetch
    return {
        "losses": losses,
        "params": engine.partitioner.gather_full_parameters(),
        "ran": list(model.ran),
        "traced": [names[u] for u in plan.order],
        "fsdp": {names[b]: _fsdp_lists(b, names) for b in blocks},
        "hooks_removed": [b - a for b, a in zip(hooks_before, hooks_after_first_step, strict=True)],
    }


def _reference(run_order: tuple[int, ...]) -> tuple[list[float], dict[str, torch.Tensor]]:
    model = _OutOfOrderModel(run_order)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    losses = []
    for batch in global_batches(STEPS, 2 * GAS * WORLD):
        loss = model(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach() for n, p in model.named_parameters()}


# Two units ahead; a window starts at a unit's first use in the direction of travel and
# holds neither the unit itself nor repeats.
EXPECTED_PREFETCH = {
    PERMUTED: {  # forward 2 0 3 1, backward 1 3 0 2
        "blocks.0": (["blocks.3", "blocks.1"], ["blocks.2"]),
        "blocks.1": ([], ["blocks.3", "blocks.0"]),
        "blocks.2": (["blocks.0", "blocks.3"], []),
        "blocks.3": (["blocks.1"], ["blocks.0", "blocks.2"]),
    },
    REUSED: {  # forward 2 0 3 0 1, backward 1 0 3 0 2
        "blocks.0": (["blocks.3"], ["blocks.3"]),
        "blocks.1": ([], ["blocks.0", "blocks.3"]),
        "blocks.2": (["blocks.0", "blocks.3"], []),
        "blocks.3": (["blocks.0", "blocks.1"], ["blocks.0", "blocks.2"]),
    },
}


@pytest.mark.parametrize("run_order", [PERMUTED, REUSED], ids=["permuted", "reused"])
def test_traced_order_drives_prefetch_and_training_matches_single_process(run_order: tuple[int, ...]) -> None:
    ref_losses, ref_params = _reference(run_order)
    for result in run_distributed(_train, WORLD, _config(), run_order):
        assert result["traced"] == result["ran"] == [f"blocks.{i}" for i in run_order]
        assert result["fsdp"] == EXPECTED_PREFETCH[run_order]
        assert result["hooks_removed"] == [1, 1, 1, 1]  # the trace's hooks went after the first step
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(ref_losses), rtol=1e-5, atol=5e-7)
        for name, ref in ref_params.items():
            torch.testing.assert_close(result["params"][name], ref, rtol=1e-5, atol=5e-7,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_prefetch_plan_windows_start_at_first_use_in_each_direction() -> None:
    a, b, c, d = (nn.Linear(1, 1) for _ in range(4))
    plan = prefetch_plan([a, b, a, c, d], ahead=3)
    assert plan.forward == {a: [b, c], b: [a, c, d], c: [d], d: []}
    assert plan.backward == {d: [c, a, b], c: [a, b], a: [b], b: [a]}
    assert prefetch_plan([a, b, c], ahead=1).forward == {a: [b], b: [c], c: []}
    with pytest.raises(ValueError, match="at least one unit ahead"):
        prefetch_plan([a, b], ahead=0)
