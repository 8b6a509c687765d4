"""Training throughput of a Llama-style decoder under ds, FSDP2, DeepSpeed and plain torch.

    torchrun --nproc-per-node N tools/bench/train_llm.py --mode ds-zero3 --micro-batch 4 --out r.jsonl

One process group per run, one mode per run (so peak memory is the mode's own). The model
is Hugging Face's ``LlamaForCausalLM`` built from a config with random weights (about
1.3B parameters by default: hidden 2048, 24 layers, 16 heads, SwiGLU 5504, vocabulary
32000), sequence 2048, bf16 compute with fp32 master weights and AdamW in every mode.
Tokens are random: the point is speed, not learning.

MFU = tokens/s per GPU x (6 x N_matmul + 12 x L x h x s) / peak bf16 dense FLOP/s, with
N_matmul the parameters of every linear layer (the LM head included, embeddings not).
Peak: 989 TFLOP/s for H100 SXM and H200.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

MODES = ("torch", "fsdp2", "ds-zero0", "ds-zero1", "ds-zero2", "ds-zero3", "deepspeed-zero2", "deepspeed-zero3")
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}


def build_model(args: argparse.Namespace) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        intermediate_size=args.ffn,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def matmul_params(model: nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def ds_config(stage: int, micro_batch: int) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.1}},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "steps_per_print": 10**9,
        "zero_optimization": {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000,
                              "stage3_prefetch_bucket_size": 50_000_000,
                              "stage3_param_persistence_threshold": 100_000},
    }


def make_step(mode: str, model: nn.Module, micro_batch: int) -> tuple[Any, nn.Module]:
    """Return ``step(tokens) -> loss`` for a mode, and the module it trains."""
    if mode == "torch":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step, model
    if mode == "fsdp2":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=policy)
        fully_shard(model, mp_policy=policy, reshard_after_forward=False)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(tokens: torch.Tensor) -> torch.Tensor:
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss

        return step, model
    stage = int(mode[-1])
    if mode.startswith("ds-"):
        import ds.core

        engine, _, _, _ = ds.core.initialize(model=model, config=ds_config(stage, micro_batch))
    else:
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=ds_config(stage, micro_batch))

    def step(tokens: torch.Tensor) -> torch.Tensor:
        loss = engine(input_ids=tokens, labels=tokens).loss
        engine.backward(loss)
        engine.step()
        return loss

    return step, engine.module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--ffn", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world = dist.get_world_size()
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    n_matmul = matmul_params(model)
    step, _ = make_step(args.mode, model, args.micro_batch)

    generator = torch.Generator(device="cuda").manual_seed(1 + dist.get_rank())
    batches = [torch.randint(0, args.vocab, (args.micro_batch, args.seq), device="cuda", generator=generator)
               for _ in range(4)]
    for i in range(args.warmup):
        step(batches[i % len(batches)])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    dist.barrier()
    started = time.perf_counter()
    for i in range(args.steps):
        loss = step(batches[i % len(batches)])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    peak = torch.tensor(torch.cuda.max_memory_allocated(), device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)

    tokens_per_gpu = args.micro_batch * args.seq * args.steps / elapsed
    flops_per_token = 6 * n_matmul + 12 * args.layers * args.hidden * args.seq
    name = torch.cuda.get_device_name()
    peak_flops = next((v for k, v in PEAK_BF16.items() if k in name), float("nan"))
    if dist.get_rank() == 0:
        record = {
            "mode": args.mode, "gpus": world, "gpu": name, "micro_batch": args.micro_batch, "seq": args.seq,
            "params": n_params, "matmul_params": n_matmul, "tokens_per_s_per_gpu": tokens_per_gpu,
            "mfu": tokens_per_gpu * flops_per_token / peak_flops, "peak_memory_gib": peak.item() / 2**30,
            "step_s": elapsed / args.steps, "final_loss": loss.item(), "torch": torch.__version__,
            "date": date.today().isoformat(),
        }
        with args.out.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
