"""Benchmark ds's Triton kernels against the CUDA-native ones, torch eager and torch.compile.

    python tools/bench/kernels_triton.py --out benchmarks/results [--quick] [--only TEXT]

Memory-bound ops (norms, quantizers) are reported like tools/bench/kernels.py does: time,
GB/s over the fewest bytes the op must move, and the fraction of the card's measured
device-to-device copy bandwidth (target: >= 85%). ``woq_matmul`` at batch 1 and 4 (the
Triton and the CUDA-native kernel) is compared with a bf16 ``F.linear`` of the same shape:
eager (CUDA events around one call, so launch overhead counts) and inside a CUDA graph of 20
calls (GPU time only, as decoding loops run it); target: int4 at least 3x faster than bf16.
Both sides read cold weights, as decoding does (every layer's weight is a different one):
each call takes the next of several weight copies that together exceed twice the L2. The
L2-hot graphed time (one weight, repeated) is an extra column, for information only.
The run also records which backend core's timing picks for each op (``ds report``'s reason).
Results go to ``kernels-triton-<gpu>-<date>.json`` and ``.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels import Case, compiled, copy_bandwidth_gbs, environment, run_groups, time_ms  # noqa: E402

WOQ_SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096), (8192, 28672)]
"""(K, N): x [M, K] times a weight [N, K] (nn.Linear's layout): attention, MLP up, MLP down, a 70B MLP up."""
WOQ_ROWS = (1, 4)
"""M: decoding one sequence, and a batch of four (the CUDA kernels' largest)."""

GRAPH_CALLS = 20


def backend_kernels(op: str) -> dict[str, Callable[..., Any]]:
    """The Triton and CUDA-native implementations of ``op`` that can run here, by label."""
    from ds.kernels.cuda.backend import NativeBackend
    from ds.kernels.cuda.plugin import LIBRARY
    from ds.kernels.cuda.triton_kernels.backend import TritonBackend

    found: dict[str, Callable[..., Any]] = {}
    backends = (TritonBackend("cuda-triton", runtime="cuda", install_hint=""), NativeBackend("cuda-native", LIBRARY))
    for backend in backends:
        if op in backend.ops() and backend.availability(op, "cuda").available:
            try:
                found[backend.name] = backend.implementation(op, "cuda")
            except Exception as exc:  # noqa: BLE001 - reported as the variant's error below
                print(f"{backend.name} {op}: {exc}", file=sys.stderr)
    return found


def with_backends(name: str, bytes_moved: int, op: str, args: tuple[Any, ...], torch_variants: dict[str, Any]) -> Case:
    variants = {label: (lambda f=fn: f(*args)) for label, fn in backend_kernels(op).items()}
    return Case(name, bytes_moved, {**variants, **torch_variants})


def norm_cases(rows: int, hidden: int) -> list[Case]:
    dt = torch.bfloat16
    x = torch.randn(rows, hidden, device="cuda", dtype=dt, requires_grad=True)
    w = (torch.rand(hidden, device="cuda", dtype=dt) + 0.5).requires_grad_()
    b = torch.randn(hidden, device="cuda", dtype=dt, requires_grad=True)
    g = torch.randn(rows, hidden, device="cuda", dtype=dt)
    n = rows * hidden * 2
    rms_c, ln_c = compiled(F.rms_norm), compiled(F.layer_norm)
    y_rms, y_rms_c = F.rms_norm(x, (hidden,), w, 1e-6), rms_c(x, (hidden,), w, 1e-6)
    y_ln, y_ln_c = F.layer_norm(x, (hidden,), w, b, 1e-5), ln_c(x, (hidden,), w, b, 1e-5)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    shape = f"[{rows}x{hidden}] bf16"
    return [
        with_backends(f"rms_norm fwd {shape}", 2 * n, "rms_norm", (xd, wd, 1e-6), {
            "torch eager": lambda: F.rms_norm(xd, (hidden,), wd, 1e-6),
            "torch.compile": lambda: rms_c(xd, (hidden,), wd, 1e-6)}),
        with_backends(f"rms_norm bwd {shape}", 3 * n, "rms_norm_backward", (g, xd, wd, 1e-6), {
            "torch eager": lambda: torch.autograd.grad(y_rms, (x, w), g, retain_graph=True),
            "torch.compile": lambda: torch.autograd.grad(y_rms_c, (x, w), g, retain_graph=True)}),
        with_backends(f"layer_norm fwd {shape}", 2 * n, "layer_norm", (xd, wd, bd, 1e-5), {
            "torch eager": lambda: F.layer_norm(xd, (hidden,), wd, bd, 1e-5),
            "torch.compile": lambda: ln_c(xd, (hidden,), wd, bd, 1e-5)}),
        with_backends(f"layer_norm bwd {shape}", 3 * n, "layer_norm_backward", (g, xd, wd, bd, 1e-5), {
            "torch eager": lambda: torch.autograd.grad(y_ln, (x, w, b), g, retain_graph=True),
            "torch.compile": lambda: torch.autograd.grad(y_ln_c, (x, w, b), g, retain_graph=True)}),
    ]


def quantize_cases(numel: int, group: int) -> list[Case]:
    from ds.kernels.cuda import opdefs

    x = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
    quant_c, dequant_c = compiled(opdefs.quantize_blockwise), compiled(opdefs.dequantize_blockwise)
    cases = []
    for bits, symmetric in ((8, True), (4, False)):
        codes, scales, offsets = opdefs.quantize_blockwise(x, group, bits, symmetric)
        moved = 2 * numel + numel * bits // 8 + (numel // group) * 4 * (1 if symmetric else 2)
        label = f"int{bits} {'sym' if symmetric else 'asym'} g{group} [{numel}] bf16"
        cases.append(with_backends(f"quantize {label}", moved, "quantize_blockwise", (x, group, bits, symmetric), {
            "torch eager": lambda b=bits, s=symmetric: opdefs.quantize_blockwise(x, group, b, s),
            "torch.compile": lambda b=bits, s=symmetric: quant_c(x, group, b, s)}))
        args = (codes, scales, offsets, numel, group, bits, symmetric, torch.bfloat16)
        cases.append(with_backends(f"dequantize {label}", moved, "dequantize_blockwise", args, {
            "torch eager": lambda a=args: opdefs.dequantize_blockwise(*a),
            "torch.compile": lambda a=args: dequant_c(*a)}))
    return cases


def graph_time_ms(fn: Callable[[], Any], reps: int, calls: int = GRAPH_CALLS) -> float:
    """GPU time per call: ``calls`` calls captured in one CUDA graph, replayed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return time_ms(graph.replay, reps=reps) / calls


def cold_copies(*weight: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """``weight`` and enough clones that the others exceed twice the L2: cycling through them, every
    call reads its weight from DRAM, as a decoding step does, where each layer has its own weight."""
    l2_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
    weight_bytes = sum(t.numel() * t.element_size() for t in weight)
    copies = 2 * l2_bytes // weight_bytes + 2
    return [weight] + [tuple(t.clone() for t in weight) for _ in range(copies - 1)]


def rotating(call: Callable[..., Any], operands: list[tuple[torch.Tensor, ...]]) -> Callable[[], Any]:
    """``call`` on the next operands of the cycle at each call (so a CUDA graph's captured calls rotate too)."""
    turn = itertools.cycle(operands)
    return lambda: call(*next(turn))


def graphed_cold_ms(call: Callable[..., Any], copies: list[tuple[torch.Tensor, ...]], reps: int) -> float:
    """GPU ms per ``call`` cycling through ``copies`` inside a CUDA graph of whole cycles (so
    replays continue the cycle and every call reads a weight that is not in L2)."""
    calls = math.ceil(GRAPH_CALLS / len(copies)) * len(copies)
    return graph_time_ms(rotating(call, copies), reps, calls)


def woq_row(m: int, k: int, n: int, reps: int) -> dict[str, Any]:
    """bf16 F.linear and int4/int8 woq_matmul (groups of 128: symmetric, and int4 asymmetric, the
    zero-point form of GPTQ/AWQ checkpoints) of x [M, K] by a [N, K] weight."""
    from ds.kernels.cuda.triton_kernels.opdefs import quantize_weight

    weight = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    # label -> (the call on one weight, the weight operands it takes, weight bytes)
    variants: dict[str, tuple[Callable[..., Any], tuple[torch.Tensor, ...], int]] = {
        "bf16 F.linear": (lambda w: F.linear(x, w), (weight,), 2 * n * k)}
    kernels = backend_kernels("woq_matmul")
    for bits, symmetric in ((4, True), (8, True), (4, False)):
        q, s, o = quantize_weight(weight, bits, 128, symmetric)
        operands = (q, s) if symmetric else (q, s, o)
        name = f"int{bits}" if symmetric else f"int{bits} asym"
        for backend, woq_matmul in kernels.items():
            variants[f"{name} woq_matmul {backend}"] = (
                lambda q, s, o=None, f=woq_matmul, b=bits: f(x, q, s, o, b, 128), operands,
                n * k * bits // 8 + sum(t.numel() * 4 for t in operands[1:]))
    row: dict[str, Any] = {"shape": f"M={m} K={k} N={n}", "results": {}}
    for label, (call, operands, weight_bytes) in variants.items():
        try:
            call(*operands)  # autotunes before any timing or capture
            copies = cold_copies(*operands)
            row["results"][label] = {"eager_ms": time_ms(rotating(call, copies), reps=reps),
                                     "graph_ms": graphed_cold_ms(call, copies, reps),
                                     "graph_l2_hot_ms": graph_time_ms(rotating(call, [operands]), reps),
                                     "weight_bytes": weight_bytes, "weight_copies": len(copies)}
            del copies
        except Exception as exc:  # noqa: BLE001 - one failing variant must not hide the others
            row["results"][label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print(row, flush=True)
    return row


def woq_rows(reps: int) -> list[dict[str, Any]]:
    rows = []
    for m in WOQ_ROWS:
        for k, n in WOQ_SHAPES:
            rows.append(woq_row(m, k, n, reps))
            torch.cuda.empty_cache()
    return rows


def markdown(env: dict[str, Any], copy_gbs: float, cases: list[Case], woq: list[dict[str, Any]]) -> str:
    lines = [
        f"# ds Triton kernels on {env['gpu']}", "",
        f"{env['date']}; torch {env['torch']} (CUDA {env['cuda']}), triton {env.get('triton')}, "
        f"Python {env['python']}", "",
        f"Device-to-device copy: **{copy_gbs:.0f} GB/s** (read + written); target >= 85% of it.", "",
        "| op | implementation | time (ms) | GB/s | of copy | vs best torch |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for case in cases:
        torch_times = [t for label, t in case.results_ms.items() if label.startswith("torch")]
        best_torch = min(torch_times) if torch_times else math.nan
        for label, ms in case.results_ms.items():
            gbs = case.bytes_moved / ms / 1e6
            lines.append(f"| {case.name} | {label} | {ms:.3f} | {gbs:.0f} | {gbs / copy_gbs:.0%} | "
                         f"{best_torch / ms:.2f}x |")
        lines += [f"| {case.name} | {label} | failed: {error[:120]} | | | |" for label, error in case.errors.items()]
    lines += ["", "## woq_matmul at batch 1 and 4 vs bf16 (target: int4 >= 3x)", "",
              "Cold weights on both sides, as in decoding: every call reads its weight from memory (the timing "
              "loops cycle through weight copies totalling more than twice the L2). The last column, one weight "
              "repeated and so served from L2 where it fits, is for information and enters no ratio.", "",
              "| shape | implementation | eager ms | graphed ms | weight GB/s (graphed) | of copy | vs bf16 graphed "
              "| graphed ms, L2-hot (info) |",
              "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in woq:
        base = row["results"].get("bf16 F.linear", {}).get("graph_ms", math.nan)
        for label, result in row["results"].items():
            if "error" in result:
                lines.append(f"| {row['shape']} | {label} | failed: {result['error'][:120]} | | | | | |")
                continue
            gbs = result["weight_bytes"] / result["graph_ms"] / 1e6
            lines.append(f"| {row['shape']} | {label} | {result['eager_ms']:.4f} | {result['graph_ms']:.4f} | "
                         f"{gbs:.0f} | {gbs / copy_gbs:.0%} | {base / result['graph_ms']:.2f}x | "
                         f"{result['graph_l2_hot_ms']:.4f} |")
    lines += ["", "## Backend core's timing picks on this card", ""]
    lines += [f"- {op}: {reason}" for op, reason in env["selection"].items()]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions")
    parser.add_argument("--only", default="", help="time only the cases whose name contains this text")
    args = parser.parse_args()

    from ds.core.kernels import install_kernels
    from ds.kernels.cuda.triton_kernels.backend import KERNELS

    selection = install_kernels()  # times cuda-triton against cuda-native where both run an op
    env = environment()
    env["selection"] = {op: f"{selection.choice(op, 'cuda').backend} ({selection.choice(op, 'cuda').reason})"
                        for op in KERNELS}
    copy_gbs = copy_bandwidth_gbs()
    print(f"{env['gpu']}: device-to-device copy {copy_gbs:.0f} GB/s", flush=True)
    scale = 4 if args.quick else 1
    reps = 10 if args.quick else 30
    cases = run_groups([lambda: norm_cases(32768 // scale, 4096), lambda: quantize_cases((1 << 27) // scale, 128)],
                       reps, args.only)
    woq = woq_rows(reps) if args.only in "woq_matmul" else []

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-triton-{env['gpu'].replace(' ', '_')}-{env['date'][:10]}"
    payload = {"environment": env, "copy_gbs": copy_gbs, "woq_matmul_decode": woq,
               "cases": [{"name": c.name, "bytes_moved": c.bytes_moved, "results_ms": c.results_ms,
                          "errors": c.errors} for c in cases]}
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=2))
    table = markdown(env, copy_gbs, cases, woq)
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
