"""ds's data-parallel engine against torch DistributedDataParallel, same model and batch.

    python tools/bench/dp_overhead.py [--world 2] [--steps 40] [--repeats 3]

Both runs use gloo on CPU with one thread per process, the example GPT, AdamW and
fp32; each measures wall time of ``--steps`` optimizer steps after warm-up, and the
best of ``--repeats`` interleaved runs is kept (the machine is shared). Results go to
benchmarks/results/dp_overhead.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))

import ds.core  # noqa: E402
from ds.core.testing import run_distributed  # noqa: E402
from train_gpt import GPT, load_corpus, sample_batch  # noqa: E402

MODEL = {"layers": 4, "dim": 256, "heads": 4, "context": 128}
MICRO_BATCH = 8
WARMUP = 5


def _batches(steps: int) -> list[torch.Tensor]:
    corpus = load_corpus(ROOT / "examples" / "data" / "shakespeare.txt")
    return [sample_batch(corpus, MICRO_BATCH, MODEL["context"]) for _ in range(steps)]


def _ds_rank(steps: int) -> float:
    torch.manual_seed(0)
    config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "steps_per_print": 10**9,
    }
    engine, _, _, _ = ds.core.initialize(model=GPT(**MODEL), config=config)
    batches = _batches(steps + WARMUP)
    for i, batch in enumerate(batches):
        if i == WARMUP:
            dist.barrier()
            started = time.perf_counter()
        engine.backward(engine(batch))
        engine.step()
    dist.barrier()
    return time.perf_counter() - started


def _ddp_rank(steps: int) -> float:
    from ds.core.comm import init_distributed

    init_distributed()
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(GPT(**MODEL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = _batches(steps + WARMUP)
    for i, batch in enumerate(batches):
        if i == WARMUP:
            dist.barrier()
            started = time.perf_counter()
        model(batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    dist.barrier()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()

    times: dict[str, list[float]] = {"ds": [], "ddp": []}
    for _ in range(args.repeats):
        for name, fn in (("ddp", _ddp_rank), ("ds", _ds_rank)):
            times[name].append(max(run_distributed(fn, args.world, args.steps)))
    best = {name: min(values) for name, values in times.items()}
    samples = args.steps * MICRO_BATCH * args.world
    result = {
        "benchmark": "dp_overhead",
        "date": date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        "1 torch thread per process, gloo",
        "torch": torch.__version__,
        "ds": ds.core.__version__,
        "world_size": args.world,
        "model": MODEL,
        "micro_batch": MICRO_BATCH,
        "steps": args.steps,
        "seconds": times,
        "samples_per_s": {name: samples / t for name, t in best.items()},
        "ratio_ds_over_ddp": best["ddp"] / best["ds"],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dp_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    table = (
        f"# Data-parallel overhead: ds engine vs torch DDP ({result['date']})\n\n"
        f"{result['machine']}, world size {args.world}, torch {result['torch']}, ds {result['ds']}; "
        f"GPT {MODEL}, micro-batch {MICRO_BATCH}, fp32 AdamW, best of {args.repeats}.\n\n"
        "| engine | samples/s |\n| --- | --- |\n"
        + "".join(f"| {name} | {value:.1f} |\n" for name, value in result["samples_per_s"].items())
        + f"\nds / DDP throughput: **{result['ratio_ds_over_ddp']:.3f}** (target >= 0.95)\n"
    )
    (args.out / "dp_overhead.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
