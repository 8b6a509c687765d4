"""ZeRO stages on a CUDA device (one process, NCCL): each stage follows plain data
parallelism's bf16 losses within 2e-2 relative over 10 steps of the parity model, with and
without CPU offload of the optimizer (page-locked host buffers, the staged copy back to the
device, bf16 gradients on the host when the reduction is bf16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ds.core.testing import run_distributed
from ds.core.testing.parity import train_rank

pytestmark = pytest.mark.gpu


def _config(stage: int, offload: str | None = None, reduce_dtype: str | None = None,
            nvme_path: Path | None = None) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
        "bf16": {"enabled": True},
        "gradient_clipping": 1.0,
        "communication_data_type": reduce_dtype,
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 700, "stage3_param_persistence_threshold": 0},
    }
    if offload is not None:
        folder = str(nvme_path) if offload == "nvme" else None
        config["zero_optimization"]["offload_optimizer"] = {"device": offload, "nvme_path": folder, "pin_memory": True}
    return config


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("stage", "offload", "reduce_dtype"),
                         [(1, None, None), (2, None, None), (3, None, None), (1, "cpu", None), (2, "cpu", "fp32"),
                          (3, "cpu", None), (2, "nvme", None), (3, "nvme", None)])
def test_stage_on_cuda_matches_data_parallel(stage: int, offload: str | None, reduce_dtype: str | None,
                                             tmp_path: Path) -> None:
    """Unset, the reduction is bf16 (the compute dtype); one case keeps fp32 host gradients."""
    (reference,) = run_distributed(train_rank, 1, _config(0, reduce_dtype=reduce_dtype), 10)
    (result,) = run_distributed(train_rank, 1, _config(stage, offload, reduce_dtype, tmp_path), 10)
    torch.testing.assert_close(torch.tensor(result[0]), torch.tensor(reference[0]), rtol=2e-2, atol=1e-3)
    for name, ref in reference[1].items():
        assert result[1][name].is_cuda
        torch.testing.assert_close(result[1][name].float(), ref.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("optimizer_offload", ["cpu", "nvme"])
def test_stage3_params_on_disk_match_data_parallel(optimizer_offload: str, tmp_path: Path) -> None:
    """ZeRO-Infinity: parameter shards in files (pageable while in memory, pinned swap buffers),
    the optimizer on the CPU or its moments on disk too; losses and weights within 2e-2 of data
    parallelism."""
    config = _config(3, optimizer_offload, nvme_path=tmp_path / "moments")
    config["zero_optimization"]["offload_param"] = {"device": "nvme", "nvme_path": str(tmp_path / "params"),
                                                    "pin_memory": True}
    (reference,) = run_distributed(train_rank, 1, _config(0), 10)
    (result,) = run_distributed(train_rank, 1, config, 10)
    torch.testing.assert_close(torch.tensor(result[0]), torch.tensor(reference[0]), rtol=2e-2, atol=1e-3)
    for name, ref in reference[1].items():
        assert result[1][name].is_cuda
        torch.testing.assert_close(result[1][name].float(), ref.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("quantized_weights", [False, True])
@pytest.mark.parametrize("stage", [1, 2])
def test_overlapped_refresh_on_two_gpus_matches_the_synchronous_one(stage: int, quantized_weights: bool) -> None:
    """NCCL, 2 processes: with ``overlap_comm`` the all-gathers of a step run on NCCL's stream
    behind the rest of the update and the next forward (the first buckets' gathers issued from a
    side stream); a block that read its weights before they arrived, or a gather that read its
    slice before the update wrote it, would train on stale or half-written weights. The losses
    and weights must equal those of the run that waits inside ``step``, also with qwZ's quantized
    gather (its encode runs on the issuing stream, its decode when a reader waits)."""
    runs = {}
    for overlap in (True, False):
        config = _config(stage)
        config["train_batch_size"] = 8
        config["zero_optimization"]["overlap_comm"] = overlap
        config["zero_optimization"]["zero_quantized_weights"] = quantized_weights
        runs[overlap] = run_distributed(train_rank, 2, config, 10)
    for on, off in zip(runs[True], runs[False], strict=True):
        torch.testing.assert_close(torch.tensor(on[0]), torch.tensor(off[0]), rtol=1e-6, atol=0)
        for name, ref in off[1].items():
            torch.testing.assert_close(on[1][name], ref, rtol=1e-6, atol=0, msg=name)
