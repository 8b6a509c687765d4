"""The MoE routing ops on CPU (their torch references) against plain loops, with gradients and compile."""

from __future__ import annotations

import math

import pytest
import torch

from ds.kernels.cuda import opdefs_moe

Routing = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def loop_gating(logits: torch.Tensor, k: int, capacity: int, normalize: bool) -> Routing:
    """Top-k gating written one token and one choice at a time, in float64."""
    tokens, experts = logits.shape
    index = torch.zeros(tokens, k, dtype=torch.int32)
    weight = torch.zeros(tokens, k, dtype=torch.float64)
    position = torch.zeros(tokens, k, dtype=torch.int32)
    prob_sum = [0.0] * experts
    for t in range(tokens):
        row = [float(v) for v in logits[t]]
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        probs = [e / sum(exps) for e in exps]
        for e in range(experts):
            prob_sum[e] += probs[e]
        order = sorted(range(experts), key=lambda e: (-(row[e] if not math.isnan(row[e]) else -math.inf), e))
        chosen = order[:k]
        total = sum(probs[e] for e in chosen)
        for j, e in enumerate(chosen):
            index[t, j] = e
            weight[t, j] = probs[e] / total if normalize else probs[e]
    filled = [0] * experts
    for j in range(k):  # every token's first choice is served before any second choice
        for t in range(tokens):
            e = int(index[t, j])
            position[t, j] = filled[e] if filled[e] < capacity else -1
            filled[e] += 1
    counts = torch.tensor(filled, dtype=torch.int32)
    mean_prob = torch.tensor(prob_sum, dtype=torch.float64) / tokens
    return index, weight, position, counts, mean_prob


def loop_permute(x: torch.Tensor, index: torch.Tensor, position: torch.Tensor, capacity: int,
                 experts: int) -> torch.Tensor:
    buffer = torch.zeros(experts * capacity, x.shape[1], dtype=x.dtype)
    for t in range(x.shape[0]):
        for j in range(index.shape[1]):
            e, p = int(index[t, j]), int(position[t, j])
            if 0 <= e < experts and 0 <= p < capacity:
                buffer[e * capacity + p] = x[t]
    return buffer


def loop_unpermute(buffer: torch.Tensor, index: torch.Tensor, position: torch.Tensor, weight: torch.Tensor,
                   capacity: int) -> torch.Tensor:
    experts = buffer.shape[0] // capacity
    y = torch.zeros(index.shape[0], buffer.shape[1], dtype=torch.float64)
    for t in range(index.shape[0]):
        for j in range(index.shape[1]):
            e, p = int(index[t, j]), int(position[t, j])
            if 0 <= e < experts and 0 <= p < capacity:
                y[t] += float(weight[t, j]) * buffer[e * capacity + p].double()
    return y


@pytest.mark.parametrize(("tokens", "experts", "k", "capacity"), [(1, 1, 1, 1), (13, 8, 2, 3), (9, 5, 3, 2),
                                                                  (31, 16, 4, 64), (7, 4, 4, 1)])
@pytest.mark.parametrize("normalize", [True, False])
def test_gating_matches_the_loop(installed, tokens: int, experts: int, k: int, capacity: int,
                                 normalize: bool) -> None:
    logits = torch.randn(tokens, experts) * 2
    index, weight, position, counts, mean_prob = torch.ops.ds.topk_gating(logits, k, capacity, normalize)
    expected = loop_gating(logits, k, capacity, normalize)
    assert index.dtype == position.dtype == counts.dtype == torch.int32
    assert weight.dtype == mean_prob.dtype == torch.float32
    assert torch.equal(index, expected[0])
    torch.testing.assert_close(weight.double(), expected[1], rtol=1e-5, atol=1e-7)
    assert torch.equal(position, expected[2])
    assert torch.equal(counts, expected[3])
    torch.testing.assert_close(mean_prob.double(), expected[4], rtol=1e-5, atol=1e-7)


def test_capacity_drops_later_choices_first() -> None:
    # Every token prefers expert 0, then expert 1: first choices fill expert 0 in token order.
    logits = torch.tensor([[3.0, 2.0, 0.0]] * 4)
    index, _, position, counts, _ = opdefs_moe.topk_gating(logits, 2, 3, True)
    assert index.tolist() == [[0, 1]] * 4
    assert position[:, 0].tolist() == [0, 1, 2, -1]
    assert position[:, 1].tolist() == [0, 1, 2, -1]
    assert counts.tolist() == [4, 4, 0]


def test_ties_go_to_the_lower_expert_and_nan_is_never_preferred() -> None:
    logits = torch.tensor([[1.0, 5.0, 5.0, 5.0], [2.0, 2.0, 2.0, 2.0], [float("nan"), 0.0, -1.0, 7.0]])
    index, weight, *_ = opdefs_moe.topk_gating(logits, 2, 8, False)
    assert index.tolist() == [[1, 2], [0, 1], [3, 1]]
    torch.testing.assert_close(weight[1], torch.tensor([0.25, 0.25]))
    assert torch.equal(index, loop_gating(logits, 2, 8, False)[0])


def test_routed_probabilities_recompute_the_gate_weights_with_a_gradient() -> None:
    logits = torch.randn(11, 6, requires_grad=True)
    index, weight, *_ = opdefs_moe.topk_gating(logits.detach(), 2, 4, True)
    recomputed = opdefs_moe.routed_probabilities(logits, index, True)
    torch.testing.assert_close(recomputed, weight)
    recomputed.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def routing(tokens: int, experts: int, k: int, capacity: int) -> Routing:
    return opdefs_moe.topk_gating(torch.randn(tokens, experts), k, capacity, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_permute_and_unpermute_match_the_loops(installed, dtype: torch.dtype) -> None:
    tokens, experts, k, capacity, hidden = 17, 6, 2, 4, 5  # capacity 4 < 17 * 2 / 6: some choices drop
    index, weight, position, *_ = routing(tokens, experts, k, capacity)
    assert (position == -1).any()
    x = torch.randn(tokens, hidden).to(dtype)
    buffer = torch.ops.ds.moe_permute(x, index, position, capacity, experts)
    assert buffer.dtype == dtype and buffer.shape == (experts * capacity, hidden)
    assert torch.equal(buffer, loop_permute(x, index, position, capacity, experts))
    y = torch.ops.ds.moe_unpermute(buffer, index, position, weight, capacity)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), loop_unpermute(buffer, index, position, weight, capacity).to(dtype).double())


def test_out_of_range_choices_are_dropped_by_both_row_ops() -> None:
    x = torch.randn(3, 4)
    index = torch.tensor([[0, 1], [5, -1], [1, 0]], dtype=torch.int32)
    position = torch.tensor([[0, 7], [0, 0], [-1, 1]], dtype=torch.int32)
    buffer = opdefs_moe.moe_permute(x, index, position, 2, 2)
    assert torch.equal(buffer, loop_permute(x, index, position, 2, 2))
    assert torch.equal(buffer[0], x[0]) and torch.equal(buffer[1], x[2]) and not buffer[2:].any()
    weight = torch.rand(3, 2)
    y = opdefs_moe.moe_unpermute(buffer, index, position, weight, 2)
    torch.testing.assert_close(y.double(), loop_unpermute(buffer, index, position, weight, 2))
    assert not y[1].any()


def test_row_op_gradients_pass_gradcheck_in_float64(installed) -> None:
    tokens, experts, k, capacity, hidden = 9, 4, 2, 3, 3
    index, weight, position, *_ = routing(tokens, experts, k, capacity)
    x = torch.randn(tokens, hidden, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: torch.ops.ds.moe_permute(t, index, position, capacity, experts), (x,))
    buffer = torch.randn(experts * capacity, hidden, dtype=torch.float64, requires_grad=True)
    gate = weight.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda b, g: torch.ops.ds.moe_unpermute(b, index, position, g, capacity), (buffer, gate))


def test_dropped_choices_get_no_gradient(installed) -> None:
    index = torch.tensor([[0, 1]], dtype=torch.int32)
    position = torch.tensor([[0, -1]], dtype=torch.int32)
    buffer = torch.randn(4, 3, requires_grad=True)
    gate = torch.tensor([[0.7, 0.3]], requires_grad=True)
    torch.ops.ds.moe_unpermute(buffer, index, position, gate, 2).sum().backward()
    assert gate.grad[0, 1] == 0 and gate.grad[0, 0] == pytest.approx(buffer[0].sum().item(), rel=1e-6)
    assert torch.equal(buffer.grad[1:], torch.zeros(3, 3))
    torch.testing.assert_close(buffer.grad[0], torch.full((3,), 0.7))


def test_the_whole_routing_compiles_into_one_graph(installed) -> None:
    def layer(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        index, weight, position, _, _ = torch.ops.ds.topk_gating(logits, 2, 5, True)
        buffer = torch.ops.ds.moe_permute(x, index, position, 5, 4)
        return torch.ops.ds.moe_unpermute(buffer * 2, index, position, weight, 5)

    logits, x = torch.randn(9, 4), torch.randn(9, 6, requires_grad=True)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(logits, x)
    torch.testing.assert_close(out, layer(logits, x))
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize(("call", "message"), [
    (lambda: opdefs_moe.topk_gating(torch.randn(3, 4), 5, 2, True), "k must be between 1 and the number"),
    (lambda: opdefs_moe.topk_gating(torch.randn(3, 4), 2, 0, True), "capacity must be at least 1"),
    (lambda: opdefs_moe.moe_permute(torch.randn(3, 4), torch.zeros(3, 2, dtype=torch.int32),
                                    torch.zeros(3, 1, dtype=torch.int32), 2, 2), "position_in_expert has shape"),
    (lambda: opdefs_moe.moe_unpermute(torch.randn(5, 4), torch.zeros(3, 2, dtype=torch.int32),
                                      torch.zeros(3, 2, dtype=torch.int32), torch.ones(3, 2), 2),
     "buffer must be \\[num_experts \\* capacity, hidden\\]"),
])
def test_malformed_arguments_name_the_problem(call, message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        call()
