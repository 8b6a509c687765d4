"""Training throughput of a Llama-style decoder under ds, FSDP2, DeepSpeed and plain torch.

    torchrun --nproc-per-node N tools/bench/train_llm.py --mode ds-zero3 --micro-batch 4 --out r.jsonl
        [--model 1.3b|6.7b|13b|tiny] [--compile] [--activation-checkpointing] [--grad-accum K]
        [--nvme-path DIR] [--device cuda|cpu] [--profile-steps N]

One process group per run, one mode per run (so peak memory is the mode's own). The model
is Hugging Face's ``LlamaForCausalLM`` built from a preset (``--hidden`` & co. override
single dimensions) with random weights, bf16 compute and bf16 gradient reductions with fp32
master weights and AdamW in every mode (:mod:`train_llm_modes`); tokens are random: the point
is speed, not learning.
``--device cpu`` (gloo) with ``--model tiny`` is the smoke test of the whole path.

Appends one JSON line per run to ``--out``: throughput (tokens/s per GPU over all
micro-batches of the timed steps), MFU, peak GPU memory after warm-up, peak host RSS
summed over ranks (VmHWM: what an offload run needs from the host, construction
included) and the host's RAM. A run that runs out of GPU memory writes a record with
``"status": "oom"`` and exits with status 3, so a sweep knows to stop growing the batch.

MFU = tokens/s per GPU x (6 x N_matmul + 12 x L x h x s) / peak bf16 dense FLOP/s, with
N_matmul the parameters of every linear layer (the LM head included, embeddings not);
recomputation under activation checkpointing is not counted. Peak: 989 TFLOP/s for H100
SXM and H200.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from step_profile import profile_steps
from train_llm_model import (
    PRESETS,
    build_model,
    checkpoint_layers,
    compile_layers,
    flops_per_token,
    matmul_params,
    resolve_shape,
    total_params,
)
from train_llm_modes import MODES, engine_config, make_trainer

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
OOM_EXIT = 3
GIB = 2**30


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--model", choices=sorted(PRESETS), default="1.3b")
    for dim in ("hidden", "layers", "heads", "ffn", "vocab", "seq"):
        parser.add_argument(f"--{dim}", type=int, help=f"override the preset's {dim}")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    parser.add_argument("--compile-backend", default="inductor", help="aot_eager checks composition without codegen")
    parser.add_argument("--ds-kernels", choices=("none", "loss", "all"), default="none",
                        help="ds modes: fused linear cross-entropy (loss) and also injected norm kernels (all)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute each layer in backward")
    parser.add_argument("--nvme-path", type=Path, help="folder on a fast disk for *-offload-nvme modes")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--gpu-memory-gib", type=float,
                        help="cap each rank's GPU memory (e.g. 79 shows an 80 GB H100's fit on a larger card)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps")
    parser.add_argument("--profile-steps", type=int, default=0,
                        help="profile this many steps after the timed ones (CUDA): see step_profile.py")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.device == "cpu" and MODES[args.mode].needs_deepspeed:
        parser.error(f"--mode {args.mode} needs DeepSpeed's CUDA build; run it with --device cuda.")
    if MODES[args.mode].offload == "nvme" and args.nvme_path is None:
        parser.error(f"--mode {args.mode} keeps optimizer state on disk: pass --nvme-path DIR on a fast disk.")
    if min(args.micro_batch, args.grad_accum, args.steps) < 1 or args.warmup < 0:
        parser.error("--micro-batch, --grad-accum and --steps must be >= 1 and --warmup >= 0.")
    return args


def start_process_group(device_type: str) -> torch.device:
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cpu":
        device = torch.device("cpu")
        backend = "gloo"
    else:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # a plain `python train_llm.py` runs as one rank
        os.environ.setdefault("MASTER_PORT", "29511")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    return device


def host_peak_bytes() -> int:
    """This process's peak resident set (VmHWM), pinned host buffers included."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def host_ram_bytes() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    return 0


def _reduce(value: float, device: torch.device, op: dist.ReduceOp.RedOpType) -> float:
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op)
    return float(tensor.item())


def run(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    mode = MODES[args.mode]
    shape = resolve_shape(
        args.model, {dim: getattr(args, dim) for dim in ("hidden", "layers", "heads", "ffn", "vocab", "seq")}
    )
    config = engine_config(mode, micro_batch=args.micro_batch, grad_accum=args.grad_accum, nvme_path=args.nvme_path)
    if config is not None and mode.framework == "ds" and args.ds_kernels != "none":
        config["kernels"] = {"inject": args.ds_kernels == "all", "fused_cross_entropy": True}
    model = build_model(shape, mode, device, config)
    n_params, n_matmul = total_params(model), matmul_params(model)
    if args.activation_checkpointing:
        checkpoint_layers(model)
    if args.compile:
        compile_layers(model, args.compile_backend)
    train = make_trainer(mode, model, device, config)

    generator = torch.Generator(device=device).manual_seed(1 + dist.get_rank())
    window = [
        torch.randint(0, shape.vocab, (args.micro_batch, shape.seq), device=device, generator=generator)
        for _ in range(args.grad_accum)
    ]
    for _ in range(args.warmup):
        train(window)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = train(window)
    final_loss = loss.item()  # waits for the last step on every device
    dist.barrier()
    elapsed = _reduce(time.perf_counter() - started, device, dist.ReduceOp.MAX)
    profile = None
    if args.profile_steps and device.type == "cuda":
        folder = args.out.parent / "profiles" / f"{args.mode}-{dist.get_world_size()}gpu-mb{args.micro_batch}"
        profile = profile_steps(lambda: train(window), args.profile_steps, folder, dist.get_rank())
        profile = {key: value for key, value in profile.items() if not isinstance(value, (dict, list))}

    tokens_per_gpu = args.micro_batch * args.grad_accum * shape.seq * args.steps / elapsed
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), None)
    peak_gpu = (
        _reduce(torch.cuda.max_memory_allocated(device), device, dist.ReduceOp.MAX) / GIB
        if device.type == "cuda"
        else None
    )
    return {
        "status": "ok",
        "tokens_per_s_per_gpu": tokens_per_gpu,
        "mfu": tokens_per_gpu * flops_per_token(shape, n_matmul) / peak_flops if peak_flops else None,
        "peak_memory_gib": peak_gpu,
        "host_peak_gib": _reduce(host_peak_bytes(), device, dist.ReduceOp.SUM) / GIB,
        "step_s": elapsed / args.steps,
        "final_loss": final_loss,
        "profile": profile,
        "params": n_params,
        "matmul_params": n_matmul,
        "gpu": name,
        **shape.model_dump(),
    }


def describe(args: argparse.Namespace) -> dict[str, Any]:
    """What was asked for: the part of a record that exists even when the run fails."""
    return {
        "mode": args.mode,
        "model": args.model,
        "gpus": dist.get_world_size(),
        "device": args.device,
        "micro_batch": args.micro_batch,
        "grad_accum": args.grad_accum,
        "compile": args.compile,
        "ds_kernels": args.ds_kernels,
        "activation_checkpointing": args.activation_checkpointing,
        "gpu_memory_cap_gib": args.gpu_memory_gib,
        "warmup": args.warmup,
        "steps": args.steps,
        "profile_steps": args.profile_steps,
        "host_ram_gib": host_ram_bytes() / GIB,
        "torch": torch.__version__,
        "date": date.today().isoformat(),
    }


def write(out: Path, record: dict[str, Any]) -> None:
    with out.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = start_process_group(args.device)
    if args.gpu_memory_gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_gib * GIB / total), device)
    try:
        result = run(args, device)
    except torch.OutOfMemoryError as error:
        # Ranks may be stuck in a collective with this one; exiting non-zero makes torchrun stop them.
        write(args.out, {**describe(args), "status": "oom", "rank": dist.get_rank(), "error": str(error)[:300]})
        sys.stdout.flush()
        os._exit(OOM_EXIT)
    if dist.get_rank() == 0:
        write(args.out, {**describe(args), **result})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
