"""Peak bytes per rank over whole training steps, ZeRO stages 0-2, against a byte budget.

:class:`~ds.core.testing.memory.StoragePeakTracker` counts every live tensor storage
of a rank (model, masters, optimizer state, gradient buckets, activations, temporaries)
from the model's creation on. After a first step (which creates Adam's state) each rank
must hold, Ψ parameters, N ranks, g bytes per reduced gradient element, n = 1 for stage
0 and N for stages 1 and 2:

* between steps, when the next forward starts: bf16 parameters and fp32 masters +
  Adam moments only, ``2Ψ + 12Ψ/n`` (no gradient memory);
* at its peak during forward, backward, step and zero_grad: that plus the gradients
  (``gΨ`` for stages 0 and 1, ``gΨ/N`` for stage 2; with a bf16 reduction plus the fp32
  copy for the optimizer, ``4Ψ/n``), plus the activations of plain torch running the
  same bf16 model, plus a slack of two reductions in flight (two largest buckets) and
  torch Adam's temporaries (two largest master tensors in fp32) and one fresh
  parameter gradient.

With a bf16 reduction (``communication_data_type``) these are the ZeRO paper's 16Ψ,
4Ψ + 12Ψ/N and 2Ψ + 14Ψ/N, plus the fp32 gradient copy torch's optimizers need.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ds.core
from ds.core.testing import run_distributed
from ds.core.testing.memory import StoragePeakTracker

DIM, LAYERS, VOCAB = 256, 6, 512
TOKENS = (2, 16)  # activations small next to the model state, so excess state shows
BUCKET = 100_000  # elements; several parameters per bucket, some parameters larger than one


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(DIM), nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Linear(4 * DIM, DIM))
            for _ in range(LAYERS)
        )
        self.head = nn.Linear(DIM, VOCAB, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = x + block(x)
        return F.cross_entropy(self.head(x).float().flatten(0, 1), tokens.flatten())


def _tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, TOKENS, generator=torch.Generator().manual_seed(1))


def _torch_activation_bytes() -> int:
    """Peak bytes plain torch adds over its bf16 parameters during the forward."""
    tokens = _tokens()
    with StoragePeakTracker() as tracker:
        torch.manual_seed(0)
        model = Mlp().to(torch.bfloat16)
        tracker.reset_peak()
        before = tracker.live_bytes
        model(tokens)
        return tracker.peak_bytes - before


def _measure(stage: int, communication: str) -> dict[str, int]:
    tokens = _tokens()
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": TOKENS[0],
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "bf16": {"enabled": True},
        "communication_data_type": communication,
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": BUCKET},
    }
    with StoragePeakTracker() as tracker:
        torch.manual_seed(0)
        model = Mlp()
        sizes = [p.numel() for p in model.parameters()]
        engine, _, _, _ = ds.core.initialize(model=model, config=config)
        engine.backward(engine(tokens))
        engine.step()
        between_steps = tracker.live_bytes
        tracker.reset_peak()
        engine.backward(engine(tokens))
        engine.step()
        engine.zero_grad()
    return {"psi": sum(sizes), "largest_param": max(sizes), "between": between_steps, "peak": tracker.peak_bytes}


def _rank_measurements() -> dict[tuple[int, str], dict[str, int]]:
    return {(stage, comm): _measure(stage, comm) for comm in ("fp32", "bf16") for stage in (0, 1, 2)}


def _budget(stage: int, world: int, communication: str, psi: int) -> tuple[float, float]:
    """(resident between steps, model state at the peak) in bytes, as the module docstring says."""
    n = 1 if stage == 0 else world
    g = 4 if communication == "fp32" else 2
    resident = 2 * psi + 12 * psi / n
    reduced = g * psi / (world if stage == 2 else 1)
    fp32_copy = 0 if g == 4 else 4 * psi / n
    return resident, resident + reduced + fp32_copy


@pytest.fixture(scope="module")
def activation_bytes() -> int:
    (value,) = run_distributed(_torch_activation_bytes, 1)
    return value


@pytest.mark.parametrize("world", [1, 2])
def test_peak_bytes_per_rank_within_budget(world: int, activation_bytes: int) -> None:
    failures = []
    for rank, measured in enumerate(run_distributed(_rank_measurements, world)):
        for (stage, comm), m in measured.items():
            psi = m["psi"]
            resident, state = _budget(stage, world, comm, psi)
            largest_bucket = max(BUCKET, m["largest_param"]) * 4
            slack = 2 * largest_bucket + 2 * 4 * m["largest_param"] + 2 * m["largest_param"]
            label = f"stage {stage}, {comm} reduction, N={world}, rank {rank}"
            if m["between"] > resident + slack:
                failures.append(f"{label}: {m['between'] / psi:.2f}Ψ held between steps > {resident / psi:.2f}Ψ")
            if m["peak"] > state + activation_bytes + slack:
                failures.append(
                    f"{label}: peak {m['peak'] / psi:.2f}Ψ > {state / psi:.2f}Ψ state "
                    f"+ {activation_bytes / psi:.2f}Ψ activations + {slack / psi:.2f}Ψ slack"
                )
    assert not failures, "\n".join(failures)


def test_tracker_sees_a_temporary_that_is_gone_by_the_end() -> None:
    with StoragePeakTracker() as tracker:
        kept = torch.ones(1000)
        temporary = kept * 2
        del temporary
    assert tracker.live_bytes == kept.nbytes
    assert tracker.peak_bytes == 2 * kept.nbytes
