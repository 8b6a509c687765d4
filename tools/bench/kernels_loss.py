"""Peak memory and time of a language-model head's loss, forward and backward, torch against ds.

    python tools/bench/kernels_loss.py --out benchmarks/results [--quick] [--tokens N --hidden H --vocab V]

Each variant computes, from hidden states [N, H] and a head weight [V, H] (bf16, both
requiring gradients), the mean cross-entropy against N targets (1% ignored) and its
gradients for both: torch on materialised logits (eager on bf16 logits, eager with the
float32 upcast Hugging Face models do, torch.compile of the whole head + loss), ds's
``cross_entropy`` on materialised logits (gradient written over them), and ds's
``fused_linear_cross_entropy`` (the logits exist one chunk at a time). Peak memory is
``torch.cuda.max_memory_allocated`` during one forward + backward minus what was allocated
before it (inputs only, gradients freed), after a warm-up run, so it counts the logits,
every temporary and the two gradients. Time is the median over CUDA-event-timed runs.
Results go to ``kernels_loss-<gpu>-<date>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from kernels import environment, time_ms

IGNORE = -100


@dataclass
class Inputs:
    hidden: torch.Tensor
    weight: torch.Tensor
    target: torch.Tensor


@dataclass
class Variant:
    """One way to compute the loss and the input gradients, and what it cost."""

    name: str
    loss: Callable[[Inputs], torch.Tensor]
    is_torch: bool
    peak_bytes: int | None = None
    ms: float | None = None
    loss_value: float | None = None
    error: str | None = None
    grad_error: dict[str, float] = field(default_factory=dict)


def make_inputs(tokens: int, hidden: int, vocab: int) -> Inputs:
    generator = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(tokens, hidden, device="cuda", generator=generator).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=generator) / hidden**0.5).to(torch.bfloat16)
    target = torch.randint(0, vocab, (tokens,), device="cuda", generator=generator)
    target[torch.rand(tokens, device="cuda", generator=generator) < 0.01] = IGNORE
    return Inputs(h, w.requires_grad_(), target)


def torch_eager(x: Inputs) -> torch.Tensor:
    return F.cross_entropy(x.hidden @ x.weight.t(), x.target, ignore_index=IGNORE)


def torch_eager_float32(x: Inputs) -> torch.Tensor:
    return F.cross_entropy((x.hidden @ x.weight.t()).float(), x.target, ignore_index=IGNORE)


def head_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(hidden @ weight.t(), target, ignore_index=IGNORE)


def variants() -> list[Variant]:
    from ds.core.kernels import cross_entropy, fused_linear_cross_entropy

    compiled = torch.compile(head_loss, dynamic=False)
    return [
        Variant("torch eager", torch_eager, True),
        Variant("torch eager, float32 logits", torch_eager_float32, True),
        Variant("torch.compile", lambda x: compiled(x.hidden, x.weight, x.target), True),
        Variant("ds cross_entropy", lambda x: cross_entropy(x.hidden @ x.weight.t(), x.target,
                                                            ignore_index=IGNORE), False),
        Variant("ds fused_linear_cross_entropy",
                lambda x: fused_linear_cross_entropy(x.hidden, x.weight, x.target, ignore_index=IGNORE), False),
    ]


def step(variant: Variant, x: Inputs) -> torch.Tensor:
    x.hidden.grad = None
    x.weight.grad = None
    loss = variant.loss(x)
    loss.backward()
    return loss


def measure(variant: Variant, x: Inputs, reference: tuple[torch.Tensor, torch.Tensor] | None, reps: int) -> None:
    try:
        loss = step(variant, x)  # warm-up: compilation, cuBLAS workspaces
        variant.loss_value = loss.item()
        if reference is not None:
            for name, got, want in (("hidden", x.hidden.grad, reference[0]), ("weight", x.weight.grad, reference[1])):
                variant.grad_error[name] = ((got.float() - want).norm() / want.norm()).item()
        x.hidden.grad = x.weight.grad = None
        del loss
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step(variant, x)
        torch.cuda.synchronize()
        variant.peak_bytes = torch.cuda.max_memory_allocated() - before
        variant.ms = time_ms(lambda: step(variant, x), warmup=1, reps=reps)
    except Exception as exc:  # noqa: BLE001 - one failing variant (out of memory, say) must not hide the others
        variant.error = f"{type(exc).__name__}: {exc}"[:300]
    x.hidden.grad = x.weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def float32_gradients(x: Inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients in float32 from the same bf16 values, chunked so the reference itself fits."""
    hidden, weight = x.hidden.detach().float().requires_grad_(), x.weight.detach().float().requires_grad_()
    count = (x.target != IGNORE).sum()
    for start in range(0, hidden.shape[0], 2048):
        rows = slice(start, start + 2048)
        loss = F.cross_entropy(hidden[rows] @ weight.t(), x.target[rows], ignore_index=IGNORE, reduction="sum")
        (loss / count).backward()
    return hidden.grad, weight.grad


def markdown(env: dict[str, Any], shape: str, results: list[Variant]) -> str:
    torch_peaks = [v.peak_bytes for v in results if v.is_torch and v.peak_bytes is not None]
    torch_times = [v.ms for v in results if v.is_torch and v.ms is not None]
    best_peak = min(torch_peaks) if torch_peaks else math.nan
    best_ms = min(torch_times) if torch_times else math.nan
    lines = [
        f"# LM-head cross-entropy on {env['gpu']}", "",
        f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}); ds-kernels-cuda build: "
        f"{env.get('ds_kernels_cuda_build')}; backend of cross_entropy_fwd_bwd: {env.get('backend')}", "",
        f"{shape}, mean loss, forward + backward to hidden and weight. Peak = max allocated during one "
        "step minus the inputs; `less memory` and `speed` are against the best torch variant.", "",
        "| variant | peak (GiB) | less memory | time (ms) | speed | loss | grad rel. err (hidden, weight) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for v in results:
        if v.error is not None:
            lines.append(f"| {v.name} | failed: {v.error[:150]} | | | | | |")
            continue
        assert v.peak_bytes is not None and v.ms is not None
        errors = ", ".join(f"{e:.1e}" for e in v.grad_error.values())
        lines.append(f"| {v.name} | {v.peak_bytes / 2**30:.2f} | {best_peak / v.peak_bytes:.2f}x | {v.ms:.1f} | "
                     f"{best_ms / v.ms:.2f}x | {v.loss_value:.5f} | {errors} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="a quarter of the tokens, fewer repetitions")
    parser.add_argument("--tokens", type=int, default=16384, help="8 sequences of 2048 by default")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--no-reference", action="store_true", help="skip the float32 gradient check")
    args = parser.parse_args()

    from ds.core.kernels import install_kernels

    selection = install_kernels()
    env = environment()
    env["backend"] = selection.choice("cross_entropy_fwd_bwd", "cuda").backend
    tokens = args.tokens // 4 if args.quick else args.tokens
    reps = 5 if args.quick else 10
    x = make_inputs(tokens, args.hidden, args.vocab)
    reference = None if args.no_reference else float32_gradients(x)
    results = variants()
    for variant in results:
        measure(variant, x, reference, reps)
        peak = "" if variant.peak_bytes is None else f"{variant.peak_bytes / 2**30:.2f} GiB"
        print(variant.name, peak, variant.ms, variant.loss_value, variant.grad_error, variant.error or "", flush=True)

    shape = f"[{tokens} tokens x {args.hidden}] @ [{args.vocab} x {args.hidden}]^T bf16"
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels_loss-{env['gpu'].replace(' ', '_')}-{env['date'][:10]}"
    payload = {"environment": env, "shape": shape,
               "variants": [{"name": v.name, "torch": v.is_torch, "peak_bytes": v.peak_bytes, "ms": v.ms,
                             "loss": v.loss_value, "grad_rel_error": v.grad_error, "error": v.error}
                            for v in results]}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    table = markdown(env, shape, results)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
