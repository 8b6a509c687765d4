"""Run tools/bench/train_llm.py for several modes on this machine's GPUs and tabulate.

    python tools/bench/train_llm_suite.py --out DIR [--gpus 1 2] [--modes torch fsdp2 ds-zero3 ...]
        [--micro-batch 4] [--layers 24] [--steps 10]

Each mode runs in its own ``torchrun`` so peak memory and compile caches are its own. A
mode that fails (out of memory, a missing peer) is recorded with its error and the suite
goes on. Writes DIR/train_llm.jsonl, DIR/train_llm.json and DIR/train_llm.md with the
GPU name, date and versions, and ratios against DeepSpeed and FSDP2 from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_MODES = ["torch", "fsdp2", "deepspeed-zero2", "deepspeed-zero3", "ds-zero0", "ds-zero1", "ds-zero2", "ds-zero3"]


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "absent"


def run_mode(mode: str, gpus: int, args: argparse.Namespace, results: Path) -> dict | None:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={gpus}",
        str(HERE / "train_llm.py"),
        "--mode",
        mode,
        "--micro-batch",
        str(args.micro_batch),
        "--layers",
        str(args.layers),
        "--steps",
        str(args.steps),
        "--out",
        str(results),
    ]
    env = dict(os.environ, NCCL_NVLS_ENABLE="0", PYTHONUNBUFFERED="1")
    before = results.read_text().count("\n") if results.exists() else 0
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    lines = results.read_text().splitlines() if results.exists() else []
    if proc.returncode == 0 and len(lines) > before:
        return json.loads(lines[-1])
    tail = (proc.stdout + proc.stderr)[-3000:]
    print(f"--- {mode} on {gpus} GPU(s) failed (exit {proc.returncode}):\n{tail}", flush=True)
    error = next(
        (line for line in reversed(tail.splitlines()) if "Error" in line), tail.splitlines()[-1] if tail else ""
    )
    return {"mode": mode, "gpus": gpus, "error": error[:300]}


def table(records: list[dict]) -> str:
    rows = [
        "| GPUs | mode | tokens/s per GPU | MFU | peak GiB | vs DeepSpeed same stage | vs FSDP2 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        if "error" in r:
            rows.append(f"| {r['gpus']} | {r['mode']} | failed: {r['error']} | | | | |")
            continue
        same = {x["mode"]: x for x in records if x["gpus"] == r["gpus"] and "error" not in x}
        peer = same.get(f"deepspeed-zero{r['mode'][-1]}") if r["mode"].startswith("ds-zero") else None
        fsdp = same.get("fsdp2")
        ratio = f"{r['tokens_per_s_per_gpu'] / peer['tokens_per_s_per_gpu']:.2f}x" if peer else ""
        vs_fsdp = f"{r['tokens_per_s_per_gpu'] / fsdp['tokens_per_s_per_gpu']:.2f}x" if fsdp else ""
        rows.append(
            f"| {r['gpus']} | {r['mode']} | {r['tokens_per_s_per_gpu']:,.0f} | {100 * r['mfu']:.1f}% | "
            f"{r['peak_memory_gib']:.1f} | {ratio} | {vs_fsdp} |"
        )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, nargs="+", default=[1])
    parser.add_argument("--modes", nargs="+", default=DEFAULT_MODES)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=int, default=420)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "train_llm.jsonl"
    records = [
        record
        for gpus in args.gpus
        for mode in args.modes
        if (record := run_mode(mode, gpus, args, results)) is not None
    ]
    gpu = next((r["gpu"] for r in records if "gpu" in r), "unknown GPU")
    meta = {
        "date": date.today().isoformat(),
        "gpu": gpu,
        "torch": _version("torch"),
        "ds-core": _version("ds-core"),
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "micro_batch": args.micro_batch,
        "layers": args.layers,
        "steps": args.steps,
    }
    (args.out / "train_llm.json").write_text(json.dumps({"meta": meta, "records": records}, indent=2) + "\n")
    text = (
        f"# Llama-style decoder training throughput ({meta['date']}, {gpu})\n\n"
        f"torch {meta['torch']}, ds {meta['ds-core']}, DeepSpeed {meta['deepspeed']}, transformers "
        f"{meta['transformers']}. Hidden 2048, {args.layers} layers, 16 heads, SwiGLU 5504, vocabulary 32000, "
        f"sequence 2048, micro-batch {args.micro_batch}, bf16 with fp32 master weights, AdamW, "
        f"{args.steps} timed steps after 3 warm-up steps. MFU = tokens/s x (6 N_matmul + 12 L h s) / 989 TFLOP/s.\n\n"
        + table(records)
    )
    (args.out / "train_llm.md").write_text(text)
    print(text, flush=True)


if __name__ == "__main__":
    main()
