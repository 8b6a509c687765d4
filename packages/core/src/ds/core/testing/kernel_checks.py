"""What GPU kernel tests of every ds package need: an error measure and poisoned memory.

Kernel tests compare against a float64 computation and must fail when a kernel forgets to
write an element; test modules of one package cannot import each other (pytest imports
them by path), so the helpers live here.
"""

from __future__ import annotations

import torch


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; a NaN in ``out`` (an unwritten element) fails at once."""
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in the output: an element was not written"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def poison() -> None:
    """Fill memory the caching allocator will hand out next with 0xFF bytes (NaN in every float format).

    torch keeps small (<= 1 MiB) and large allocations in separate pools: poison both.
    """
    free = torch.cuda.mem_get_info()[0]
    blocks = [torch.empty(min(1 << 30, free // 4), dtype=torch.uint8, device="cuda")]
    blocks += [torch.empty(1 << 19, dtype=torch.uint8, device="cuda") for _ in range(32)]
    for block in blocks:
        block.fill_(0xFF)
    del blocks
