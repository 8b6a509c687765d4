"""The fastest any CPU Adam can be here: Adam's reads and writes with no arithmetic.

An Adam step over fp32 tensors reads param, grad, exp_avg and exp_avg_sq and writes param,
exp_avg and exp_avg_sq: 28 bytes per parameter whatever the arithmetic. This module times a
single fused pass with exactly that access pattern and only an add per element (``p += g;
m += g; v += g``) over the benchmark's own buffers, so no Adam kernel with that traffic can
beat it on this machine, and an implementation's distance from it is all there is to win.

The loop is a few lines of C compiled at run time with the system compiler (``$CC``, else
gcc; ``-O3 -march=native -fopenmp``) and called through ctypes: acceptable for a dev-only
benchmark, and the best ceiling found. torch.compile was tried first and its inductor C++
backend does emit the right kernel, one vectorised OpenMP loop reading each stream once,
which alone runs as fast as this one; but calling it through the compiled function costs
about 55 us of Python a call, and on the 2-core Xeon VM of the 2026-11-27 results that
made a 10M-element pass 5% slower than this loop (median 1258 against 1322 M params/s over
25 interleaved rounds): a ceiling below what the memory system gives. Eager mode is no
ceiling at all: three separate passes read ``g`` three times (36 bytes per parameter).

The loop runs ``torch.get_num_threads()`` threads on torch's own OpenMP runtime (the
library's libgomp.so.1 resolves to the one torch has loaded), like every contender in
cpu_adam.py. Passes alternate between adding and subtracting the gradient and always come
in pairs, so the buffers that the other implementations go on to update keep their values
up to rounding, and exp_avg_sq stays non-negative: ``round(v + g) >= g`` for ``v >= 0``,
so subtracting ``g`` afterwards cannot go below zero.
"""

from __future__ import annotations

import ctypes
import functools
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

CEILING = "Adam's reads and writes, no arithmetic (ceiling)"
"""The ceiling's row name in the benchmark's tables."""

_SOURCE = r"""
#include <stdint.h>

/* Adam's memory traffic and nothing else: read p, g, m, v; write p, m, v. sign is +1 or -1,
   so sign * g is exact and each element gets exactly one rounded add. */
void adam_traffic(float *restrict p, const float *restrict g, float *restrict m,
                  float *restrict v, int64_t n, float sign, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        const float x = sign * g[i];
        p[i] += x;
        m[i] += x;
        v[i] += x;
    }
}
"""


@functools.cache
def _library() -> ctypes.CDLL:
    """Compile the loop once per process; the loaded library outlives its deleted file."""
    compiler = os.environ.get("CC", "gcc")
    with tempfile.TemporaryDirectory(prefix="ds-adam-ceiling-") as folder:
        source, library = Path(folder, "ceiling.c"), Path(folder, "ceiling.so")
        source.write_text(_SOURCE)
        command = [compiler, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(source), "-o", str(library)]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as error:
            details = getattr(error, "stderr", "") or error
            raise RuntimeError(f"cannot build the Adam ceiling loop with {compiler!r}: {details}") from error
        lib = ctypes.CDLL(str(library))
    lib.adam_traffic.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64, ctypes.c_float, ctypes.c_int]
    lib.adam_traffic.restype = None
    maps = Path("/proc/self/maps").read_text().split()
    runtimes = {path for path in maps if any(name in path for name in ("libgomp", "libiomp", "libomp."))}
    if len(runtimes) > 1:
        warnings.warn(f"several OpenMP runtimes loaded: {sorted(runtimes)}", stacklevel=2)
    return lib


class AdamTrafficCeiling:
    """One fused read-modify-write pass per tensor set with Adam's 28 bytes per parameter.

    ``params``, ``grads`` and ``moments`` are the benchmark's shared fp32 buffers; nothing is
    allocated, so the ceiling runs on the same memory pages as the optimizers it bounds.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        moments: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self._lib = _library()
        self._tensors = [(p.detach(), g, m, v) for p, g, (m, v) in zip(params, grads, moments, strict=True)]
        for tensors in self._tensors:
            if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
                raise ValueError("the ceiling loop takes contiguous fp32 tensors")
        # Pointers once: per-call Python work is what made the torch.compile version fall short.
        self._calls = [(*(t.data_ptr() for t in tensors), tensors[0].numel()) for tensors in self._tensors]

    def run(self, steps: int) -> tuple[float, float]:
        """Wall and CPU seconds per pass over every tensor, timed over an even number of passes.

        ``steps`` is rounded up to even so the buffers end where they started (see the module
        docstring).
        """
        passes, threads, loop = steps + steps % 2, torch.get_num_threads(), self._lib.adam_traffic
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(passes):
            sign = 1.0 if i % 2 == 0 else -1.0
            for p, g, m, v, n in self._calls:
                loop(p, g, m, v, n, sign, threads)
        return (time.perf_counter() - wall) / passes, (time.process_time() - cpu) / passes
