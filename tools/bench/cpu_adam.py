"""CPU Adam throughput: ds-zero's CPUAdam against torch's AdamW and DeepSpeed's CPU Adam.

Adam on a CPU is memory-bound: every step reads the fp32 parameter, gradient and both
moments and writes three of them back (28 bytes per parameter, 30 with a bf16 copy). So
besides parameters updated per second this reports bytes moved per second against two
references from the same run. A 1 GB tensor copy understates what the memory system gives
Adam (a copy's destination lines are fetched before being overwritten, traffic its count
leaves out; Adam writes back lines it has just read): Adam kernels show 1.5x its GB/s. The
ceiling row (cpu_adam_ceiling.py) is one fused OpenMP pass over the same buffers with Adam's
reads and writes and only an add per element, interleaved like every implementation: no
Adam moving 28 bytes per parameter can be faster here, so "ours / ceiling" is the share won.

Parameters come as tensors of ``--tensor-elements`` (10M by default, like a model's
large weight matrices), ``--sizes`` in total. Every in-process implementation updates
the same buffers (their optimizer states point at one shared pair of moment tensors), so
a size costs 18 bytes per parameter once, not per implementation. Measurements are
interleaved round by round, so load from other processes hits every implementation
alike; the best round is the headline and the median is reported beside it.

This machine is shared, so each timing also records the process's CPU time, and the
report gives parameters updated per CPU-second (memory stalls included): how much work
a core does while it runs, which stays stable under load where wall-clock time does not.
OpenMP threads are made to sleep rather than spin while idle (``OMP_WAIT_POLICY=PASSIVE``)
so CPU time counts work only; every implementation here runs on the same OpenMP runtime.

DeepSpeed's CPU Adam runs in this process on the same buffers. When this interpreter
cannot import deepspeed, the script re-runs itself under ``--deepspeed-python`` (a venv
made with ``--system-site-packages`` holding ``deepspeed==0.19.8`` and ninja, so ds and
torch come from here; its JIT build of cpu_adam is cached after the first run). Timing
DeepSpeed in a separate process instead would give it other memory pages, which alone
moved results by 10%. DeepSpeed 0.19.8's CPU Adam has no fused low-precision copy, so
its "+ bf16 copy" row adds a separate ``copy_``, as torch's does.

    python tools/bench/cpu_adam.py --out benchmarks/results/cpu_adam
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads

import argparse
import datetime as dt
import functools
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from cpu_adam_ceiling import CEILING, AdamTrafficCeiling
from cpu_adam_report import ratios, render_markdown

from ds.zero import CPUAdam
from ds.zero._native import available_isas, native_extension
from ds.zero.cpu_optim_ops import AdamScalars, adam_update_

BYTES_PER_PARAM = 28  # read param, grad, exp_avg, exp_avg_sq; write param, exp_avg, exp_avg_sq
BYTES_PER_COPY = 2  # the bf16 copy written in the same pass
LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01

REEXEC_ENV = "DS_BENCH_CPU_ADAM_REEXEC"


def _deepspeed_cpu_adam() -> Callable[..., torch.optim.Optimizer] | None:
    """DeepSpeed's CPU Adam class when deepspeed is importable here (its JIT build may run)."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:
        return None
    return DeepSpeedCPUAdam


@dataclass
class Contender:
    """One implementation: a callable that runs ``steps`` full optimizer steps."""

    name: str
    run: Callable[[int], tuple[float, float]]  # wall and CPU seconds per step
    bytes_per_param: int
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def _timed(step: Callable[[], object]) -> Callable[[int], tuple[float, float]]:
    def run(steps: int) -> tuple[float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step()
        return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps

    return run


Moments = list[tuple[torch.Tensor, torch.Tensor]]


def _shared_state(optimizer: torch.optim.Optimizer, moments: Moments) -> None:
    """Point every parameter's state at the shared moment buffers (no extra memory)."""
    params = optimizer.param_groups[0]["params"]
    for param, (exp_avg, exp_avg_sq) in zip(params, moments, strict=True):
        optimizer.state[param] = {"step": torch.tensor(0.0), "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}


def memory_copy_bandwidth(repeats: int = 10) -> float:
    """Read+write bytes per second of copying one 1 GB fp32 tensor (best of ``repeats``)."""
    src = torch.randn(2**28)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _tensor_sizes(total: int, per_tensor: int) -> list[int]:
    sizes = [per_tensor] * (total // per_tensor)
    return sizes + ([total % per_tensor] if total % per_tensor else [])


def bench_size(
    total: int, per_tensor: int, rounds: int, deepspeed: Callable[..., torch.optim.Optimizer] | None, isas: list[str]
) -> dict:
    """Time every contender on ``total`` parameters, interleaved over ``rounds`` rounds."""
    sizes = _tensor_sizes(total, per_tensor)
    params = [torch.randn(n).requires_grad_() for n in sizes]
    grads = [torch.randn(n) for n in sizes]
    for p, grad in zip(params, grads, strict=True):
        p.grad = grad
    moments = [(torch.zeros(n), torch.zeros(n)) for n in sizes]
    copies = [torch.empty(n, dtype=torch.bfloat16) for n in sizes]
    hyper: dict[str, Any] = {"lr": LR, "betas": BETAS, "eps": EPS, "weight_decay": WEIGHT_DECAY}

    contenders = [Contender(CEILING, AdamTrafficCeiling(params, grads, moments).run, BYTES_PER_PARAM)]
    for isa in isas:
        ours = CPUAdam(params, **hyper, isa=isa)
        _shared_state(ours, moments)
        contenders.append(Contender(f"ds CPUAdam [{isa}]", _timed(ours.step), BYTES_PER_PARAM))
        contenders.append(
            Contender(
                f"ds CPUAdam [{isa}] + bf16 copy (fused)",
                _timed(functools.partial(ours.step, low_precision_params=copies)),
                BYTES_PER_PARAM + BYTES_PER_COPY,
            )
        )
    # ZeRO-Offload's own layout: gradients arrive from the accelerator in bf16 (half the
    # PCIe traffic) and the bf16 copy goes back, so a step moves 28 bytes per parameter.
    bf16_grads = [grad.to(torch.bfloat16) for grad in grads]

    def offload_step(isa: str = isas[0]) -> None:
        scalars = AdamScalars.for_step(
            step=1, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, decoupled_weight_decay=True
        )
        for p, grad, (exp_avg, exp_avg_sq), copy in zip(params, bf16_grads, moments, copies, strict=True):
            adam_update_(p.detach(), grad, exp_avg, exp_avg_sq, scalars, isa=isa, low_precision_param=copy)

    contenders.append(
        Contender(
            f"ds adam_update_ [{isas[0]}], bf16 grads + bf16 copy",
            _timed(offload_step),
            BYTES_PER_PARAM - 2 + BYTES_PER_COPY,
        )
    )
    fused = torch.optim.AdamW(params, **hyper, fused=True)
    _shared_state(fused, moments)
    foreach = torch.optim.AdamW(params, **hyper, foreach=True)
    _shared_state(foreach, moments)
    detached = [p.detach() for p in params]

    def fused_then_copy() -> None:
        fused.step()
        torch._foreach_copy_(copies, detached)

    contenders += [
        Contender("torch AdamW fused", _timed(fused.step), BYTES_PER_PARAM),
        Contender("torch AdamW fused + bf16 copy", _timed(fused_then_copy), BYTES_PER_PARAM + BYTES_PER_COPY),
        Contender("torch AdamW foreach", _timed(foreach.step), BYTES_PER_PARAM),
    ]
    if deepspeed is not None:
        theirs = deepspeed(params, **hyper, adamw_mode=True)
        for param, (exp_avg, exp_avg_sq) in zip(params, moments, strict=True):
            theirs.state[param] = {"step": 0, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}

        def deepspeed_then_copy() -> None:
            theirs.step()
            torch._foreach_copy_(copies, detached)

        contenders += [
            Contender("DeepSpeedCPUAdam", _timed(theirs.step), BYTES_PER_PARAM),
            Contender("DeepSpeedCPUAdam + bf16 copy", _timed(deepspeed_then_copy), BYTES_PER_PARAM + BYTES_PER_COPY),
        ]

    steps = max(1, round(3e8 / total))
    for contender in contenders:  # warm-up: first touch of states, thread pools, JIT caches
        contender.run(1)
    for _ in range(rounds):
        for contender in contenders:
            wall, cpu = contender.run(steps)
            contender.wall.append(wall)
            contender.cpu.append(cpu)

    rows = {}
    for c in contenders:
        best, median = min(c.wall), statistics.median(c.wall)
        cpu_median = statistics.median(c.cpu)  # summed over threads
        rows[c.name] = {
            "seconds_per_step_best": best,
            "seconds_per_step_median": median,
            "cpu_seconds_per_step_median": cpu_median,
            "mparams_per_s_best": total / best / 1e6,
            "mparams_per_s_median": total / median / 1e6,
            "mparams_per_cpu_s": total / cpu_median / 1e6,
            "gbytes_per_s_best": total * c.bytes_per_param / best / 1e9,
            "bytes_per_param": c.bytes_per_param,
        }
    return {"total_params": total, "tensors": len(sizes), "steps_per_round": steps, "rounds": rounds, "results": rows}


def _cpu_model() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _parse_count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9}
    text = text.strip().upper()
    return int(float(text[:-1]) * scale[text[-1]]) if text[-1] in scale else int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10M,100M,300M,1B", help="total parameter counts (default: %(default)s)")
    parser.add_argument("--tensor-elements", default="10M", help="elements per tensor")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per size")
    parser.add_argument("--isas", default=None, help="comma-separated ds paths to time (default: the best one)")
    parser.add_argument(
        "--deepspeed-python",
        default="/tmp/dsvenv/bin/python",
        help="interpreter to re-run under when deepspeed is not importable",
    )
    parser.add_argument("--out", default=None, help="write OUT.json and OUT.md")
    args = parser.parse_args(argv)

    if native_extension().module is None:
        print(f"native extension unavailable: {native_extension().unavailable_reason}", file=sys.stderr)
        return 1
    isas = args.isas.split(",") if args.isas else [available_isas()[0]]
    per_tensor = _parse_count(args.tensor_elements)
    notes: list[str] = []
    deepspeed = _deepspeed_cpu_adam()
    can_reexec = not os.environ.get(REEXEC_ENV) and Path(args.deepspeed_python).exists()
    if deepspeed is None and can_reexec:
        os.environ[REEXEC_ENV] = "1"
        os.execv(args.deepspeed_python, [args.deepspeed_python, *sys.argv])
    if deepspeed is None:
        notes.append(
            f"DeepSpeed not measured: not importable here nor under "
            f"{args.deepspeed_python!r} (python -m venv --system-site-packages "
            "/tmp/dsvenv && /tmp/dsvenv/bin/pip install deepspeed==0.19.8 ninja)."
        )

    threads = native_extension().module.max_threads()
    if torch.get_num_threads() != threads:
        notes.append(f"torch uses {torch.get_num_threads()} threads, ds CPUAdam {threads}.")
    load_start = os.getloadavg()
    copy_bandwidth = memory_copy_bandwidth()
    print(f"1 GB copy: {copy_bandwidth / 1e9:.1f} GB/s (read+write)", flush=True)
    sizes = []
    for total in (_parse_count(s) for s in args.sizes.split(",")):
        # Shared by every implementation: param, grad, two moments (16 B) + bf16 copy (2 B).
        need = total * 18
        available = _mem_available_bytes()
        if need > 0.8 * available:
            notes.append(
                f"{total / 1e6:.0f}M parameters skipped: needs {need / 2**30:.1f} GiB, "
                f"{available / 2**30:.1f} GiB available."
            )
            print(notes[-1], flush=True)
            continue
        size = bench_size(total, per_tensor, args.rounds, deepspeed, isas)
        size["ratios"] = ratios(size, isas[0], "mparams_per_s_best")
        size["ratios_cpu_time"] = ratios(size, isas[0], "mparams_per_cpu_s")
        sizes.append(size)
        for name, row in size["results"].items():
            print(
                f"{total / 1e6:6.0f}M  {name:62s} {row['mparams_per_s_best']:6.0f} M/s "
                f"(median {row['mparams_per_s_median']:.0f}, per CPU-s "
                f"{row['mparams_per_cpu_s']:.0f})  {row['gbytes_per_s_best']:5.1f} GB/s",
                flush=True,
            )
        for name, value in size["ratios"].items():
            print(f"{'':8s}{name:62s} {value:.2f}x (per CPU-s {size['ratios_cpu_time'][name]:.2f}x)", flush=True)
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "cores": os.cpu_count(),
            "memory_gib": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
            "load_average_start": [round(x, 2) for x in load_start],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "ds-zero": _version("ds-zero"),
            "deepspeed": _version("deepspeed"),
        },
        "isa": isas[0],
        "available_isas": available_isas(),
        "omp_threads": threads,
        "copy_gbytes_per_s": copy_bandwidth / 1e9,
        "tensor_elements": per_tensor,
        "rounds": args.rounds,
        "adamw": {"lr": LR, "weight_decay": WEIGHT_DECAY},
        "sizes": sizes,
        "notes": notes,
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(render_markdown(report))
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
