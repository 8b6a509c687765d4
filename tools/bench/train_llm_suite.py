"""Run tools/bench/train_llm.py for several modes and micro-batches, and tabulate.

    python tools/bench/train_llm_suite.py --out DIR [--gpus 1 2] [--modes torch fsdp2 ds-zero3 ...]
        [--sweep-micro-batch 4,8,16 | --micro-batch 4] [--timeout 600] [--device cuda|cpu]
        [any train_llm.py option: --model 6.7b --compile --activation-checkpointing --grad-accum 8 ...]

Every (GPU count, mode, micro-batch) runs in its own ``torchrun --standalone`` process
group, in its own session, killed whole after ``--timeout`` seconds, so peak memory is its
own and nothing it leaves behind holds the GPU for the next run (Inductor's on-disk cache is
shared: a layer graph compiled once loads in seconds in later runs with the same shapes).
A sweep stops growing a mode's micro-batch at its first failure; running out of GPU
memory is recorded as ``oom``, anything else with the tail of its output, and the suite
goes on with the next mode. DeepSpeed modes are skipped on ``--device cpu``.

Writes DIR/train_llm.json (every run and the versions) and DIR/train_llm.md: per GPU
count and mode, the best micro-batch with its ratios to DeepSpeed with the same stage and
offload and to FSDP2 (each at its own best micro-batch), then every run. Per-run output
and records stay under DIR/runs/.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import train_llm
from train_llm_modes import MODES

HERE = Path(__file__).resolve().parent
DEFAULT_MODES = ["torch", "fsdp2", "deepspeed-zero2", "deepspeed-zero3", "ds-zero0", "ds-zero1", "ds-zero2", "ds-zero3"]
TAIL_LINES = 60
Record = dict[str, Any]


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "absent"


def _micro_batches(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers, e.g. 4,8,16") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give at least one micro-batch, each >= 1")
    return values


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )  # no abbreviations: every option it does not know goes to train_llm.py as written
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1], help="processes per run (GPUs, or CPU ranks)")
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=sorted(MODES), metavar="MODE")
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--sweep-micro-batch", type=_micro_batches, help="e.g. 4,8,16: stop at a mode's first failure")
    sizes.add_argument("--micro-batch", type=int, help="one micro-batch for every mode (default 4)")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per run before it is killed")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--append", action="store_true", help="add to DIR/train_llm.json's runs instead of replacing")
    args, passthrough = parser.parse_known_args(argv)
    args.micro_batches = args.sweep_micro_batch or [args.micro_batch or 4]
    return args, passthrough


def _environment(gpus: int) -> dict[str, str]:
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    # torchrun pins OMP_NUM_THREADS to 1 for several ranks, which would starve CPU Adam under offload.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // gpus)))
    return env


def _tail(log: Path) -> list[str]:
    return log.read_text(errors="replace").splitlines()[-TAIL_LINES:] if log.exists() else []


def _failure(tail: list[str], returncode: int | None) -> str:
    """One line saying why a run failed."""
    if returncode is None:
        return "timed out"
    text = "\n".join(tail)
    if "SIGKILL" in text or returncode in (-9, 137):
        return "killed by SIGKILL (host out of memory?)"
    own = [line for line in tail if "torch.distributed.elastic" not in line and "ChildFailedError" not in line]
    error = next((line for line in reversed(own) if "Error" in line or "error:" in line), "")
    return error.strip()[:300] or f"exit status {returncode}"


def run_one(mode: str, gpus: int, micro_batch: int, args: argparse.Namespace, passthrough: list[str]) -> Record:
    runs = args.out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stem = f"{len(list(runs.glob('*.log'))):03d}_{gpus}gpu_{mode}_mb{micro_batch}"  # unique with --append
    results, log = runs / f"{stem}.jsonl", runs / f"{stem}.log"
    results.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
        str(HERE / "train_llm.py"), "--mode", mode, "--micro-batch", str(micro_batch), "--device", args.device,
        "--out", str(results), *passthrough,
    ]  # fmt: skip
    with log.open("w") as output:
        proc = subprocess.Popen(command, env=_environment(gpus), stdout=output, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        try:
            returncode: int | None = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and every rank it started
            proc.wait()
            returncode = None
    records = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    ran = {"options": " ".join(passthrough), "log": f"runs/{log.name}"}
    oom = next((r for r in records if r.get("status") == "oom"), None)
    if oom is not None:
        return {**oom, **ran}
    if returncode == 0 and records:
        return {**records[-1], **ran}
    tail = _tail(log)
    error = _failure(tail, returncode)
    status = "oom" if "out of memory" in error.lower() and "host" not in error else "error"  # raised as another type
    return {"mode": mode, "gpus": gpus, "micro_batch": micro_batch, **_requested(passthrough), "status": status,
            "error": error, "error_tail": "\n".join(tail), **ran}  # fmt: skip


def _requested(passthrough: list[str]) -> Record:
    """The model and flags a run was asked for, so a run that failed is reported under them."""
    args = train_llm.parse_args(["--mode", "ds-zero2", "--out", "-", *passthrough])
    return {"model": args.model, "grad_accum": args.grad_accum, "compile": args.compile,
            "activation_checkpointing": args.activation_checkpointing, "ds_kernels": args.ds_kernels}


def sweep(mode: str, gpus: int, args: argparse.Namespace, passthrough: list[str]) -> list[Record]:
    """Run ``mode`` at each micro-batch in turn until one fails (a larger one would fail too)."""
    records = []
    for micro_batch in args.micro_batches:
        record = run_one(mode, gpus, micro_batch, args, passthrough)
        records.append(record)
        print(f"{gpus} x {mode} mb {micro_batch}: {_summary(record)}", flush=True)
        if record["status"] != "ok":
            break
    return records


def _summary(record: Record) -> str:
    if record["status"] == "ok":
        mfu = f", MFU {100 * record['mfu']:.1f}%" if record.get("mfu") is not None else ""
        return f"{record['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU{mfu}"
    return f"{record['status']}: {record.get('error', '')}"


def best_runs(records: list[Record]) -> dict[tuple[int, str, str], Record]:
    """Per (GPUs, mode, model): the fastest successful run, else the first failure."""
    best: dict[tuple[int, str, str], Record] = {}
    for record in records:
        key = (record["gpus"], record["mode"], record.get("model", ""))
        held = best.get(key)
        if held is None or (record["status"] == "ok" and (
            held["status"] != "ok" or record["tokens_per_s_per_gpu"] > held["tokens_per_s_per_gpu"]
        )):  # fmt: skip
            best[key] = record
    return best


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _ratio(record: Record, other: Record | None) -> str:
    if other is None or other["status"] != "ok":
        return ""
    return f"{record['tokens_per_s_per_gpu'] / other['tokens_per_s_per_gpu']:.2f}x"


def _flags(record: Record) -> str:
    flags = [name for key, name in (("compile", "compile"), ("activation_checkpointing", "ckpt")) if record.get(key)]
    if record.get("ds_kernels", "none") != "none":
        flags.append(f"ds-kernels={record['ds_kernels']}")
    return "+".join(flags) or "eager"


def best_table(records: list[Record]) -> str:
    best = best_runs(records)
    rows = [
        "| GPUs | mode | model | flags | mb | accum | tokens/s per GPU | MFU | peak GPU GiB | host peak GiB "
        "| vs DeepSpeed same stage | vs FSDP2 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (gpus, mode, model), r in best.items():
        if r["status"] != "ok":
            rows.append(f"| {gpus} | {mode} | {model} | {_flags(r)} | {r['micro_batch']} | {r.get('grad_accum', '')} "
                        f"| {r['status']}: {r.get('error', '')[:120]} | | | | | |")  # fmt: skip
            continue
        peer_name = MODES[mode].peer
        peer = best.get((gpus, peer_name, model)) if peer_name else None
        fsdp = best.get((gpus, "fsdp2", model))
        mfu = _number(100 * r["mfu"] if r.get("mfu") is not None else None, ".1f")
        rows.append(
            f"| {gpus} | {mode} | {model} | {_flags(r)} | {r['micro_batch']} | {r['grad_accum']} "
            f"| {r['tokens_per_s_per_gpu']:,.0f} | {mfu}{'%' if mfu else ''} | {_number(r['peak_memory_gib'], '.1f')} "
            f"| {_number(r['host_peak_gib'], '.1f')} | {_ratio(r, peer)} | {_ratio(r, fsdp)} |"
        )
    return "\n".join(rows) + "\n"


def runs_table(records: list[Record]) -> str:
    rows = ["| GPUs | mode | model | flags | mb | accum | result | peak GPU GiB | host peak GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in records:
        peak = _number(r.get("peak_memory_gib"), ".1f")
        rows.append(f"| {r['gpus']} | {r['mode']} | {r.get('model', '')} | {_flags(r)} | {r['micro_batch']} "
                    f"| {r.get('grad_accum', '')} | {_summary(r)[:160]} | {peak} "
                    f"| {_number(r.get('host_peak_gib'), '.1f')} |")  # fmt: skip
    return "\n".join(rows) + "\n"


def _shapes(records: list[Record]) -> str:
    """One line per model measured (a suite may run several with --append)."""
    shapes = {r["model"]: r for r in records if r["status"] == "ok"}
    return (
        "; ".join(
            f"{name}: hidden {r['hidden']}, {r['layers']} layers, {r['heads']} heads, SwiGLU {r['ffn']}, vocabulary "
            f"{r['vocab']}, sequence {r['seq']}, {r['warmup']} warm-up + {r['steps']} timed optimizer steps"
            for name, r in shapes.items()
        )
        or "no run succeeded"
    )


def report(records: list[Record], args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    first = next((r for r in records if r["status"] == "ok"), {})
    options = sorted({r.get("options", "") for r in records})
    meta = {
        "date": date.today().isoformat(),
        "gpu": first.get("gpu", "unknown"),
        "host_ram_gib": first.get("host_ram_gib"),
        "torch": _version("torch"),
        "ds-core": _version("ds-core"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "micro_batches": args.micro_batches,
        "train_llm_options": options,
    }
    text = (
        f"# Llama-style decoder training throughput ({meta['date']}, {meta['gpu']})\n\n"
        f"torch {meta['torch']}, ds {meta['ds-core']}, DeepSpeed {meta['deepspeed']}, transformers "
        f"{meta['transformers']}; host RAM {_number(meta['host_ram_gib'], '.0f')} GiB. {_shapes(records)}. "
        "bf16 with fp32 master weights and bf16 gradient reductions, AdamW, clipping 1.0, random tokens; a mode's "
        "micro-batch sweep stops at its first failure. "
        f"train_llm.py options: {', '.join(f'`{o}`' if o else 'defaults' for o in options)}. "
        "MFU = tokens/s x (6 N_matmul + 12 L h s) / 989 TFLOP/s (recomputation not counted). Host peak: "
        "VmHWM summed over ranks. Ratios compare each mode's best run with the peer's best (same GPUs and model).\n\n"
        "## Best run per mode\n\n" + best_table(records) + "\n## Every run\n\n" + runs_table(records)
    )
    return meta, text


def main(argv: list[str] | None = None) -> None:
    args, passthrough = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    modes = args.modes
    if args.device == "cpu":
        skipped = [m for m in modes if MODES[m].needs_deepspeed]
        modes = [m for m in modes if m not in skipped]
        if skipped:
            print(f"skipping {', '.join(skipped)}: DeepSpeed runs on CUDA only", flush=True)
    earlier = args.out / "train_llm.json"
    records = json.loads(earlier.read_text())["records"] if args.append and earlier.exists() else []
    records += [record for gpus in args.gpus for mode in modes for record in sweep(mode, gpus, args, passthrough)]
    meta, text = report(records, args)
    (args.out / "train_llm.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    (args.out / "train_llm.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
