"""ds-zero: ZeRO sharding of optimizer state, gradients and parameters, CPU/NVMe offload.

Importing this package loads no native code; the CPU optimizer extension is imported on
first use (see :mod:`ds.zero._native`).
"""

import importlib
from typing import TYPE_CHECKING

from ds.zero.cpu_adam import CPUAdagrad, CPUAdam

if TYPE_CHECKING:
    from ds.zero.gathered import GatheredParameters
    from ds.zero.init import Init

__all__ = ["CPUAdagrad", "CPUAdam", "GatheredParameters", "Init"]

# Model construction imports torch.distributed.tensor (most of a second); loaded on first
# use so that loading the plugin stays cheap.
_LAZY = {"Init": "ds.zero.init", "GatheredParameters": "ds.zero.gathered"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ds.zero' has no attribute {name!r}")
