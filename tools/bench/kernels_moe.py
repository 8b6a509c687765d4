"""Benchmark ds's MoE routing kernels (top-k gating, token permute/unpermute) against torch.

    python tools/bench/kernels_moe.py --out benchmarks/results [--tokens 16384 --hidden 4096 --experts 64 --k 2]

The torch side is ds's plain-torch reference (:mod:`ds.kernels.cuda.opdefs_moe`), run eagerly
and through ``torch.compile``; backward passes time autograd through them. Each case reports
time, GB/s over the fewest bytes the step must move (logits read once; only kept token rows
read, each input once; every output written once) and the fraction of the card's measured device-to-device
copy bandwidth. Before timing, the kernels' routing is checked against the reference. Results
go to ``kernels-moe-<gpu>-<date>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from kernels import Case, compiled, copy_bandwidth_gbs, environment, run_groups, write_results

from ds.kernels.cuda import opdefs_moe

MOE_OPS = ("topk_gating", "moe_permute", "moe_permute_backward", "moe_unpermute", "moe_unpermute_backward")


def routing_cases(tokens: int, hidden: int, experts: int, k: int, capacity: int) -> list[Case]:
    dt = torch.bfloat16
    logits = torch.randn(tokens, experts, device="cuda", dtype=dt)
    x = torch.randn(tokens, hidden, device="cuda", dtype=dt)
    index, weight, position, _, _ = torch.ops.ds.topk_gating(logits, k, capacity, True)
    reference = opdefs_moe.topk_gating(logits, k, capacity, True)
    if not (torch.equal(index, reference[0]) and torch.equal(position, reference[2])):
        raise SystemExit("ds topk_gating disagrees with the torch reference; not timing a wrong kernel")

    gating_c = compiled(opdefs_moe.topk_gating)
    permute_c = compiled(opdefs_moe.moe_permute)
    unpermute_c = compiled(opdefs_moe.moe_unpermute)

    def ds_forward() -> torch.Tensor:
        idx, w, pos, _, _ = torch.ops.ds.topk_gating(logits, k, capacity, True)
        return torch.ops.ds.moe_unpermute(torch.ops.ds.moe_permute(x, idx, pos, capacity, experts), idx, pos, w,
                                          capacity)

    def torch_forward(gating: Callable[..., Any], permute: Callable[..., Any],
                      unpermute: Callable[..., Any]) -> torch.Tensor:
        idx, w, pos, _, _ = gating(logits, k, capacity, True)
        return unpermute(permute(x, idx, pos, capacity, experts), idx, pos, w, capacity)

    buffer = torch.ops.ds.moe_permute(x, index, position, capacity, experts)
    y = torch.ops.ds.moe_unpermute(buffer, index, position, weight, capacity)
    grad_buffer, grad_y = torch.randn_like(buffer), torch.randn_like(y)

    # Graphs for autograd through the torch implementations, built once and replayed.
    x_g = x.clone().requires_grad_()
    buffer_g, weight_g = buffer.clone().requires_grad_(), weight.clone().requires_grad_()
    permuted = {"torch eager": opdefs_moe.moe_permute(x_g, index, position, capacity, experts),
                "torch.compile": permute_c(x_g, index, position, capacity, experts)}
    unpermuted = {"torch eager": opdefs_moe.moe_unpermute(buffer_g, index, position, weight_g, capacity),
                  "torch.compile": unpermute_c(buffer_g, index, position, weight_g, capacity)}

    elt = x.element_size()
    kept = int((position >= 0).sum())
    token_rows, kept_rows, buffer_rows = tokens * hidden * elt, kept * hidden * elt, experts * capacity * hidden * elt
    routing_bytes = tokens * k * 12  # expert index, position (int32) and gate weight (float32) per choice
    gating_bytes = logits.numel() * logits.element_size() + routing_bytes
    shape = f"T={tokens} H={hidden} E={experts} k={k} capacity={capacity} bf16"
    return [
        Case(f"topk_gating [{tokens}x{experts}]", gating_bytes, {
            "ds": lambda: torch.ops.ds.topk_gating(logits, k, capacity, True),
            "torch eager": lambda: opdefs_moe.topk_gating(logits, k, capacity, True),
            "torch.compile": lambda: gating_c(logits, k, capacity, True),
        }),
        Case(f"moe_permute fwd {shape}", token_rows + buffer_rows + routing_bytes, {
            "ds": lambda: torch.ops.ds.moe_permute(x, index, position, capacity, experts),
            "torch eager": lambda: opdefs_moe.moe_permute(x, index, position, capacity, experts),
            "torch.compile": lambda: permute_c(x, index, position, capacity, experts),
        }),
        Case(f"moe_unpermute fwd {shape}", kept_rows + token_rows + routing_bytes, {
            "ds": lambda: torch.ops.ds.moe_unpermute(buffer, index, position, weight, capacity),
            "torch eager": lambda: opdefs_moe.moe_unpermute(buffer, index, position, weight, capacity),
            "torch.compile": lambda: unpermute_c(buffer, index, position, weight, capacity),
        }),
        Case(f"moe_permute bwd {shape}", kept_rows + token_rows + routing_bytes, {
            "ds": lambda: torch.ops.ds.moe_permute_backward(grad_buffer, x, index, position, capacity, experts),
            **{label: (lambda out=out: torch.autograd.grad(out, x_g, grad_buffer, retain_graph=True))
               for label, out in permuted.items()},
        }),
        Case(f"moe_unpermute bwd {shape}", token_rows + kept_rows + buffer_rows + routing_bytes, {
            "ds": lambda: torch.ops.ds.moe_unpermute_backward(grad_y, buffer, index, position, weight, capacity),
            **{label: (lambda out=out: torch.autograd.grad(out, (buffer_g, weight_g), grad_y, retain_graph=True))
               for label, out in unpermuted.items()},
        }),
        Case(f"gating + permute + unpermute fwd {shape}",
             gating_bytes + 2 * token_rows + buffer_rows + kept_rows + 2 * routing_bytes, {
                 "ds": ds_forward,
                 "torch eager": lambda: torch_forward(opdefs_moe.topk_gating, opdefs_moe.moe_permute,
                                                      opdefs_moe.moe_unpermute),
                 "torch.compile": lambda: torch_forward(gating_c, permute_c, unpermute_c),
             }),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25,
                        help="capacity = ceil(factor * tokens * k / experts), as GShard sizes expert buffers")
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()

    from ds.core.kernels import install_kernels

    selection = install_kernels()
    env = environment()
    env["backends"] = {op: selection.choice(op, "cuda").backend for op in MOE_OPS}
    copy_gbs = copy_bandwidth_gbs()
    print(f"{env['gpu']}: device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
    capacity = math.ceil(args.capacity_factor * args.tokens * args.k / args.experts)
    cases = run_groups([lambda: routing_cases(args.tokens, args.hidden, args.experts, args.k, capacity)], args.reps)
    write_results(args.out, "kernels-moe", env, copy_gbs, cases, title="ds MoE routing kernels",
                  extra={"capacity": capacity})


if __name__ == "__main__":
    main()
