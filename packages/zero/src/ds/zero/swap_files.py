"""Where a :class:`~ds.zero.swap.TensorSwapper` keeps each named tensor on disk.

One file per name, its name readable and unique (a sanitised prefix and a digest), its
blocks allocated before the first write, and a record of what the file holds so a read
can check its destination and report a failed write.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ds.zero.aio import OpenFile


@dataclass
class SwapFile:
    """What is on disk for one name."""

    path: Path
    dtype: torch.dtype
    shape: torch.Size
    nbytes: int
    error: BaseException | None = None


def file_name(name: str) -> str:
    digest = hashlib.sha1(name.encode()).hexdigest()[:12]
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:80]}-{digest}.swp"


def reserve_blocks(file: OpenFile, nbytes: int) -> None:
    """Allocate the file's blocks up front: extending writes serialise on some file systems."""
    if os.fstat(file.fd).st_size == nbytes:
        return
    os.ftruncate(file.fd, nbytes)
    try:
        os.posix_fallocate(file.fd, 0, nbytes)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
