"""The tensor swapper: named tensors round-trip through real files on every path (in place,
bounced, pipelined through a pool smaller than the tensor), reads start before the data is
asked for, and buffer pressure never loses data."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from ds.zero._native import resolve_isa
from ds.zero.aio import AioConfig, native_aio
from ds.zero.cpu_optim_ops import AdamScalars, adam_update_
from ds.zero.state_swap import SwappedStates
from ds.zero.swap import SwapConfig, TensorSwapper

BACKENDS = ["threads", *(["io_uring"] if native_aio().module is not None else [])]


def random_tensor(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=generator) + 0.5).to(dtype)  # never zero


@pytest.fixture(params=BACKENDS)
def swapper(request: pytest.FixtureRequest, tmp_path: Path):
    config = SwapConfig(buffer_count=3, buffer_bytes=64 * 1024,
                        aio=AioConfig(queue_depth=4, block_size=32 * 1024, backend=request.param))
    with TensorSwapper(tmp_path / "swap", config) as swapper:
        yield swapper


@pytest.mark.parametrize("numel", [1, 1023, 1025, 65_537, 250_003])
@pytest.mark.parametrize("layout", ["aligned", "unaligned"])
def test_round_trip(swapper: TensorSwapper, numel: int, layout: str) -> None:
    # 250_003 fp32 elements are ~1 MB: five times the pool, so bounced transfers pipeline.
    source = random_tensor((numel,), seed=numel)
    if layout == "aligned":
        tensor = swapper.empty((numel,)).copy_(source)
        out = swapper.empty((numel,)).zero_()
    else:
        tensor = torch.empty(numel + 1)[1:].copy_(source)
        out = torch.zeros(numel + 1)[1:]
    swapper.swap_out("weights", tensor).wait()
    swapper.swap_in("weights", out).wait()
    assert torch.equal(out, source)


def test_shapes_dtypes_and_non_contiguous_sources(swapper: TensorSwapper) -> None:
    tensors = {
        "matrix.T": random_tensor((37, 53), seed=1).t(),
        "bf16": random_tensor((3, 1001), seed=2, dtype=torch.bfloat16),
        "int64": torch.arange(1, 9999, dtype=torch.int64),
        "empty": torch.empty(0, 4),
    }
    handles = [swapper.swap_out(name, tensor) for name, tensor in tensors.items()]
    for handle in handles:
        handle.wait()
    assert sorted(swapper.names()) == sorted(tensors)
    for name, tensor in tensors.items():
        out = torch.empty(tensor.shape, dtype=tensor.dtype)
        swapper.swap_in(name, out).wait()
        assert torch.equal(out, tensor), name


def test_prefetch_into_pool_then_swap_in(swapper: TensorSwapper) -> None:
    a, b = random_tensor((100_000,), seed=3), random_tensor((5000,), seed=4)
    swapper.swap_out("a", a).wait()
    swapper.swap_out("b", b).wait()
    swapper.prefetch("a")  # ~400 KB into a 192 KB pool: the rest is read during swap_in
    swapper.prefetch("b")
    out_a, out_b = torch.zeros_like(a), torch.zeros_like(b)
    handle_b = swapper.swap_in("b", out_b)
    swapper.swap_in("a", out_a).wait()
    handle_b.wait()
    assert torch.equal(out_a, a) and torch.equal(out_b, b)


def test_prefetch_in_place_runs_in_the_background(swapper: TensorSwapper) -> None:
    """The read completes while the caller only polls ``done()``, which drives no I/O: a
    backend that needed ``wait()`` to make progress would spin here until the deadline.
    (No bound on how long ``prefetch`` takes to return: on a loaded 2-core machine that
    measured the scheduler, not the swapper.)"""
    numel = 8 << 20  # 32 MB
    source = swapper.empty((numel,)).copy_(random_tensor((numel,), seed=5))
    swapper.swap_out("big", source).wait()
    out = swapper.empty((numel,)).zero_()
    started = time.perf_counter()
    swapper.prefetch("big", out)
    handle = swapper.swap_in("big", out)
    while not handle.done():
        assert time.perf_counter() - started < 60, "the prefetch made no progress without wait()"
        time.sleep(0.0005)
    handle.wait()
    assert torch.equal(out, source)


def test_buffer_pressure_never_loses_data(swapper: TensorSwapper) -> None:
    tensors = {f"t{i}": random_tensor((40_000 + 7 * i,), seed=10 + i) for i in range(4)}
    for name, tensor in tensors.items():
        swapper.swap_out(name, tensor)  # no waits: writes hold the pool
    swapper.prefetch("t0")  # takes what the writes left
    swapper.prefetch("t1")
    replacement = random_tensor((50_001,), seed=99)
    handle = swapper.swap_out("t2", replacement)  # drops prefetched pieces for buffers
    tensors["t2"] = replacement
    handle.wait()
    for name in ["t3", "t1", "t0", "t2"]:
        out = torch.zeros_like(tensors[name])
        swapper.swap_in(name, out).wait()
        assert torch.equal(out, tensors[name]), name


def test_read_after_write_sees_the_new_data(swapper: TensorSwapper) -> None:
    first, second = random_tensor((3000,), seed=20), random_tensor((3000,), seed=21)
    swapper.swap_out("x", first).wait()
    swapper.prefetch("x")
    swapper.swap_out("x", second)  # the stale prefetch is dropped, the write not awaited
    out = torch.zeros(3000)
    swapper.swap_in("x", out).wait()
    assert torch.equal(out, second)


def test_bad_requests_are_explained(swapper: TensorSwapper, tmp_path: Path) -> None:
    with pytest.raises(KeyError, match="swap_out it first"):
        swapper.swap_in("missing", torch.zeros(3))
    swapper.swap_out("y", random_tensor((10,), seed=30)).wait()
    with pytest.raises(ValueError, match="float64 of shape"):
        swapper.swap_in("y", torch.zeros(10, dtype=torch.float64))
    swapper.prefetch("y", torch.zeros(10))
    with pytest.raises(ValueError, match="prefetched into another tensor"):
        swapper.swap_in("y", torch.zeros(10))


def test_a_failed_read_is_reported_and_the_swapper_goes_on(swapper: TensorSwapper) -> None:
    big, small = random_tensor((100_000,), seed=50), random_tensor((1000,), seed=51)
    swapper.swap_out("big", big).wait()
    swapper.swap_out("small", small).wait()
    (file,) = [path for path in swapper.folder.iterdir() if path.name.startswith("big-")]
    with open(file, "r+b") as damaged:
        damaged.truncate(100_000)  # as if the disk lost the end of the file
    handle = swapper.swap_in("big", torch.zeros_like(big))
    with pytest.raises(OSError, match="file ends before the requested range"):
        handle.wait()
    out = torch.zeros_like(small)
    swapper.swap_in("small", out).wait()  # every pool buffer came back
    assert torch.equal(out, small)


def test_close_deletes_the_files(tmp_path: Path) -> None:
    swapper = TensorSwapper(tmp_path / "swap")
    swapper.swap_out("z", random_tensor((100,), seed=40))
    assert len(list((tmp_path / "swap").iterdir())) == 1
    swapper.close()
    assert list((tmp_path / "swap").iterdir()) == []


def test_streamed_optimizer_state_matches_torch_adamw(tmp_path: Path) -> None:
    numels = [1000, 4097, 33, 20_000, 5]
    params = [random_tensor((numel,), seed=60 + i) for i, numel in enumerate(numels)]
    reference = [param.clone().requires_grad_(True) for param in params]
    torch_adamw = torch.optim.AdamW(reference, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    states = SwappedStates(tmp_path / "states", numels, names=("param", "exp_avg", "exp_avg_sq"),
                           initial={"exp_avg": 0.0, "exp_avg_sq": 0.0},
                           config=SwapConfig(aio=AioConfig(queue_depth=4, block_size=8192)))
    for index, param in enumerate(params):
        states.write(index, {"param": param})
    isa = resolve_isa()
    for step in range(1, 4):
        grads = [random_tensor((numel,), seed=100 * step + i) - 1.0 for i, numel in enumerate(numels)]
        for param, grad in zip(reference, grads):
            param.grad = grad
        torch_adamw.step()
        scalars = AdamScalars.for_step(step=step, lr=1e-2, betas=(0.9, 0.99), eps=1e-8,
                                       weight_decay=0.1, decoupled_weight_decay=True)
        order = range(len(numels)) if step % 2 else reversed(range(len(numels)))
        visited = []
        for index, state in states.stream(order):
            visited.append(index)
            adam_update_(state["param"], grads[index], state["exp_avg"], state["exp_avg_sq"], scalars, isa=isa)
        assert visited == list(range(len(numels)))[:: 1 if step % 2 else -1]
    for index, param in enumerate(reference):
        saved = states.read(index)
        torch.testing.assert_close(saved["param"], param.detach(), rtol=1e-6, atol=0)
        torch.testing.assert_close(saved["exp_avg_sq"], torch_adamw.state[param]["exp_avg_sq"], rtol=1e-6, atol=0)
    states.close()


def test_leaving_a_stream_early_keeps_the_state_on_disk_consistent(tmp_path: Path) -> None:
    states = SwappedStates(tmp_path / "states", [300, 300, 300], names=("sum",), initial=1.0)
    for index, state in states.stream():
        state["sum"].add_(1.0)
        if index == 1:
            break  # sub-group 1 is not written back
    assert [states.read(i)["sum"].unique().tolist() for i in range(3)] == [[2.0], [1.0], [1.0]]
    with pytest.raises(ValueError, match="holds fp32 states"):
        states.write(0, {"sum": torch.zeros(299)})
    states.close()
