"""Mixture-of-experts gating and token permutation on the kernels of csrc/moe.cu and moe_rows.cu.

Calls the kernels do not cover (too many experts or choices, other index dtypes are
converted; float64, CPU tensors, mixed devices and empty inputs) run the references of
:mod:`ds.kernels.cuda.opdefs_moe`, which also raise the errors for malformed arguments.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from ._launch import dense, on_device, reference, stream, supported_float
from ._native import dtype_code
from .opdefs_moe import MAX_K

_INT32_LIMIT = 2**31 - 1


def _index(t: Tensor) -> Tensor:
    return dense(t.to(torch.int32))


def _routing_fits(expert_index: Tensor, position_in_expert: Tensor, device: torch.device, capacity: int,
                  num_experts: int, tokens: int) -> bool:
    return (expert_index.dim() == 2 and expert_index.shape[0] == tokens
            and position_in_expert.shape == expert_index.shape
            and 1 <= expert_index.shape[1] <= MAX_K and tokens >= 1
            and not expert_index.is_floating_point() and not position_in_expert.is_floating_point()
            and expert_index.device == device and position_in_expert.device == device
            and capacity >= 1 and num_experts >= 1
            and num_experts * capacity <= _INT32_LIMIT and tokens * expert_index.shape[1] <= _INT32_LIMIT)


def _slot_sources(ext: ModuleType, expert_index: Tensor, position_in_expert: Tensor, num_experts: int,
                  capacity: int) -> Tensor:
    """For each buffer row, the choice (token * k + j) that takes it, or -1."""
    sources = torch.full((num_experts * capacity,), -1, dtype=torch.int32, device=expert_index.device)
    ext.moe_slot_sources(expert_index.data_ptr(), position_in_expert.data_ptr(), expert_index.numel(), num_experts,
                         capacity, sources.data_ptr(), stream())
    return sources


def _combine(ext: ModuleType, buffer: Tensor, expert_index: Tensor, position_in_expert: Tensor,
             weight: Tensor | None, capacity: int, out_dtype: torch.dtype) -> Tensor:
    tokens, k = expert_index.shape
    out = torch.empty(tokens, buffer.shape[1], dtype=out_dtype, device=buffer.device)
    ext.moe_combine_rows(buffer.data_ptr(), expert_index.data_ptr(), position_in_expert.data_ptr(),
                         0 if weight is None else weight.data_ptr(), tokens, k, buffer.shape[0] // capacity,
                         capacity, buffer.shape[1], out.data_ptr(), dtype_code(out_dtype), stream())
    return out


def topk_gating(ext: ModuleType, logits: Tensor, k: int, capacity: int,
                normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    fits = (logits.dim() == 2 and supported_float(logits) and logits.shape[0] >= 1
            and 1 <= logits.shape[1] <= ext.MOE_MAX_EXPERTS and 1 <= k <= min(ext.MOE_MAX_K, logits.shape[1])
            and capacity >= 1 and logits.shape[0] * k <= _INT32_LIMIT)
    if not fits:
        return reference("topk_gating")(logits, k, capacity, normalize)
    tokens, experts = logits.shape
    blocks = -(-tokens // ext.MOE_GATING_TOKENS_PER_BLOCK)
    device = logits.device
    expert_index = torch.empty(tokens, k, dtype=torch.int32, device=device)
    position = torch.empty_like(expert_index)
    gate_weight = torch.empty(tokens, k, dtype=torch.float32, device=device)
    expert_counts = torch.empty(experts, dtype=torch.int32, device=device)
    mean_prob = torch.empty(experts, dtype=torch.float32, device=device)
    block_counts = torch.empty(blocks, k, experts, dtype=torch.int32, device=device)
    prob_partial = torch.empty(blocks, experts, dtype=torch.float32, device=device)
    logits = dense(logits)
    with on_device(logits):
        ext.moe_topk_gating(logits.data_ptr(), tokens, experts, k, capacity, normalize, dtype_code(logits.dtype),
                            expert_index.data_ptr(), gate_weight.data_ptr(), position.data_ptr(),
                            expert_counts.data_ptr(), mean_prob.data_ptr(), block_counts.data_ptr(),
                            prob_partial.data_ptr(), stream())
    return expert_index, gate_weight, position, expert_counts, mean_prob


def moe_permute(ext: ModuleType, x: Tensor, expert_index: Tensor, position_in_expert: Tensor, capacity: int,
                num_experts: int) -> Tensor:
    if not (x.dim() == 2 and supported_float(x)
            and _routing_fits(expert_index, position_in_expert, x.device, capacity, num_experts, x.shape[0])):
        return reference("moe_permute")(x, expert_index, position_in_expert, capacity, num_experts)
    x2, index, position = dense(x), _index(expert_index), _index(position_in_expert)
    buffer = torch.empty(num_experts * capacity, x.shape[1], dtype=x.dtype, device=x.device)
    with on_device(x):
        sources = _slot_sources(ext, index, position, num_experts, capacity)
        ext.moe_gather_rows(x2.data_ptr(), sources.data_ptr(), 0, index.shape[1], buffer.shape[0], x.shape[1],
                            buffer.data_ptr(), dtype_code(x.dtype), stream())
    return buffer


def moe_permute_backward(ext: ModuleType, grad_output: Tensor, x: Tensor, expert_index: Tensor,
                         position_in_expert: Tensor, capacity: int, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    fits = (x.dim() == 2 and supported_float(x, grad_output) and grad_output.device == x.device
            and grad_output.shape == (num_experts * capacity, x.shape[1])
            and _routing_fits(expert_index, position_in_expert, x.device, capacity, num_experts, x.shape[0]))
    if not fits:
        return reference("moe_permute_backward")(grad_output, x, expert_index, position_in_expert, capacity,
                                                 num_experts)
    grad = dense(grad_output.to(x.dtype))
    with on_device(x):
        grad_x = _combine(ext, grad, _index(expert_index), _index(position_in_expert), None, capacity, x.dtype)
    return grad_x, expert_index.new_empty(0), position_in_expert.new_empty(0)


def _unpermute_fits(buffer: Tensor, expert_index: Tensor, position_in_expert: Tensor, gate_weight: Tensor,
                    capacity: int) -> bool:
    return (buffer.dim() == 2 and buffer.shape[1] >= 1 and supported_float(buffer) and capacity >= 1
            and buffer.shape[0] % capacity == 0
            and gate_weight.shape == expert_index.shape and gate_weight.is_floating_point()
            and gate_weight.device == buffer.device
            and _routing_fits(expert_index, position_in_expert, buffer.device, capacity,
                              buffer.shape[0] // capacity, expert_index.shape[0] if expert_index.dim() else -1))


def moe_unpermute(ext: ModuleType, buffer: Tensor, expert_index: Tensor, position_in_expert: Tensor,
                  gate_weight: Tensor, capacity: int) -> Tensor:
    if not _unpermute_fits(buffer, expert_index, position_in_expert, gate_weight, capacity):
        return reference("moe_unpermute")(buffer, expert_index, position_in_expert, gate_weight, capacity)
    weight = dense(gate_weight.to(torch.float32))
    with on_device(buffer):
        return _combine(ext, dense(buffer), _index(expert_index), _index(position_in_expert), weight, capacity,
                        buffer.dtype)


def moe_unpermute_backward(ext: ModuleType, grad_output: Tensor, buffer: Tensor, expert_index: Tensor,
                           position_in_expert: Tensor, gate_weight: Tensor,
                           capacity: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    fits = (_unpermute_fits(buffer, expert_index, position_in_expert, gate_weight, capacity)
            and supported_float(grad_output) and grad_output.device == buffer.device
            and grad_output.shape == (expert_index.shape[0], buffer.shape[1]))
    if not fits:
        return reference("moe_unpermute_backward")(grad_output, buffer, expert_index, position_in_expert,
                                                   gate_weight, capacity)
    num_experts = buffer.shape[0] // capacity
    hidden = buffer.shape[1]
    grad, rows = dense(grad_output.to(buffer.dtype)), dense(buffer)
    index, position = _index(expert_index), _index(position_in_expert)
    weight = dense(gate_weight.to(torch.float32))
    grad_buffer = torch.empty_like(rows)
    grad_gate = torch.empty(index.shape, dtype=torch.float32, device=buffer.device)
    with on_device(buffer):
        sources = _slot_sources(ext, index, position, num_experts, capacity)
        s = stream()
        ext.moe_gather_rows(grad.data_ptr(), sources.data_ptr(), weight.data_ptr(), index.shape[1], rows.shape[0],
                            hidden, grad_buffer.data_ptr(), dtype_code(buffer.dtype), s)
        ext.moe_gate_grad(grad.data_ptr(), rows.data_ptr(), index.data_ptr(), position.data_ptr(), index.shape[0],
                          index.shape[1], num_experts, capacity, hidden, grad_gate.data_ptr(),
                          dtype_code(buffer.dtype), s)
    return grad_buffer, expert_index.new_empty(0), position_in_expert.new_empty(0), grad_gate.to(gate_weight.dtype)
