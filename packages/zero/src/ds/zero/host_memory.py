"""Host buffers for offload: page-aligned, huge-page backed, and page-locked at their exact size.

torch's pinned allocator (``pin_memory=True``) rounds every block up to the next power of
two and keeps it cached: a 134 MB bucket of fp32 master weights locks 256 MB. Across a 6.7B
model's masters and gradients that cost ~40 GB of host memory, which is the difference
between fitting a 128 GB host and not. Here a private anonymous mapping of whole pages is
registered with CUDA (``cudaHostRegister``) instead, so the locked bytes are the bytes asked
for, and it is unregistered when the tensor that owns it goes.
"""

from __future__ import annotations

import contextlib
import mmap
import warnings
import weakref
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ds.zero.config import OffloadConfig

HUGE_PAGE = 2 << 20
PAGE = mmap.PAGESIZE


def pin_host_memory(offload: OffloadConfig) -> bool:
    """Whether an offload section's host buffers are page-locked: ``pin_memory`` asks for it,
    and it only helps (and only exists) with a CUDA device to copy to."""
    return offload.pin_memory and torch.cuda.is_available()


def anonymous_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 tensor on fresh anonymous pages, huge-page aligned when large.

    Huge pages (where the kernel allows them) matter for O_DIRECT and for page-locking, both
    of which pin every page of a buffer: 2 MiB pages instead of 4 KiB ones nearly doubled the
    disk read rate of ``tools/bench/aio.py`` on a virtio disk. The mapping is private (shared
    anonymous maps are shmem, which THP mostly skips), advised before first touch, and lives
    as long as the last view of the tensor.
    """
    align = HUGE_PAGE if nbytes >= HUGE_PAGE else PAGE
    region = mmap.mmap(-1, max(nbytes, 1) + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if align == HUGE_PAGE:
        with contextlib.suppress(AttributeError, OSError):  # no THP on this platform or kernel
            region.madvise(mmap.MADV_HUGEPAGE)
    storage = torch.frombuffer(region, dtype=torch.uint8)
    start = -storage.data_ptr() % align
    return storage[start:start + nbytes]


def page_locked_empty(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose exact pages are locked for fast, asynchronous copies.

    ``non_blocking`` copies between it and a GPU are asynchronous, as from torch's pinned
    tensors. Where CUDA refuses the registration (a container's locked-memory limit, a
    driver without host registration) it warns and falls back to torch's pinned allocator.
    """
    nbytes = numel * dtype.itemsize
    whole_pages = -(-max(nbytes, 1) // PAGE) * PAGE
    buffer = anonymous_empty(whole_pages)
    cudart = torch.cuda.cudart()
    address = buffer.data_ptr()
    try:
        torch.cuda.check_error(cudart.cudaHostRegister(address, whole_pages, 0))
    except torch.cuda.CudaError as error:
        warnings.warn(
            f"could not page-lock {whole_pages} bytes of host memory ({error}); using torch's pinned "
            "allocator, which rounds each buffer up to a power of two. Raise the locked-memory limit "
            "(ulimit -l) to avoid the overhead.",
            RuntimeWarning,
            stacklevel=2,
        )
        return torch.empty(numel, dtype=dtype, pin_memory=True)
    tensor = buffer[:nbytes].view(dtype)
    # Runs as the tensor object dies, before its storage (and the mapping) is released; a view
    # that outlives it keeps the memory, unlocked, which only makes its copies synchronous.
    unregister = weakref.finalize(tensor, cudart.cudaHostUnregister, address)
    unregister.atexit = False  # the process's exit releases everything anyway
    return tensor


def host_empty(numel: int, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """An uninitialised CPU tensor, page-locked when ``pin`` (which needs CUDA)."""
    return page_locked_empty(numel, dtype) if pin else torch.empty(numel, dtype=dtype)
