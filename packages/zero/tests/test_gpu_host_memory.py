"""Page-locked host buffers (``ds.zero.host_memory``) on a CUDA machine: copies into them
are asynchronous and exact, and they do not come from torch's pinned
pool (which would round 2**27 + 1 floats up to 2**28)."""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import pytest
import torch

from ds.zero.host_memory import PAGE, page_locked_empty

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize(("numel", "dtype"), [(2**27 + 1, torch.float32), (12345, torch.bfloat16), (1, torch.float32)])
def test_page_locked_round_trip(numel: int, dtype: torch.dtype) -> None:
    source = torch.randn(numel, device="cuda").to(dtype)
    host = page_locked_empty(numel, dtype)
    assert host.shape == (numel,) and host.dtype == dtype
    assert host.data_ptr() % PAGE == 0
    host.copy_(source, non_blocking=True)
    back = torch.full_like(source, float("nan"))
    torch.cuda.current_stream().synchronize()
    back.copy_(host, non_blocking=True)
    torch.cuda.current_stream().synchronize()
    assert torch.equal(back, source)


def test_copies_into_page_locked_memory_do_not_wait_for_the_gpu() -> None:
    host = page_locked_empty(2**24, torch.float32)
    source = torch.randn(host.numel(), device="cuda")
    assert _copy_into_returns_at_once(host, source)
    assert torch.equal(host, source.cpu())
    assert not _copy_into_returns_at_once(torch.empty_like(host), source)  # pageable: the check can fail


def _copy_into_returns_at_once(host: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether a device-to-host copy into ``host`` queued behind ~100 ms of GPU work returns
    at once. Into pageable memory it returns only once it is done; into locked memory it is
    queued."""
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)  # ~100 ms of GPU clock cycles
    start = time.perf_counter()
    host.copy_(source, non_blocking=True)
    returned_after = time.perf_counter() - start
    torch.cuda.synchronize()
    return returned_after < 0.03


def test_page_locked_memory_bypasses_torchs_rounding_allocator() -> None:
    """The buffer is registered memory, not a block of torch's pinned pool (which rounds
    2**27 + 1 floats up to 1 GiB); a fallback to that pool would show in its statistics."""
    torch.cuda.init()
    before = _pool_bytes()
    host = page_locked_empty(2**27 + 1, torch.float32)
    assert _pool_bytes() == before
    pool = torch.empty(2**27 + 1, dtype=torch.float32, pin_memory=True)  # the statistic does move
    assert _pool_bytes() > before
    del host, pool
    gc.collect()


def _pool_bytes() -> int:
    stats = torch.cuda.host_memory_stats()
    for key in ("allocated_bytes.current", "allocated_bytes.all.current"):
        if key in stats:
            return int(stats[key])
    raise AssertionError(f"torch's host allocator statistics lack allocated bytes: {sorted(stats)}")


def _stage3_pinned_offload(steps: int, sharded_init: bool) -> dict[str, Any]:
    """Runs in a fresh CUDA process: stage 3 with pinned CPU offload; what holds the shards."""
    from torch.distributed.fsdp import FSDPModule

    import ds.core
    import ds.zero
    from ds.core.testing.parity import global_batches, make_model, train_step
    from ds.zero.host_shards import fsdp_reads_local_shard

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "train_batch_size": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                              "offload_optimizer": {"device": "cpu", "pin_memory": True}},
    }
    if sharded_init:
        with ds.zero.Init(config):
            model = make_model()
    else:
        model = make_model()
    engine, _, _, _ = ds.core.initialize(model=model, config=config)
    losses = [train_step(engine, batch) for batch in global_batches(steps, 2)]
    shards = [p.to_local() for p in model.parameters()]
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    probe = shards[0].detach()
    return {
        "losses": losses,
        "storages": len({s.untyped_storage().data_ptr() for s in shards}),
        "fsdp_units": len(units),
        # The shards the optimizer updated are the memory FSDP2's all-gather reads.
        "fsdp_reads_updated_shards": all(fsdp_reads_local_shard(unit) for unit in units),
        "page_locked": _copy_into_returns_at_once(probe, probe.to("cuda")),
    }


@pytest.mark.parametrize("sharded_init", [False, True], ids=["built-whole", "built-under-init"])
def test_stage3_pinned_shards_are_page_locked_once_per_unit(sharded_init: bool) -> None:
    """Stage 3's offloaded shards share one page-locked buffer per unit, where FSDP2's own
    pinning would give each its own block of torch's pool (rounded up to a power of two)."""
    from ds.core.testing import run_distributed

    (result,) = run_distributed(_stage3_pinned_offload, 1, 3, sharded_init)
    assert all(math.isfinite(loss) for loss in result["losses"])
    assert result["storages"] == result["fsdp_units"]
    assert result["page_locked"] and result["fsdp_reads_updated_shards"]
