"""Benchmark ds's fused LAMB and fp8 block quantizers against DeepSpeed and torch.

    python tools/bench/kernels_optim.py --out benchmarks/results [--quick] [--no-deepspeed]

LAMB: one step over ~1.3B fp32 parameters in GPT-like tensors, ds ``lamb_step`` (one
multi-tensor launch pair) against DeepSpeed 0.19.8's ``FusedLamb`` (a kernel triple per
tensor; JIT-built on first use) and a torch reference (core's foreach implementation). The
bytes counted are the fewest LAMB must move with moments kept between the two passes: read
param, grad and both moments, write both moments, then read param and moments and write
param (40 bytes per parameter).

fp8: quantize / dequantize of a bf16 tensor, e4m3 and e5m2, against the same op in torch
eager and torch.compile. Timing, copy bandwidth and the table come from kernels.py.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch
from kernels import Case, Fn, compiled, copy_bandwidth_gbs, environment, run_groups, write_results

LAMB_BYTES_PER_PARAM = 40


def gpt_like_sizes(total_params: int, hidden: int = 2048) -> list[int]:
    """Tensor sizes of transformer blocks (attention, MLP, norms, biases) up to ``total_params``."""
    block = [3 * hidden * hidden, 3 * hidden, hidden * hidden, hidden, 4 * hidden * hidden, 4 * hidden,
             4 * hidden * hidden, hidden, hidden, hidden, hidden, hidden]
    sizes = [50_304 * hidden]  # the embedding
    while sum(sizes) + sum(block) <= total_params:
        sizes.extend(block)
    return sizes


def lamb_cases(total_params: int, with_deepspeed: bool) -> list[Case]:
    from ds.core.kernels import reference

    sizes = gpt_like_sizes(total_params)
    n = sum(sizes)
    params = [torch.randn(s, device="cuda") * 0.02 for s in sizes]
    grads = [torch.randn(s, device="cuda") * 1e-3 for s in sizes]
    m = [torch.zeros(s, device="cuda") for s in sizes]
    v = [torch.zeros(s, device="cuda") for s in sizes]
    hyper = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "step": 10,
             "bias_correction": True, "max_coeff": 10.0, "min_coeff": 0.01, "eps_inside_sqrt": False}
    variants: dict[str, Fn] = {
        "ds": lambda: torch.ops.ds.lamb_step(params, grads, m, v, [], **hyper),
        "torch foreach (reference)": lambda: reference.lamb_step(params, grads, m, v, [], **hyper),
    }
    errors: dict[str, str] = {}
    if with_deepspeed:
        try:
            from deepspeed.ops.lamb import FusedLamb

            modules = [torch.nn.Parameter(p) for p in params]
            for p, g in zip(modules, grads):
                p.grad = g
            deepspeed_lamb = FusedLamb(modules, lr=1e-3, weight_decay=0.01, max_coeff=10.0, min_coeff=0.01)
            variants["deepspeed FusedLamb"] = deepspeed_lamb.step
        except Exception as exc:  # noqa: BLE001 - report why DeepSpeed could not be timed
            errors["deepspeed FusedLamb"] = f"{type(exc).__name__}: {exc}"[:500]
    case = Case(f"lamb step {n / 1e9:.2f}B params in {len(sizes)} tensors, fp32", LAMB_BYTES_PER_PARAM * n,
                variants, errors=errors)
    low = [torch.empty(s, device="cuda", dtype=torch.bfloat16) for s in sizes]
    grads16 = [g.to(torch.bfloat16) for g in grads]
    # bf16 grads save 2 bytes a parameter, the bf16 copy costs 2.
    mixed = Case(f"lamb step {n / 1e9:.2f}B params, bf16 grads + bf16 copy", LAMB_BYTES_PER_PARAM * n, {
        "ds": lambda: torch.ops.ds.lamb_step(params, grads16, m, v, low, **hyper),
    })
    return [case, mixed]


def fp8_cases(numel: int, group: int) -> list[Case]:
    from ds.kernels.cuda import opdefs_fp8

    x = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    quant_c = compiled(opdefs_fp8.quantize_fp8)
    dequant_c = compiled(opdefs_fp8.dequantize_fp8)
    scale_bytes = -(-numel // group) * 4
    cases = []
    for fp8_dtype, label in ((torch.float8_e4m3fn, "e4m3"), (torch.float8_e5m2, "e5m2")):
        codes, scales = torch.ops.ds.quantize_fp8(x, group, fp8_dtype)
        moved = 2 * numel + numel + scale_bytes  # bf16 in or out, one byte per code, the scales
        name = f"{label} g{group} [{numel}] bf16"
        cases.append(Case(f"quantize_fp8 {name}", moved, {
            "ds": lambda d=fp8_dtype: torch.ops.ds.quantize_fp8(x, group, d),
            "torch eager": lambda d=fp8_dtype: opdefs_fp8.quantize_fp8(x, group, d),
            "torch.compile": lambda d=fp8_dtype: quant_c(x, group, d),
        }))
        cases.append(Case(f"dequantize_fp8 {name}", moved, {
            "ds": lambda c=codes, s=scales: torch.ops.ds.dequantize_fp8(c, s, group, torch.bfloat16),
            "torch eager": lambda c=codes, s=scales: opdefs_fp8.dequantize_fp8(c, s, group, torch.bfloat16),
            "torch.compile": lambda c=codes, s=scales: dequant_c(c, s, group, torch.bfloat16),
        }))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--only", default="", help="time only the cases whose name contains this text")
    args = parser.parse_args()

    from ds.core.kernels import install_kernels

    selection = install_kernels()
    env = environment()
    env["backends"] = {op: selection.choice(op, "cuda").backend for op in ("lamb_step", "quantize_fp8",
                                                                            "dequantize_fp8")}
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except ImportError:
        env["deepspeed"] = "not installed"
    copy_gbs = copy_bandwidth_gbs()
    print(f"{env['gpu']}: device-to-device copy {copy_gbs:.0f} GB/s; backends {env['backends']}", flush=True)
    scale = 4 if args.quick else 1
    reps = 10 if args.quick else 30
    groups: list[Callable[[], list[Case]]] = [
        lambda: fp8_cases((1 << 28) // scale, 128),
        lambda: lamb_cases(1_300_000_000 // scale, not args.no_deepspeed),
    ]
    cases = run_groups(groups, reps, args.only)
    write_results(args.out, "kernels_optim", env, copy_gbs, cases, title="ds LAMB and fp8 kernels",
                  footer=f"\nDeepSpeed: {env['deepspeed']}. `vs best torch` compares with the fastest torch variant.\n")


if __name__ == "__main__":
    main()
