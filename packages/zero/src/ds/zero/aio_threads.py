"""The fallback backend of :mod:`ds.zero.aio`: blocking ``pwrite``/``preadv`` on a thread pool.

Used when the native extension is missing or no kernel async I/O interface can start,
or when ``DS_AIO_BACKEND=threads`` asks for it. It keeps the native queue's contract:
the same request checks (so a misaligned O_DIRECT request fails the same way), requests
split into ``block_size`` pieces that run concurrently, short transfers continued, and
ids waited for once. ``os.pwrite`` and ``os.preadv`` release the GIL, so the pool
overlaps with the caller's compute, with at most 16 requests in flight.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ds.zero.aio import ALIGNMENT, THREADS

_MAX_THREADS = 16


def _check_request(fd: int, address: int, nbytes: int, offset: int, *, write: bool) -> None:
    """The checks the native queue makes, so both backends refuse the same requests."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    mode = flags & os.O_ACCMODE
    if mode == (os.O_RDONLY if write else os.O_WRONLY):
        raise ValueError(f"fd {fd} is not open for {'writing' if write else 'reading'}")
    if offset < 0 or nbytes < 0:
        raise ValueError(f"offset and nbytes must be >= 0, got {offset} and {nbytes}")
    if address == 0 and nbytes > 0:
        raise ValueError("address is null")
    if flags & os.O_DIRECT and (address % ALIGNMENT or nbytes % ALIGNMENT or offset % ALIGNMENT):
        raise ValueError(
            f"fd {fd} is open with O_DIRECT, which needs the address, size and offset to be "
            f"multiples of {ALIGNMENT} (got address {address}, size {nbytes}, offset {offset}); "
            "use aligned_empty() buffers and pad the size, or open without O_DIRECT"
        )


def _transfer(fd: int, address: int, nbytes: int, offset: int, write: bool) -> None:
    """One blocking piece, looping over short transfers like the native worker."""
    done = 0
    while done < nbytes:
        view = memoryview((ctypes.c_char * (nbytes - done)).from_address(address + done)).cast("B")
        moved = os.pwrite(fd, view, offset + done) if write else os.preadv(fd, [view], offset + done)
        if moved == 0:
            what = "the file ends before the requested range" if not write else "the kernel wrote nothing"
            raise OSError(errno.ENODATA if not write else errno.EIO,
                          f"{'write' if write else 'read'} of {nbytes} bytes at offset {offset} "
                          f"on fd {fd} failed: {what}")
        done += moved


class ThreadPoolQueue:
    """The fallback backend: pieces run as blocking pwrite/preadv calls on a thread pool."""

    backend = THREADS

    def __init__(self, queue_depth: int, block_size: int) -> None:
        self.queue_depth = queue_depth
        self.block_size = block_size
        self._pool = ThreadPoolExecutor(min(queue_depth, _MAX_THREADS), thread_name_prefix="ds-aio")
        self._requests: dict[int, list[Future[None]]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _submit(self, fd: int, address: int, nbytes: int, offset: int, write: bool) -> int:
        _check_request(fd, address, nbytes, offset, write=write)
        pieces = [
            self._pool.submit(_transfer, fd, address + start, min(self.block_size, nbytes - start),
                              offset + start, write)
            for start in range(0, nbytes, self.block_size)
        ]
        with self._lock:
            request = next(self._ids)
            self._requests[request] = pieces
        return request

    def submit_write(self, fd: int, address: int, nbytes: int, offset: int) -> int:
        return self._submit(fd, address, nbytes, offset, True)

    def submit_read(self, fd: int, address: int, nbytes: int, offset: int) -> int:
        return self._submit(fd, address, nbytes, offset, False)

    def _pieces(self, request: int, *, forget: bool) -> list[Future[None]]:
        with self._lock:
            pieces = self._requests.pop(request, None) if forget else self._requests.get(request)
        if pieces is None:
            raise ValueError(f"unknown request id {request}: it was never submitted or was already waited for")
        return pieces

    def wait(self, request: int) -> None:
        errors = [piece.exception() for piece in self._pieces(request, forget=True)]
        first = next((error for error in errors if error is not None), None)
        if first is not None:
            raise first

    def done(self, request: int) -> bool:
        return all(piece.done() for piece in self._pieces(request, forget=False))

    def wait_all(self) -> None:
        with self._lock:
            requests = sorted(self._requests)
        failures = []
        for request in requests:
            try:
                self.wait(request)
            except OSError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]

    @property
    def outstanding(self) -> int:
        with self._lock:
            return len(self._requests)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
