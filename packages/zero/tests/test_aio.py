"""Async file I/O: every backend round-trips real files, refuses misaligned O_DIRECT requests
and keeps many requests in flight; a missing extension degrades to the thread pool."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from ds.core.errors import ConfigError
from ds.zero.aio import ALIGNMENT, AioConfig, AsyncIO, aligned_empty, native_aio, open_file, round_up

NATIVE = list(native_aio().module.available_backends()) if native_aio().module is not None else []
BACKENDS = [
    *(pytest.param(name) for name in NATIVE),
    *(pytest.param(name, marks=pytest.mark.skip(reason=f"{name} cannot start here"))
      for name in ("io_uring", "linux_aio") if name not in NATIVE),
    "threads",
]


def random_bytes(nbytes: int, seed: int) -> torch.Tensor:
    """Aligned, padded buffer whose first nbytes are random and never all zero."""
    generator = torch.Generator().manual_seed(seed)
    buffer = aligned_empty(round_up(nbytes), pin=False)
    buffer.copy_(torch.randint(1, 256, (buffer.numel(),), dtype=torch.uint8, generator=generator))
    return buffer


@pytest.fixture(params=BACKENDS)
def io(request: pytest.FixtureRequest):
    with AsyncIO(AioConfig(queue_depth=4, block_size=64 * 1024, backend=request.param)) as queue:
        assert queue.backend == request.param
        yield queue


@pytest.mark.parametrize("nbytes", [1, 4095, 4097, 3 * 1_000_003])
def test_round_trip_odd_sizes(io: AsyncIO, tmp_path: Path, nbytes: int) -> None:
    source = random_bytes(nbytes, seed=nbytes)
    padded = round_up(nbytes)
    with open_file(tmp_path / "data.bin", write=True) as file:
        assert file.direct
        io.wait(io.submit_write(file, source.data_ptr(), padded, ALIGNMENT))
    assert os.path.getsize(tmp_path / "data.bin") == ALIGNMENT + padded

    target = aligned_empty(padded, pin=False).zero_()
    with open_file(tmp_path / "data.bin", write=False) as file:
        io.wait(io.submit_read(file, target.data_ptr(), padded, ALIGNMENT))
    assert torch.equal(target[:nbytes], source[:nbytes])


def test_many_requests_in_flight(io: AsyncIO, tmp_path: Path) -> None:
    # 48 requests of 1-40 blocks each against a queue of depth 4: most wait their turn.
    sizes = [ALIGNMENT * (1 + (7 * i) % 40) for i in range(48)]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    source = random_bytes(sum(sizes), seed=1)
    with open_file(tmp_path / "many.bin", write=True) as file:
        requests = [io.submit_write(file, source.data_ptr() + offset, size, offset)
                    for size, offset in zip(sizes, offsets)]
        assert io.outstanding == len(requests)
        for request in reversed(requests):
            io.wait(request)
        target = aligned_empty(source.numel(), pin=False).zero_()
        for size, offset in zip(sizes, offsets):
            io.submit_read(file, target.data_ptr() + offset, size, offset)
        io.wait_all()
    assert io.outstanding == 0
    assert torch.equal(target, source)


def test_requests_progress_without_the_caller(io: AsyncIO, tmp_path: Path) -> None:
    source = random_bytes(8 << 20, seed=2)
    with open_file(tmp_path / "bg.bin", write=True) as file:
        request = io.submit_write(file, source.data_ptr(), source.numel(), 0)
        deadline = time.monotonic() + 30
        while not io.done(request):  # nothing here drives the I/O: a worker must
            assert time.monotonic() < deadline, "the write never completed in the background"
            time.sleep(0.001)
        io.wait(request)


def test_misaligned_direct_requests_are_refused(io: AsyncIO, tmp_path: Path) -> None:
    buffer = aligned_empty(3 * ALIGNMENT, pin=False)
    with open_file(tmp_path / "direct.bin", write=True) as file:
        for address, nbytes, offset in [(buffer.data_ptr() + 1, ALIGNMENT, 0),
                                        (buffer.data_ptr(), ALIGNMENT + 1, 0),
                                        (buffer.data_ptr(), ALIGNMENT, 512)]:
            with pytest.raises(ValueError, match="O_DIRECT"):
                io.submit_write(file, address, nbytes, offset)
    assert os.path.getsize(tmp_path / "direct.bin") == 0


def test_buffered_files_take_any_alignment(io: AsyncIO, tmp_path: Path) -> None:
    source = random_bytes(10_001, seed=3)
    with open_file(tmp_path / "buffered.bin", write=True, direct=False) as file:
        assert not file.direct
        io.wait(io.submit_write(file, source.data_ptr() + 3, 10_001 - 3, 7))
        target = torch.zeros(10_001, dtype=torch.uint8)
        io.wait(io.submit_read(file, target.data_ptr() + 3, 10_001 - 3, 7))
    assert torch.equal(target[3:], source[3:10_001])


def test_errors_name_the_request(io: AsyncIO, tmp_path: Path) -> None:
    buffer = aligned_empty(2 * ALIGNMENT, pin=False)
    with open_file(tmp_path / "short.bin", write=True) as file:
        io.wait(io.submit_write(file, buffer.data_ptr(), ALIGNMENT, 0))
        request = io.submit_read(file, buffer.data_ptr(), 2 * ALIGNMENT, ALIGNMENT)
        with pytest.raises(OSError, match="file ends") as failure:
            io.wait(request)
        assert failure.value.errno == errno.ENODATA
        with pytest.raises(ValueError, match="already waited"):
            io.wait(request)
        io.submit_read(file, buffer.data_ptr(), ALIGNMENT, 0)
        io.submit_read(file, buffer.data_ptr(), ALIGNMENT, 4 * ALIGNMENT)
        with pytest.raises(OSError, match=f"offset {4 * ALIGNMENT}"):
            io.wait_all()
        assert io.outstanding == 0
    with open_file(tmp_path / "short.bin", write=False) as file:
        with pytest.raises(ValueError, match="not open for writing"):
            io.submit_write(file, buffer.data_ptr(), ALIGNMENT, 0)


def test_close_finishes_the_io_in_flight(tmp_path: Path) -> None:
    source = random_bytes(4 << 20, seed=4)
    io = AsyncIO(AioConfig(queue_depth=2, block_size=ALIGNMENT))
    with open_file(tmp_path / "close.bin", write=True) as file:
        io.submit_write(file, source.data_ptr(), source.numel(), 0)
        io.close()
    assert Path(tmp_path / "close.bin").read_bytes() == source.numpy().tobytes()


def test_config_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="multiple of 4096"):
        AioConfig(block_size=5000)
    with pytest.raises(ValidationError):
        AioConfig(queue_depth=0)
    monkeypatch.setenv("DS_AIO_BACKEND", "spdk")
    with pytest.raises(ConfigError, match="DS_AIO_BACKEND='spdk' is not a backend"):
        AsyncIO()
    monkeypatch.setenv("DS_AIO_BACKEND", "threads")
    with AsyncIO() as forced:
        assert forced.backend == "threads"


def test_missing_extension_falls_back_with_one_warning(tmp_path: Path) -> None:
    # A child process where importing the extension fails, as after a broken install.
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.modules["ds.zero._aio"] = None
        import torch
        from ds.core.errors import ConfigError
        from ds.zero.aio import AioConfig, AsyncIO, aligned_empty, open_file, describe
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first, second = AsyncIO(), AsyncIO()
        assert [str(w.message).count("falls back") for w in caught] == [1], caught
        assert first.backend == second.backend == "threads"
        data = aligned_empty(8192, pin=False).fill_(7)
        back = aligned_empty(8192, pin=False).zero_()
        with open_file({str(tmp_path / "f.bin")!r}, write=True) as file:
            first.wait(first.submit_write(file, data.data_ptr(), 8192, 0))
            first.wait(first.submit_read(file, back.data_ptr(), 8192, 0))
        assert torch.equal(data, back)
        try:
            AsyncIO(AioConfig(backend="io_uring"))
        except ConfigError as exc:
            assert "native extension" in str(exc)
        else:
            raise AssertionError("asking for io_uring without the extension must fail")
        print(describe())
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "thread pool fallback" in result.stdout
