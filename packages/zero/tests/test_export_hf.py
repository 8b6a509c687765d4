"""``ds checkpoint export`` of a ZeRO-3 checkpoint of real ``transformers`` models.

Two ranks train a tiny randomly initialised model (built from a config, nothing
downloads) at stage 3 and save; the engine stores the model's Hugging Face config in
the checkpoint, so the export folder alone loads with ``AutoModelForCausalLM``. Its
logits must equal the trained engine's (fp32: 1e-5), in one file and sharded, with tied
input/output embeddings (the tied ``lm_head.weight`` is not exported; transformers
re-ties it) and without. The export streams, so its memory stays far below the size of
the checkpoint it exports.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from ds.core.checkpoint import CheckpointReader, TensorShard, save_checkpoint
from ds.core.cli import main as ds_main
from ds.core.testing import run_distributed

VOCAB, SEQ, STEPS = 64, 12, 4
WORLD = 2


@pytest.fixture
def needs_transformers() -> None:
    pytest.importorskip("transformers")


def _model(arch: str) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    if arch == "llama-tied":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=SEQ, tie_word_embeddings=True,
        )
        return transformers.LlamaForCausalLM(config)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=SEQ, tie_word_embeddings=False,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config)


def _tokens(batch: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def _train_and_save(arch: str, checkpoint_dir: str) -> dict[str, Any]:
    """Per rank: train at stage 3, save, and return the engine's logits on held-out tokens."""
    import torch.distributed as dist

    import ds.core

    config = {
        "train_batch_size": 4,
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
        "steps_per_print": 1000,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, _, _, _ = ds.core.initialize(model=_model(arch), config=config)
    rank = dist.get_rank()
    for step in range(STEPS):
        micro = _tokens(4, seed=step).chunk(WORLD)[rank]
        engine.backward(engine(input_ids=micro, labels=micro).loss)
        engine.step()
    engine.save_checkpoint(checkpoint_dir)
    engine.eval()
    with torch.no_grad():
        logits = engine(input_ids=_tokens(2, seed=100)).logits
    return {"logits": logits, "names": sorted(engine.partitioner.gather_full_parameters())}


def _load(folder: Path) -> torch.nn.Module:
    import transformers

    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert all(not keys for keys in info.values()), info  # nothing missing, unexpected or resized
    return model.eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=_tokens(2, seed=100)).logits


@pytest.mark.usefixtures("needs_transformers")
@pytest.mark.parametrize("arch", ["llama-tied", "gpt2-untied"])
def test_export_loads_in_transformers_with_the_engines_logits(arch: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    results = run_distributed(_train_and_save, WORLD, arch, str(checkpoint))
    trained = results[0]["logits"]
    torch.testing.assert_close(results[1]["logits"], trained, rtol=0, atol=0)
    untrained = _logits(_model(arch).eval())
    assert (trained - untrained).abs().max() > 1e-2  # training moved the weights

    single = tmp_path / "single"
    assert ds_main(["checkpoint", "export", str(checkpoint), str(single)]) == 0
    assert sorted(p.name for p in single.iterdir()) == ["config.json", "model.safetensors"]
    model = _load(single)
    torch.testing.assert_close(_logits(model), trained, rtol=1e-5, atol=1e-5)

    sharded = tmp_path / "sharded"
    assert ds_main(["checkpoint", "export", str(checkpoint), str(sharded), "--max-shard-size", "16KB"]) == 0
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 3 and all((sharded / f).stat().st_size <= 16_000 + 4096 for f in files)
    assert sorted(index["weight_map"]) == results[0]["names"]
    torch.testing.assert_close(_logits(_load(sharded)), trained, rtol=1e-5, atol=1e-5)

    if arch == "llama-tied":
        assert "lm_head.weight" not in index["weight_map"]
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert "lm_head.weight" in index["weight_map"]


@pytest.mark.usefixtures("needs_transformers")
def test_bf16_export_loads_as_bf16(tmp_path: Path) -> None:
    """``--dtype bf16`` halves the files and the config tells transformers to load bf16."""
    model = _model("llama-tied")
    shards = [TensorShard.full(f"model/{name}", p.detach()) for name, p in model.named_parameters()]
    hf_config = json.loads(model.config.to_json_string(use_diff=False))
    save_checkpoint(tmp_path / "checkpoint", "step1", shards=shards, metadata={"hf_config": hf_config},
                    rank=0, world_size=1, barrier=lambda: None)
    out = tmp_path / "bf16"
    assert ds_main(["checkpoint", "export", str(tmp_path / "checkpoint"), str(out), "--dtype", "bf16"]) == 0
    loaded = _load(out)
    assert loaded.dtype == torch.bfloat16
    with CheckpointReader(tmp_path / "checkpoint") as reader:
        expected = reader.read_full("model/model.norm.weight").to(torch.bfloat16)
    assert torch.equal(loaded.model.norm.weight, expected)


def _anonymous_memory() -> int:
    """Bytes of this process's anonymous resident memory.

    Not peak RSS: the reader memory-maps the checkpoint, and the pages it touches count
    as (file-backed, reclaimable) resident memory although nothing holds them in RAM.
    """
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


def _export_memory_growth(checkpoint: str, out: str, max_shard_size: str) -> int:
    """In a fresh process: peak anonymous memory growth while exporting, sampled every ms."""
    ds_main(["checkpoint", "list", checkpoint])  # import what the command uses first
    baseline = peak = _anonymous_memory()
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _anonymous_memory())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        assert ds_main(["checkpoint", "export", checkpoint, out, "--max-shard-size", max_shard_size]) == 0
    finally:
        done.set()
        sampler.join()
    return max(peak, _anonymous_memory()) - baseline


def test_export_memory_stays_far_below_the_checkpoint(tmp_path: Path) -> None:
    # 100 tensors of 4 MB (400 MB), each cut unevenly in two as two ranks would write it.
    layers, rows, cols = 100, 1000, 1000
    shards = []
    for i in range(layers):
        flat = torch.full((rows * cols,), float(i))
        cut = rows * cols * 2 // 5 + 1
        shards += [TensorShard(f"model/layers.{i}.weight", (rows, cols), flat[:cut], 0),
                   TensorShard(f"model/layers.{i}.weight", (rows, cols), flat[cut:], cut)]
    save_checkpoint(tmp_path / "checkpoint", "big", shards=shards, metadata={}, rank=0, world_size=1,
                    barrier=lambda: None)
    total = layers * rows * cols * 4
    del shards, flat

    for max_shard_size, files in (("50MB", 9), ("10GB", 1)):
        out = tmp_path / f"export-{max_shard_size}"
        (growth,) = run_distributed(_export_memory_growth, 1, str(tmp_path / "checkpoint"), str(out), max_shard_size)
        assert growth < total / 4, f"export with --max-shard-size {max_shard_size} grew by {growth / 2**20:.0f} MiB"
        written = sorted(out.glob("*.safetensors"))
        assert len(written) == files
        with safe_open(written[-1], framework="pt") as last:
            name = sorted(last.keys())[-1]
            assert torch.equal(last.get_tensor(name), torch.full((rows, cols), float(name.split(".")[1])))
