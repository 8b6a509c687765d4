"""Train a small byte-level GPT on Shakespeare with ds, on CPU or GPU.

    torchrun --nproc-per-node 2 examples/train_gpt.py            # 2 CPU processes
    torchrun --nproc-per-node 2 examples/train_gpt.py --resume   # continue from the checkpoint

The config (examples/ds_config.json) is an ordinary DeepSpeed-format file. Each rank
samples its own random windows of the text; the sampling RNG is part of the checkpoint,
so a resumed run continues exactly where the saved one would have gone.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import ds.core

HERE = Path(__file__).resolve().parent


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).unbind(2)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Byte-level decoder: 256-symbol vocabulary, learned positions, tied embeddings."""

    def __init__(self, *, layers: int, dim: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied with the output layer: keep logits small
        self.position = nn.Parameter(torch.randn(context, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens[:, :-1]) + self.position[: tokens.shape[1] - 1]
        for block in self.blocks:
            x = block(x)
        logits = self.norm(x) @ self.embed.weight.t()
        return F.cross_entropy(logits.float().reshape(-1, 256), tokens[:, 1:].reshape(-1))


def load_corpus(path: Path) -> torch.Tensor:
    return torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()


def sample_batch(corpus: torch.Tensor, batch: int, context: int) -> torch.Tensor:
    starts = torch.randint(0, corpus.numel() - context - 1, (batch,))
    return torch.stack([corpus[s : s + context + 1] for s in starts.tolist()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=HERE / "ds_config.json")
    parser.add_argument("--data", type=Path, default=HERE / "data" / "shakespeare.txt")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints/gpt"))
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    args = parser.parse_args()

    torch.manual_seed(0)  # identical initial weights on every rank
    model = GPT(layers=args.layers, dim=args.dim, heads=args.heads, context=args.context)
    engine, _, _, _ = ds.core.initialize(model=model, config=str(args.config))
    rank = engine.comm.rank
    torch.manual_seed(1000 + rank)  # each rank samples different windows
    if args.resume:
        path, _ = engine.load_checkpoint(args.checkpoint_dir)
        if rank == 0:
            print(f"resumed from {path} at step {engine.global_steps}", flush=True)

    corpus = load_corpus(args.data)
    micro = engine.config.train_micro_batch_size_per_gpu
    first_loss = None
    started = time.perf_counter()
    tokens = 0
    while engine.global_steps < args.steps:
        loss = engine(sample_batch(corpus, micro, args.context).to(engine.comm.device))
        engine.backward(loss)
        engine.step()
        tokens += micro * args.context * engine.mesh.dp_size
        if first_loss is None:
            first_loss = loss.item()
    elapsed = time.perf_counter() - started
    engine.save_checkpoint(args.checkpoint_dir)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        print(
            f"trained {params / 1e6:.2f}M parameters for {engine.global_steps} steps: "
            f"loss {first_loss:.3f} -> {loss.item():.3f} (uniform guess {math.log(256):.3f}), "
            f"{tokens / elapsed:,.0f} tokens/s over {engine.mesh.dp_size} ranks; "
            f"checkpoint in {args.checkpoint_dir}",
            flush=True,
        )


if __name__ == "__main__":
    main()
