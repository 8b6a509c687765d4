"""``ds::woq_matmul`` in Triton: int8/int4 weights dequantized tile by tile inside the matmul.

The weight is read once, in its quantized form (a quarter of bf16's bytes at 4 bits), which
is what makes decoding faster: at batch 1 a matmul is a pass over the weight. Each K tile
lies inside one quantization group (``BLOCK_K`` divides ``group_size``), so the integer
codes go straight into the tensor-core dot (they are exact in bf16/fp16) and the group's
scale multiplies the tile's partial sums afterwards; asymmetric offsets add
``offset * sum(x over the tile)``. Two launch shapes share the kernel:

* M <= :data:`GEMV_MAX_ROWS` (decoding): 16-row tiles and split-K, partial sums added
  atomically into a float32 output, so even a short N spreads over every multiprocessor;
* larger M (prefill, batches): ordinary output tiles, no split.

Tile sizes are autotuned once per weight shape (and per M bucket for the tiled path);
``DS_TRITON_AUTOTUNE=0`` (read per call) skips that and runs each path's first config,
which is what the interpreter always does (tests use it to avoid compiling every config).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..opdefs import BITS, GROUP_SIZES
from ._common import dot_operands, floats, interpreting, reference
from .opdefs import is_symmetric

GEMV_MAX_ROWS = 4
AUTOTUNE_ENV = "DS_TRITON_AUTOTUNE"

_MAX_BLOCK_K = 128


@triton.jit
def _woq_matmul(x_ptr, w_ptr, scales_ptr, offsets_ptr, y_ptr, M, N, K, stride_xm, stride_xk, m_bucket,
                GROUP: tl.constexpr, BITS: tl.constexpr, SYMMETRIC: tl.constexpr, ATOMIC: tl.constexpr,
                DOT: tl.constexpr, BLOCK_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr):
    n_blocks = tl.cdiv(N, BLOCK_N)
    pid_m = tl.program_id(0) // n_blocks
    pid_n = tl.program_id(0) % n_blocks
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_mask = rm < M
    n_mask = rn < N
    k_tiles = K // BLOCK_K
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    first = tl.program_id(1) * tiles_per_split
    last = tl.minimum(first + tiles_per_split, k_tiles)
    groups_per_row = K // GROUP
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for tile in range(first, last):
        k0 = tile * BLOCK_K
        rk = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
        if BITS == 8:
            q = tl.load(w_ptr + rn[:, None] * K + rk[None, :], mask=n_mask[:, None], other=0).to(tl.float32)
        else:
            rp = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + rn[:, None] * (K // 2) + rp[None, :], mask=n_mask[:, None], other=0)
            packed = packed.to(tl.int32)
            if SYMMETRIC:  # sign-extend each two's complement nibble
                even, odd = (packed << 28) >> 28, (packed << 24) >> 28
            else:
                even, odd = packed & 0xF, (packed >> 4) & 0xF
            q = tl.reshape(tl.join(even, odd), [BLOCK_N, BLOCK_K]).to(tl.float32)
        group = rn * groups_per_row + k0 // GROUP
        scale = tl.load(scales_ptr + group, mask=n_mask, other=0.0)
        if DOT == "bf16":
            partial = tl.dot(a.to(tl.bfloat16), tl.trans(q.to(tl.bfloat16)))
        elif DOT == "fp16":
            partial = tl.dot(a.to(tl.float16), tl.trans(q.to(tl.float16)))
        else:  # float32 operands, multiplied exactly (no tf32)
            partial = tl.dot(a.to(tl.float32), tl.trans(q), input_precision="ieee")
        acc += partial * scale[None, :]
        if not SYMMETRIC:
            offset = tl.load(offsets_ptr + group, mask=n_mask, other=0.0)
            acc += tl.sum(a.to(tl.float32), axis=1)[:, None] * offset[None, :]
    out = y_ptr + rm[:, None] * N + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if ATOMIC:
        tl.atomic_add(out, acc, mask=mask)
    else:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)


def _gemv_configs() -> list[triton.Config]:
    shapes = [(32, 2, 4), (32, 1, 4), (64, 1, 4), (64, 2, 4), (128, 2, 4), (32, 4, 4), (64, 4, 4),
              (128, 4, 8), (32, 8, 4), (64, 8, 4), (128, 8, 8), (64, 16, 4)]
    configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": n, "SPLIT_K": split}, num_warps=warps, num_stages=4)
               for n, split, warps in shapes]
    return configs  # the first, which the interpreter runs, splits K in two


def _tiled_configs() -> list[triton.Config]:
    shapes = [(16, 64, 4, 4), (32, 64, 4, 4), (32, 128, 4, 4), (64, 64, 4, 4), (64, 128, 4, 4),
              (64, 128, 8, 3), (128, 64, 4, 4), (128, 128, 8, 3)]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "SPLIT_K": 1}, num_warps=warps, num_stages=stages)
               for m, n, warps, stages in shapes]
    return configs


def _rows_that_fit(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """Drop tiles taller than twice the rows there are (their extra rows are pure waste)."""
    limit = max(16, 2 * int(named_args["m_bucket"]))
    return [c for c in configs if c.kwargs["BLOCK_M"] <= limit] or configs[:1]


_GEMV_CONFIGS, _TILED_CONFIGS = _gemv_configs(), _tiled_configs()
_KEY = ["N", "K", "BITS", "BLOCK_K", "SYMMETRIC"]
_gemv = triton.autotune(configs=_GEMV_CONFIGS, key=_KEY, reset_to_zero=["y_ptr"])(_woq_matmul)
_tiled = triton.autotune(configs=_TILED_CONFIGS, key=[*_KEY, "m_bucket"],
                         prune_configs_by={"early_config_prune": _rows_that_fit})(_woq_matmul)


def _autotuning() -> bool:
    return not interpreting() and os.environ.get(AUTOTUNE_ENV, "1").strip() != "0"


def _fits(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bits: int, group_size: int) -> bool:
    if bits not in BITS or group_size not in GROUP_SIZES or x.dim() == 0 or x.numel() == 0 or not floats(x):
        return False
    k = x.shape[-1]
    if k % group_size or scales.dtype != torch.float32 or scales.numel() == 0 or (scales.numel() * group_size) % k:
        return False
    n = scales.numel() * group_size // k
    same_device = all(t.device == x.device for t in (qweight, scales, offsets) if t is not None)
    codes_fit = qweight.element_size() == 1 and not qweight.is_floating_point() and qweight.numel() * 8 == n * k * bits
    offsets_fit = is_symmetric(offsets) or (offsets.dtype == torch.float32 and offsets.numel() == scales.numel())
    return same_device and codes_fit and offsets_fit


def woq_matmul(x: Tensor, qweight: Tensor, scales: Tensor, offsets: Tensor | None, bits: int,
               group_size: int) -> Tensor:
    if not _fits(x, qweight, scales, offsets, bits, group_size):
        return reference("woq_matmul")(x, qweight, scales, offsets, bits, group_size)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    n = scales.numel() * group_size // k
    symmetric = is_symmetric(offsets)
    codes = qweight.reshape(n, -1).contiguous()
    scales = scales.reshape(-1).contiguous()
    offsets = scales if symmetric else offsets.reshape(-1).contiguous()  # type: ignore[union-attr]
    gemv = m <= GEMV_MAX_ROWS
    y = torch.zeros(m, n, dtype=torch.float32, device=x.device) if gemv else torch.empty(m, n, dtype=x.dtype,
                                                                                          device=x.device)
    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"]

    args = (x2, codes, scales, offsets, y, m, n, k, x2.stride(0), x2.stride(1), triton.next_power_of_2(m))
    meta = dict(GROUP=group_size, BITS=bits, SYMMETRIC=symmetric, ATOMIC=gemv, DOT=dot_operands(x.dtype),
                BLOCK_K=min(group_size, _MAX_BLOCK_K))
    if _autotuning():
        (_gemv if gemv else _tiled)[grid](*args, **meta)
    else:
        config = (_GEMV_CONFIGS if gemv else _TILED_CONFIGS)[0]
        _woq_matmul[grid(config.kwargs)](*args, **meta, **config.kwargs, num_warps=config.num_warps,
                                         num_stages=config.num_stages)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
