"""Mixture-of-experts routing ops, each defined by its plain-torch reference.

A mixture-of-experts layer routes every token to ``k`` of ``E`` experts, and each expert
works on a fixed-size buffer of ``capacity`` rows (static shapes: no host sync, and the
expert matmuls can be batched). These ops are the memory-bound glue around the expert
matmuls; the plugin declares them through ``ds_define_kernel_ops`` so that
``torch.ops.ds.<name>`` runs them everywhere, the CUDA kernels of csrc/moe.cu and moe_rows.cu on GPUs.

* ``topk_gating(logits[T, E], k, capacity, normalize) -> (expert_index, gate_weight,
  position_in_expert, expert_counts, mean_prob)``. The k experts with the largest logits,
  in descending order; equal logits go to the lower expert index, and a NaN logit is never
  preferred over a number. ``gate_weight[T, k]`` (float32) holds their softmax
  probabilities, divided by their sum when ``normalize``. ``position_in_expert[T, k]`` is
  the row the token takes in the expert's buffer, counted as GShard and DeepSpeed do: first
  choices of all tokens in token order, then second choices, and so on; rows at or beyond
  ``capacity`` are dropped and get position -1 (their gate weight stays, so dropping does
  not change how the kept choices are weighted). ``expert_counts[E]`` counts every choice
  routed to each expert before dropping, and ``mean_prob[E]`` is the softmax probability
  averaged over tokens: the two inputs of the load-balancing loss. The op has no gradient;
  a trained router recomputes its weights from logits with ``expert_index`` (see
  :func:`routed_probabilities`).
* ``moe_permute(x[T, H], expert_index, position_in_expert, capacity, num_experts) ->
  buffer[E * capacity, H]``: row ``e * capacity + p`` is the token routed to expert ``e``
  at position ``p``; rows nobody took are zero.
* ``moe_unpermute(buffer, expert_index, position_in_expert, gate_weight, capacity) ->
  y[T, H]``: ``y[t] = sum_j gate_weight[t, j] * buffer[slot(t, j)]`` over the kept
  choices, accumulated in float32, in the buffer's dtype.

A choice whose position lies outside ``[0, capacity)`` or whose expert lies outside
``[0, E)`` is dropped by both row ops. Positions must be distinct per expert, as
:func:`topk_gating` makes them. Both row ops are differentiable for their float inputs;
the index arguments get no gradient (their backward returns an empty placeholder, since a
backward op returns one tensor per tensor argument).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MAX_K = 8
"""The largest k the fused kernels handle; larger k runs on the reference."""


def _check_routing(expert_index: Tensor, position_in_expert: Tensor, tokens: int, capacity: int) -> None:
    torch._check(expert_index.dim() == 2 and expert_index.shape[0] == tokens,
                 lambda: f"expert_index must have shape [tokens={tokens}, k], got {tuple(expert_index.shape)}")
    torch._check(position_in_expert.shape == expert_index.shape,
                 lambda: f"position_in_expert has shape {tuple(position_in_expert.shape)} but expert_index has "
                 f"{tuple(expert_index.shape)}; pass both as returned by topk_gating")
    torch._check(not expert_index.is_floating_point() and not position_in_expert.is_floating_point(),
                 lambda: "expert_index and position_in_expert must be integer tensors (int32 from topk_gating)")
    torch._check(capacity >= 1, lambda: f"capacity must be at least 1, got {capacity}")


def _slots(expert_index: Tensor, position_in_expert: Tensor, num_experts: int, capacity: int) -> tuple[Tensor, Tensor]:
    """Each choice's buffer row (0 where dropped) and whether it is kept, both [T, k]."""
    expert = expert_index.long()
    position = position_in_expert.long()
    kept = (position >= 0) & (position < capacity) & (expert >= 0) & (expert < num_experts)
    return torch.where(kept, expert * capacity + position, 0), kept


def _combine(buffer: Tensor, expert_index: Tensor, position_in_expert: Tensor, weight: Tensor | None,
             capacity: int) -> Tensor:
    """``sum_j weight[t, j] * buffer[slot(t, j)]`` over kept choices, float32 or wider."""
    tokens, k = expert_index.shape
    slots, kept = _slots(expert_index, position_in_expert, buffer.shape[0] // capacity, capacity)
    compute = torch.promote_types(buffer.dtype, torch.float32)
    rows = buffer.to(compute)[slots.reshape(-1)].view(tokens, k, buffer.shape[1])
    rows = torch.where(kept[..., None], rows, 0)  # a dropped choice adds nothing, even where row 0 is inf
    if weight is None:
        return rows.sum(1)
    return (rows * torch.where(kept, weight.to(compute), 0)[..., None]).sum(1)


def _scatter(rows: Tensor, expert_index: Tensor, position_in_expert: Tensor, weight: Tensor | None,
             num_experts: int, capacity: int) -> Tensor:
    """A [E * capacity, H] buffer holding ``weight[t, j] * rows[t]`` at each kept choice's slot."""
    tokens, k = expert_index.shape
    slots, kept = _slots(expert_index, position_in_expert, num_experts, capacity)
    spare = num_experts * capacity  # dropped choices all land on one extra row, cut off below
    targets = torch.where(kept, slots, spare).reshape(-1)
    compute = torch.promote_types(rows.dtype, torch.float32)
    values = rows.to(compute)[:, None, :].expand(tokens, k, rows.shape[1])
    if weight is not None:
        values = values * weight.to(compute)[..., None]
    buffer = rows.new_zeros(spare + 1, rows.shape[1])
    buffer.index_put_((targets,), values.reshape(tokens * k, -1).to(rows.dtype))
    return buffer[:spare]


def topk_gating(logits: Tensor, k: int, capacity: int,
                normalize: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Top-k softmax routing with per-expert capacity; see the module docstring for each output."""
    torch._check(logits.dim() == 2, lambda: f"logits must be [tokens, experts], got shape {tuple(logits.shape)}")
    tokens, experts = logits.shape
    torch._check(1 <= k <= experts, lambda: f"k must be between 1 and the number of experts ({experts}), got {k}")
    torch._check(capacity >= 1, lambda: f"capacity must be at least 1, got {capacity}")
    scores = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(scores, dim=-1)
    ranking = torch.nan_to_num(scores, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    chosen = torch.sort(ranking, dim=-1, descending=True, stable=True).indices[:, :k]
    weights = probs.gather(1, chosen)
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    # Order of service: choice-major, then token; a choice's rank among earlier ones at its expert.
    routed = torch.nn.functional.one_hot(chosen.t().reshape(-1), experts)
    rank = (routed.cumsum(0) - 1).gather(1, chosen.t().reshape(-1, 1)).view(k, tokens).t()
    position = torch.where(rank < capacity, rank, -1)
    return (chosen.to(torch.int32), weights.float(), position.to(torch.int32),
            routed.sum(0).to(torch.int32), probs.mean(0).float())


def routed_probabilities(logits: Tensor, expert_index: Tensor, normalize: bool) -> Tensor:
    """The gate weights of :func:`topk_gating` recomputed with autograd, for training the router."""
    probs = torch.softmax(logits.float(), dim=-1).gather(1, expert_index.long())
    return probs / probs.sum(-1, keepdim=True) if normalize else probs


def moe_permute(x: Tensor, expert_index: Tensor, position_in_expert: Tensor, capacity: int,
                num_experts: int) -> Tensor:
    """Token rows copied into per-expert buffers of ``capacity`` rows; empty rows are zero."""
    torch._check(x.dim() == 2, lambda: f"x must be [tokens, hidden], got shape {tuple(x.shape)}")
    _check_routing(expert_index, position_in_expert, x.shape[0], capacity)
    torch._check(num_experts >= 1, lambda: f"num_experts must be at least 1, got {num_experts}")
    return _scatter(x, expert_index, position_in_expert, None, num_experts, capacity)


def moe_permute_backward(grad_output: Tensor, x: Tensor, expert_index: Tensor, position_in_expert: Tensor,
                         capacity: int, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Gradient of :func:`moe_permute` for x: each token sums the gradient rows of its kept slots."""
    grad_x = _combine(grad_output, expert_index, position_in_expert, None, capacity).to(x.dtype)
    return grad_x, expert_index.new_empty(0), position_in_expert.new_empty(0)


def moe_unpermute(buffer: Tensor, expert_index: Tensor, position_in_expert: Tensor, gate_weight: Tensor,
                  capacity: int) -> Tensor:
    """Each token's gate-weighted sum of its kept expert rows, in the buffer's dtype."""
    torch._check(buffer.dim() == 2 and buffer.shape[0] % max(capacity, 1) == 0,
                 lambda: f"buffer must be [num_experts * capacity, hidden] with capacity={capacity}, "
                 f"got shape {tuple(buffer.shape)}")
    _check_routing(expert_index, position_in_expert, expert_index.shape[0], capacity)
    torch._check(gate_weight.shape == expert_index.shape and gate_weight.is_floating_point(),
                 lambda: f"gate_weight must be a float tensor shaped like expert_index {tuple(expert_index.shape)}, "
                 f"got {gate_weight.dtype} {tuple(gate_weight.shape)}")
    return _combine(buffer, expert_index, position_in_expert, gate_weight, capacity).to(buffer.dtype)


def moe_unpermute_backward(grad_output: Tensor, buffer: Tensor, expert_index: Tensor, position_in_expert: Tensor,
                           gate_weight: Tensor, capacity: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of :func:`moe_unpermute` for the buffer (gate-scaled rows) and the gate weights (row dots)."""
    num_experts = buffer.shape[0] // capacity
    grad_buffer = _scatter(grad_output.to(buffer.dtype), expert_index, position_in_expert, gate_weight,
                           num_experts, capacity)
    tokens, k = expert_index.shape
    slots, kept = _slots(expert_index, position_in_expert, num_experts, capacity)
    compute = torch.promote_types(buffer.dtype, torch.float32)
    rows = buffer.to(compute)[slots.reshape(-1)].view(tokens, k, buffer.shape[1])
    dots = (rows * grad_output.to(compute)[:, None, :]).sum(-1)
    grad_gate = torch.where(kept, dots, 0).to(gate_weight.dtype)
    return grad_buffer, expert_index.new_empty(0), position_in_expert.new_empty(0), grad_gate


def define_ops(define: Callable[..., None]) -> None:
    """Declare the routing ops through core's ``define`` callable."""
    define("topk_gating", topk_gating)
    define("moe_permute", moe_permute, backward=moe_permute_backward)
    define("moe_unpermute", moe_unpermute, backward=moe_unpermute_backward)


MOE_OPS: tuple[str, ...] = (
    "topk_gating", "moe_permute", "moe_permute_backward", "moe_unpermute", "moe_unpermute_backward",
)
