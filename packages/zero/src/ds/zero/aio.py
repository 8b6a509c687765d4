"""Asynchronous file I/O for ZeRO-Infinity's disk offload.

Offloading to NVMe only pays when the disk works while the accelerator (or CPU Adam)
computes, and when it runs at the disk's speed rather than the page cache's. So reads
and writes are submitted, not performed: :class:`AsyncIO` hands each request to a
worker that keeps several pieces in flight with the kernel and returns a request id at
once; ``wait(id)`` blocks only when the data is needed::

    with AsyncIO(AioConfig(queue_depth=16)) as io, open_file(path, write=True) as file:
        buffer = aligned_empty(nbytes)
        request = io.submit_write(file, buffer.data_ptr(), nbytes, 0)
        ...                                          # compute meanwhile
        io.wait(request)

Files are opened with ``O_DIRECT`` so the data skips the page cache (which would
otherwise hold a second copy of everything offloaded). ``O_DIRECT`` needs addresses,
sizes and offsets aligned to :data:`ALIGNMENT`; :func:`aligned_empty` makes such buffers,
and a misaligned request is refused with a ``ValueError`` before the kernel sees it. A
file system without ``O_DIRECT`` (tmpfs on older kernels) falls back to buffered I/O
after one warning. :class:`ds.zero.swap.TensorSwapper` handles padding for whole tensors.

The work is done by ds-zero's native extension ``ds.zero._aio`` (io_uring, else Linux
AIO, through raw syscalls). Without it, or where neither kernel interface can start (a
sandbox that forbids them), the same API runs on a pool of Python threads doing
``os.pwrite``/``os.preadv`` after one warning. ``DS_AIO_BACKEND=threads`` forces that
pool; ``io_uring`` or ``linux_aio`` forces one kernel interface.
"""

from __future__ import annotations

import errno
import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ds.core.errors import ConfigError
from ds.zero.host_memory import anonymous_empty, page_locked_empty

ALIGNMENT = 4096
"""Byte alignment of O_DIRECT addresses, sizes and offsets (covers 512 B and 4 KiB blocks)."""

BACKEND_ENV = "DS_AIO_BACKEND"
THREADS = "threads"
BackendName = Literal["auto", "io_uring", "linux_aio", "threads"]

_NATIVE_MODULE = "ds.zero._aio"


def round_up(nbytes: int) -> int:
    """``nbytes`` padded to the next multiple of :data:`ALIGNMENT`."""
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def aligned_empty(nbytes: int, *, pin: bool | None = None) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor whose address is a multiple of :data:`ALIGNMENT`.

    ``pin`` (default: whether CUDA is available) page-locks it so copies to and from the
    GPU run at full speed without a staging copy; buffers of 2 MiB or more sit on huge
    pages where the kernel allows (:func:`ds.zero.host_memory.anonymous_empty` says why).
    """
    if pin is None:
        pin = torch.cuda.is_available()
    if pin:
        return page_locked_empty(nbytes, torch.uint8)
    return anonymous_empty(nbytes)


class AioConfig(BaseModel):
    """How requests are split and how many are in flight at once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    queue_depth: int = Field(default=16, ge=1, le=4096)
    """Pieces handed to the kernel at once (threads of the fallback pool, at most 16)."""
    block_size: int = Field(default=4 << 20, ge=ALIGNMENT, le=1 << 30)
    """Bytes per piece; a request larger than this is split and its pieces overlap."""
    backend: BackendName | None = None
    """None: ``$DS_AIO_BACKEND`` if set, else ``auto`` (io_uring, Linux AIO, threads)."""

    @field_validator("block_size")
    @classmethod
    def _aligned(cls, value: int) -> int:
        if value % ALIGNMENT:
            raise ValueError(f"block_size must be a multiple of {ALIGNMENT}, got {value}")
        return value


# ---------------------------------------------------------------------------- files


@dataclass(frozen=True)
class OpenFile:
    """A file descriptor opened for offload I/O; ``direct`` says whether O_DIRECT took."""

    fd: int
    path: Path
    direct: bool

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> OpenFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_buffered_warned: set[str] = set()


def open_file(path: str | os.PathLike[str], *, write: bool, direct: bool = True) -> OpenFile:
    """Open ``path`` for reading, or for reading and writing (created if missing).

    ``O_DIRECT`` is tried first; a file system that refuses it gets buffered I/O and one
    warning per file system type.
    """
    path = Path(path)
    flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
    flags |= os.O_CLOEXEC
    if direct:
        try:
            return OpenFile(os.open(path, flags | os.O_DIRECT, 0o644), path, True)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            _warn_buffered(path)
    return OpenFile(os.open(path, flags, 0o644), path, False)


def _warn_buffered(path: Path) -> None:
    folder = str(path.parent)
    if folder in _buffered_warned:
        return
    _buffered_warned.add(folder)
    warnings.warn(
        f"The file system of {folder} does not support O_DIRECT; offload files there use "
        "buffered I/O, which passes through the page cache (host memory) and is slower. "
        "Point nvme_path at a folder on a local disk file system (ext4, xfs) instead.",
        RuntimeWarning,
        stacklevel=3,
    )


# ------------------------------------------------------------------------- backends


class IoQueue(Protocol):
    """What both backends provide: the native ``_aio.IoQueue`` and ``aio_threads.ThreadPoolQueue``."""

    @property
    def backend(self) -> str: ...
    def submit_write(self, fd: int, address: int, nbytes: int, offset: int) -> int: ...
    def submit_read(self, fd: int, address: int, nbytes: int, offset: int) -> int: ...
    def wait(self, request: int) -> None: ...
    def done(self, request: int) -> bool: ...
    def wait_all(self) -> None: ...
    @property
    def outstanding(self) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class NativeAio:
    """The loaded extension, or why there is none."""

    module: ModuleType | None
    unavailable_reason: str


@functools.cache
def native_aio() -> NativeAio:
    """Import ``ds.zero._aio`` once per process, recording why when that fails."""
    try:
        return NativeAio(importlib.import_module(_NATIVE_MODULE), "")
    except ImportError as exc:
        return NativeAio(None, f"{type(exc).__name__}: {exc}")


_fallback_warned = False


def _warn_fallback_once(reason: str) -> None:
    global _fallback_warned
    if _fallback_warned:
        return
    _fallback_warned = True
    warnings.warn(
        f"ds-zero's native async I/O is unavailable ({reason}); disk offload falls back to "
        "a pool of Python threads, which keeps fewer requests in flight and is slower. "
        "Reinstall with `pip install --force-reinstall --no-deps ds-zero` on a machine with "
        "a C++ compiler and CMake, allow io_uring or Linux AIO in the sandbox, or set "
        f"{BACKEND_ENV}={THREADS} to choose the fallback explicitly and silence this warning.",
        RuntimeWarning,
        stacklevel=4,
    )


def _resolve_backend(requested: BackendName | None) -> str:
    choice = requested or os.environ.get(BACKEND_ENV, "").strip().lower() or "auto"
    if choice not in ("auto", "io_uring", "linux_aio", THREADS):
        raise ConfigError(f"{BACKEND_ENV}={choice!r} is not a backend; use auto, io_uring, linux_aio or {THREADS}")
    return choice


def _thread_pool(config: AioConfig) -> IoQueue:
    from ds.zero.aio_threads import ThreadPoolQueue  # imports this module: bound lazily

    return ThreadPoolQueue(config.queue_depth, config.block_size)


def make_queue(config: AioConfig) -> IoQueue:
    """The best queue for ``config``: native when possible, the thread pool otherwise.

    Only ``auto`` falls back (with one warning); a backend asked for by name that cannot
    start is an error listing what this machine offers.
    """
    choice = _resolve_backend(config.backend)
    if choice == THREADS:
        return _thread_pool(config)
    native = native_aio()
    if native.module is None:
        if choice != "auto":
            raise ConfigError(f"I/O backend {choice!r} needs ds-zero's native extension, which is "
                              f"unavailable ({native.unavailable_reason}); use {THREADS} or auto")
        _warn_fallback_once(native.unavailable_reason)
        return _thread_pool(config)
    try:
        queue: IoQueue = native.module.IoQueue(config.queue_depth, config.block_size, choice)
    except OSError as exc:
        if choice != "auto":
            available = [*native.module.available_backends(), THREADS]
            raise ConfigError(f"I/O backend {choice!r} cannot start here ({exc}); available: "
                              f"{', '.join(available)}") from exc
        _warn_fallback_once(str(exc))
        return _thread_pool(config)
    return queue


def describe() -> str:
    """One line for ``ds report``: which backend disk offload uses here and why."""
    choice = _resolve_backend(None)
    native = native_aio()
    if choice == THREADS:
        return f"aio: thread pool (forced by {BACKEND_ENV})"
    if native.module is None:
        return f"aio: thread pool fallback ({native.unavailable_reason})"
    available = list(native.module.available_backends())
    if not available:
        return "aio: thread pool fallback (neither io_uring nor Linux AIO can start here)"
    return f"aio: native, {choice} -> {available[0] if choice == 'auto' else choice}; can start {', '.join(available)}"


# --------------------------------------------------------------------------- facade

Target = OpenFile | int


class AsyncIO:
    """Submit reads and writes of raw memory; wait for them by id.

    ``target`` is an :class:`OpenFile` or a plain file descriptor. The memory at
    ``address`` must stay alive and unchanged (writes) or unread (reads) until ``wait``
    returns. Safe to share between threads.
    """

    def __init__(self, config: AioConfig | None = None) -> None:
        self.config = config or AioConfig()
        self._queue = make_queue(self.config)

    @property
    def backend(self) -> str:
        """``io_uring``, ``linux_aio`` or ``threads``."""
        return str(self._queue.backend)

    def submit_write(self, target: Target, address: int, nbytes: int, offset: int) -> int:
        return int(self._queue.submit_write(_fd(target), address, nbytes, offset))

    def submit_read(self, target: Target, address: int, nbytes: int, offset: int) -> int:
        return int(self._queue.submit_read(_fd(target), address, nbytes, offset))

    def wait(self, request: int) -> None:
        """Block until ``request`` is done; raises its ``OSError`` if it failed."""
        self._queue.wait(request)

    def done(self, request: int) -> bool:
        return bool(self._queue.done(request))

    def wait_all(self) -> None:
        self._queue.wait_all()

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet waited for."""
        return int(self._queue.outstanding)

    def close(self) -> None:
        """Finish every request in flight, then release the worker."""
        self._queue.close()

    def __enter__(self) -> AsyncIO:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _fd(target: Target) -> int:
    return target.fd if isinstance(target, OpenFile) else int(target)
