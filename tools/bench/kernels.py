"""Benchmark ds's fused CUDA kernels against torch eager, torch.compile and DeepSpeed.

    python tools/bench/kernels.py --out benchmarks/results [--quick] [--no-deepspeed]

Every memory-bound op is timed with CUDA events (median of many runs after warm-up, on
inputs far larger than L2) and reported as time, achieved GB/s (the fewest bytes the op
must move: each input read once, each output written once) and the fraction of the card's
measured device-to-device copy bandwidth. Results go to ``kernels-<gpu>-<date>.json`` and
``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

Fn = Callable[[], Any]


@dataclass
class Case:
    """One op at one size: the bytes it must move and the implementations to time."""

    name: str
    bytes_moved: int
    variants: dict[str, Fn]
    results_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def time_ms(fn: Fn, *, warmup: int = 3, reps: int = 20) -> float:
    """Milliseconds per call over ``reps`` back-to-back calls between two events.

    The CPU queues calls ahead of the GPU, as in training, so what is measured is the
    kernels; timing each call between its own events (with a sync after each) also counted
    the op's host-side launch cost, ~20-50 us for a Python launcher, on 0.2 ms kernels.
    Every input here is larger than the L2 cache, so repeating a call reads from memory.
    """
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def copy_bandwidth_gbs() -> float:
    src = torch.randn(1 << 28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps=30)
    return 2 * src.numel() * 4 / ms / 1e6


def compiled(fn: Callable[..., Any]) -> Callable[..., Any]:
    return torch.compile(fn, dynamic=False)


def norm_cases(rows: int, hidden: int) -> list[Case]:
    dt = torch.bfloat16
    x = torch.randn(rows, hidden, device="cuda", dtype=dt, requires_grad=True)
    w = (torch.rand(hidden, device="cuda", dtype=dt) + 0.5).requires_grad_()
    b = torch.randn(hidden, device="cuda", dtype=dt, requires_grad=True)
    g = torch.randn(rows, hidden, device="cuda", dtype=dt)
    n = rows * hidden * 2
    rms_c, ln_c = compiled(F.rms_norm), compiled(F.layer_norm)
    y_rms = F.rms_norm(x, (hidden,), w, 1e-6)
    y_rms_c = rms_c(x, (hidden,), w, 1e-6)
    y_ln = F.layer_norm(x, (hidden,), w, b, 1e-5)
    y_ln_c = ln_c(x, (hidden,), w, b, 1e-5)
    shape = f"[{rows}x{hidden}] bf16"
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    return [
        Case(f"rms_norm fwd {shape}", 2 * n, {
            "ds": lambda: torch.ops.ds.rms_norm(xd, wd, 1e-6),
            "torch eager": lambda: F.rms_norm(xd, (hidden,), wd, 1e-6),
            "torch.compile": lambda: rms_c(xd, (hidden,), wd, 1e-6),
        }),
        Case(f"rms_norm bwd {shape}", 3 * n, {
            "ds": lambda: torch.ops.ds.rms_norm_backward(g, xd, wd, 1e-6),
            "torch eager": lambda: torch.autograd.grad(y_rms, (x, w), g, retain_graph=True),
            "torch.compile": lambda: torch.autograd.grad(y_rms_c, (x, w), g, retain_graph=True),
        }),
        Case(f"layer_norm fwd {shape}", 2 * n, {
            "ds": lambda: torch.ops.ds.layer_norm(xd, wd, bd, 1e-5),
            "torch eager": lambda: F.layer_norm(xd, (hidden,), wd, bd, 1e-5),
            "torch.compile": lambda: ln_c(xd, (hidden,), wd, bd, 1e-5),
        }),
        Case(f"layer_norm bwd {shape}", 3 * n, {
            "ds": lambda: torch.ops.ds.layer_norm_backward(g, xd, wd, bd, 1e-5),
            "torch eager": lambda: torch.autograd.grad(y_ln, (x, w, b), g, retain_graph=True),
            "torch.compile": lambda: torch.autograd.grad(y_ln_c, (x, w, b), g, retain_graph=True),
        }),
    ]


def swiglu_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def bias_gelu_torch(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + bias, approximate="tanh")


def activation_cases(rows: int, hidden: int) -> list[Case]:
    dt = torch.bfloat16
    x = torch.randn(rows, 2 * hidden, device="cuda", dtype=dt, requires_grad=True)
    g = torch.randn(rows, hidden, device="cuda", dtype=dt)
    h = torch.randn(rows, hidden, device="cuda", dtype=dt, requires_grad=True)
    bias = torch.randn(hidden, device="cuda", dtype=dt, requires_grad=True)
    n = rows * hidden * 2
    swiglu_c, bias_gelu_c = compiled(swiglu_torch), compiled(bias_gelu_torch)
    y_sw, y_sw_c = swiglu_torch(x), swiglu_c(x)
    y_bg, y_bg_c = bias_gelu_torch(h, bias), bias_gelu_c(h, bias)
    shape = f"[{rows}x{hidden}] bf16"
    xd, hd, bd = x.detach(), h.detach(), bias.detach()
    return [
        Case(f"swiglu fwd {shape}", 3 * n, {
            "ds": lambda: torch.ops.ds.swiglu(xd),
            "torch eager": lambda: swiglu_torch(xd),
            "torch.compile": lambda: swiglu_c(xd),
        }),
        Case(f"swiglu bwd {shape}", 5 * n, {
            "ds": lambda: torch.ops.ds.swiglu_backward(g, xd),
            "torch eager": lambda: torch.autograd.grad(y_sw, x, g, retain_graph=True),
            "torch.compile": lambda: torch.autograd.grad(y_sw_c, x, g, retain_graph=True),
        }),
        Case(f"bias_gelu fwd {shape}", 2 * n, {
            "ds": lambda: torch.ops.ds.bias_gelu(hd, bd, "tanh"),
            "torch eager": lambda: bias_gelu_torch(hd, bd),
            "torch.compile": lambda: bias_gelu_c(hd, bd),
        }),
        Case(f"bias_gelu bwd {shape}", 3 * n, {
            "ds": lambda: torch.ops.ds.bias_gelu_backward(g, hd, bd, "tanh"),
            "torch eager": lambda: torch.autograd.grad(y_bg, (h, bias), g, retain_graph=True),
            "torch.compile": lambda: torch.autograd.grad(y_bg_c, (h, bias), g, retain_graph=True),
        }),
    ]


def quantize_cases(numel: int, group: int) -> list[Case]:
    from ds.kernels.cuda import opdefs

    x = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    quant_c = compiled(opdefs.quantize_blockwise)
    dequant_c = compiled(opdefs.dequantize_blockwise)
    cases = []
    for bits, symmetric in ((8, True), (4, False)):
        codes, scales, offsets = torch.ops.ds.quantize_blockwise(x, group, bits, symmetric)
        meta = (numel // group) * 4 * (1 if symmetric else 2)
        code_bytes = numel * bits // 8
        label = f"int{bits} {'sym' if symmetric else 'asym'} g{group} [{numel}] bf16"
        cases.append(Case(f"quantize {label}", 2 * numel + code_bytes + meta, {
            "ds": lambda b=bits, s=symmetric: torch.ops.ds.quantize_blockwise(x, group, b, s),
            "torch eager": lambda b=bits, s=symmetric: opdefs.quantize_blockwise(x, group, b, s),
            "torch.compile": lambda b=bits, s=symmetric: quant_c(x, group, b, s),
        }))
        args = (codes, scales, offsets, numel, group, bits, symmetric, torch.bfloat16)
        cases.append(Case(f"dequantize {label}", 2 * numel + code_bytes + meta, {
            "ds": lambda a=args: torch.ops.ds.dequantize_blockwise(*a),
            "torch eager": lambda a=args: opdefs.dequantize_blockwise(*a),
            "torch.compile": lambda a=args: dequant_c(*a),
        }))
    return cases


def adam_cases(total_params: int, with_deepspeed: bool) -> list[Case]:
    tensor_numel = 4096 * 4096
    count = max(1, total_params // tensor_numel)
    params = [torch.randn(tensor_numel, device="cuda") for _ in range(count)]
    grads = [torch.randn(tensor_numel, device="cuda") * 1e-3 for _ in range(count)]
    m = [torch.zeros(tensor_numel, device="cuda") for _ in range(count)]
    v = [torch.zeros(tensor_numel, device="cuda") for _ in range(count)]
    hyper = {"lr": 1e-4, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01, "step": 10,
             "adamw": True, "bias_correction": True}
    n = count * tensor_numel
    modules = [torch.nn.Parameter(p) for p in params]
    for p, g in zip(modules, grads):
        p.grad = g
    torch_fused = torch.optim.AdamW(modules, lr=1e-4, weight_decay=0.01, fused=True)
    torch_foreach = torch.optim.AdamW(modules, lr=1e-4, weight_decay=0.01, foreach=True)
    variants: dict[str, Fn] = {
        "ds": lambda: torch.ops.ds.adam_step(params, grads, m, v, [], **hyper),
        "torch fused": torch_fused.step,
        "torch foreach": torch_foreach.step,
    }
    errors = {}
    if with_deepspeed:
        try:
            from deepspeed.ops.adam import FusedAdam

            deepspeed_adam = FusedAdam(modules, lr=1e-4, weight_decay=0.01, adam_w_mode=True)
            variants["deepspeed FusedAdam"] = deepspeed_adam.step
        except Exception as exc:  # noqa: BLE001 - report why DeepSpeed could not be timed
            errors["deepspeed FusedAdam"] = f"{type(exc).__name__}: {exc}"[:500]
    # fp32 params, grads and moments: 16 bytes read and 12 written per parameter.
    case = Case(f"adamw step {n / 1e9:.2f}B params fp32", 28 * n, variants, errors=errors)

    low = [torch.empty(tensor_numel, device="cuda", dtype=torch.bfloat16) for _ in range(count)]
    grads16 = [g.to(torch.bfloat16) for g in grads]
    mixed = Case(f"adamw step {n / 1e9:.2f}B params, bf16 grads + bf16 copy", 28 * n, {
        "ds": lambda: torch.ops.ds.adam_step(params, grads16, m, v, low, **hyper),
    })
    return [case, mixed]


def run_case(case: Case, reps: int) -> None:
    for label, fn in case.variants.items():
        try:
            case.results_ms[label] = time_ms(fn, reps=reps)
        except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the others
            case.errors[label] = f"{type(exc).__name__}: {exc}"[:500]
        torch.cuda.synchronize()


def environment() -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "gpu": props.name, "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    try:
        from ds.kernels.cuda.plugin import LIBRARY

        LIBRARY.load()
        info["ds_kernels_cuda_build"] = LIBRARY.build_info()
    except Exception as exc:  # noqa: BLE001
        info["ds_kernels_cuda_build"] = f"unavailable: {exc}"
    return info


def markdown(env: dict[str, Any], copy_gbs: float, cases: list[Case]) -> str:
    lines = [
        f"# ds kernels on {env['gpu']}", "",
        (f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}; "
        f"ds-kernels-cuda build: {env.get('ds_kernels_cuda_build')}"), "",
        (f"Measured device-to-device copy: **{copy_gbs:.0f} GB/s** (bytes read + written). "
        "GB/s counts the fewest bytes each op must move; `of copy` is that over the copy rate."), "",
        "| op | implementation | time (ms) | GB/s | of copy | vs best torch |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        torch_times = [t for k, t in case.results_ms.items() if k != "ds" and not k.startswith("deepspeed")]
        best_torch = min(torch_times) if torch_times else math.nan
        for label, ms in case.results_ms.items():
            gbs = case.bytes_moved / ms / 1e6
            speed = f"{best_torch / ms:.2f}x" if not math.isnan(best_torch) else ""
            lines.append(f"| {case.name} | {label} | {ms:.3f} | {gbs:.0f} | {gbs / copy_gbs:.0%} | {speed} |")
        for label, error in case.errors.items():
            lines.append(f"| {case.name} | {label} | failed: {error[:120]} | | | |")
    return "\n".join(lines) + "\n"


def run_groups(groups: list[Callable[[], list[Case]]], reps: int, only: str = "") -> list[Case]:
    """Time every case whose name contains ``only``, one group's inputs alive at a time."""
    cases: list[Case] = []
    for build in groups:
        built = [case for case in build() if only in case.name]
        for case in built:
            run_case(case, reps)
            print(case.name, {k: round(v, 3) for k, v in case.results_ms.items()}, case.errors or "", flush=True)
        cases.extend(built)
        del built
        torch.cuda.empty_cache()
    return cases


def write_results(out: Path, prefix: str, env: dict[str, Any], copy_gbs: float, cases: list[Case], *,
                  title: str = "ds kernels", extra: dict[str, Any] | None = None, footer: str = "") -> None:
    """``<prefix>-<gpu>-<date>.json`` and ``.md`` under ``out``; the table is printed too."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{prefix}-{env['gpu'].replace(' ', '_')}-{env['date'][:10]}"
    payload = {"environment": env, "copy_gbs": copy_gbs, **(extra or {}),
               "cases": [{"name": c.name, "bytes_moved": c.bytes_moved, "results_ms": c.results_ms,
                          "errors": c.errors} for c in cases]}
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    table = markdown(env, copy_gbs, cases).replace("# ds kernels on", f"# {title} on", 1) + footer
    (out / f"{stem}.md").write_text(table)
    print(table)


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
    env["backends"] = {op: selection.choice(op, "cuda").backend for op in
                       ("rms_norm", "layer_norm", "swiglu", "bias_gelu", "adam_step", "quantize_blockwise")}
    copy_gbs = copy_bandwidth_gbs()
    print(f"{env['gpu']}: device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
    scale = 4 if args.quick else 1
    reps = 10 if args.quick else 30
    # The norms at three hidden sizes with the same bytes per call, to show the trend.
    groups: list[Callable[[], list[Case]]] = [
        lambda: norm_cases(65536 // scale, 2048),
        lambda: norm_cases(32768 // scale, 4096),
        lambda: norm_cases(16384 // scale, 8192),
        lambda: activation_cases(16384 // scale, 8192),
        lambda: quantize_cases((1 << 27) // scale, 128),
        lambda: adam_cases(1_350_000_000 // scale, not args.no_deepspeed),
    ]
    cases = run_groups(groups, reps, args.only)
    write_results(args.out, "kernels", env, copy_gbs, cases)


if __name__ == "__main__":
    main()
