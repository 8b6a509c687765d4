"""ds-zero: ZeRO sharding of optimizer state, gradients and parameters, CPU/NVMe offload.

Importing this package loads no native code; the CPU optimizer extension is imported on
first use (see :mod:`ds.zero._native`).
"""

from ds.zero.cpu_adam import CPUAdagrad, CPUAdam

__all__ = ["CPUAdagrad", "CPUAdam"]
