"""The MoE routing kernels (csrc/moe.cu, moe_rows.cu) against their torch references, on a GPU.

Routing decisions must match exactly: expert indices, positions and counts are integers,
and top-k ranks float32 logits (a low-precision logit converts exactly), ties going to the
lower expert index in both. Gate weights and mean probabilities are float32 softmax values,
compared with float64 softmax within 1e-5 relative (exp of arguments down to about -30,
then a sum over up to 20001 tokens for the mean). Row ops: a permuted buffer is a
bit-exact copy; unpermute and the gradients accumulate in float32 and are compared with
float64 math on the same inputs, relative error (||out - ref|| / ||ref||) within float32
3e-6, float16 1e-3, bfloat16 8e-3 (outputs rounded once to the dtype). Memory is poisoned
with NaN bytes before each kernel, so an output element a kernel forgets fails.
"""

from __future__ import annotations

import pytest
import torch

from ds.core.testing.kernel_checks import poison, rel_error
from ds.kernels.cuda import opdefs_moe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ROW_BOUND = {torch.float32: 3e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(autouse=True)
def native_kernels(installed):
    for op in opdefs_moe.MOE_OPS:
        assert installed.choice(op, "cuda").backend == "cuda-native", installed.choice(op, "cuda")
    yield installed


def gating_logits(tokens: int, experts: int, dtype: torch.dtype) -> torch.Tensor:
    """Random logits as a non-contiguous view (the transpose of an [experts, tokens] tensor)."""
    return (torch.randn(experts, tokens, device="cuda") * 3).to(dtype).t()


def assert_same_routing(out: tuple[torch.Tensor, ...], logits: torch.Tensor, k: int, capacity: int,
                        normalize: bool) -> None:
    index, weight, position, counts, mean_prob = out
    ref = opdefs_moe.topk_gating(logits, k, capacity, normalize)
    assert torch.equal(index, ref[0])
    assert torch.equal(position, ref[2])
    assert torch.equal(counts, ref[3])
    probs = torch.softmax(logits.double(), dim=-1)
    chosen = probs.gather(1, index.long())
    expected_weight = chosen / chosen.sum(-1, keepdim=True) if normalize else chosen
    torch.testing.assert_close(weight.double(), expected_weight, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mean_prob.double(), probs.mean(0), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("experts", [8, 64, 128])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("tokens", [1, 1001, 20001])
@pytest.mark.parametrize("normalize", [True, False])
def test_gating_matches_the_reference(experts: int, k: int, tokens: int, normalize: bool) -> None:
    logits = gating_logits(tokens, experts, torch.float32)
    capacity = max(1, tokens * k // experts)  # a uniform share: the busier experts drop choices
    poison()
    out = torch.ops.ds.topk_gating(logits, k, capacity, normalize)
    assert_same_routing(out, logits, k, capacity, normalize)
    if tokens > experts:
        assert (out[2] == -1).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("experts", "k"), [(1, 1), (5, 3), (100, 8), (256, 8), (256, 2)])
def test_gating_covers_every_logit_dtype_and_expert_count(dtype: torch.dtype, experts: int, k: int) -> None:
    logits = gating_logits(777, experts, dtype)
    poison()
    out = torch.ops.ds.topk_gating(logits, k, 97, True)
    assert_same_routing(out, logits, k, 97, True)


def test_gating_ties_go_to_the_lower_expert_and_nan_ranks_last() -> None:
    logits = torch.randint(-2, 3, (513, 64), device="cuda").float()  # five values: ties everywhere
    logits[7, 3] = float("nan")
    poison()
    out = torch.ops.ds.topk_gating(logits, 4, 40, False)
    ref = opdefs_moe.topk_gating(logits, 4, 40, False)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[2], ref[2]) and torch.equal(out[3], ref[3])
    rows = torch.arange(513, device="cuda") != 7  # the NaN row's probabilities are NaN in both
    torch.testing.assert_close(out[1][rows], ref[1][rows], rtol=1e-5, atol=1e-7)
    assert 3 not in out[0][7].tolist()


def routed(tokens: int, experts: int, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    capacity = max(1, tokens * k // experts)
    index, weight, position, _, _ = opdefs_moe.topk_gating(gating_logits(tokens, experts, torch.float32), k,
                                                           capacity, True)
    return index, weight, position, capacity


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("tokens", "experts", "k", "hidden"), [(1001, 8, 1, 4096), (1001, 64, 2, 1000),
                                                                (333, 128, 4, 257), (3, 8, 2, 64)])
def test_permute_and_unpermute_forward_and_backward(dtype: torch.dtype, tokens: int, experts: int, k: int,
                                                    hidden: int) -> None:
    index, weight, position, capacity = routed(tokens, experts, k)
    x = torch.randn(tokens, 2 * hidden, device="cuda", dtype=dtype)[:, ::2].requires_grad_()
    poison()
    buffer = torch.ops.ds.moe_permute(x, index, position, capacity, experts)
    assert torch.equal(buffer, opdefs_moe.moe_permute(x.detach(), index, position, capacity, experts))

    grad_buffer = torch.randn_like(buffer)
    poison()
    (grad_x,) = torch.autograd.grad(buffer, x, grad_buffer)
    ref_grad_x = opdefs_moe.moe_permute_backward(grad_buffer.double(), x.detach().double(), index, position,
                                                 capacity, experts)[0]
    assert rel_error(grad_x, ref_grad_x) < ROW_BOUND[dtype]

    rows = torch.randn_like(buffer).requires_grad_()
    gate = weight.clone().requires_grad_()
    poison()
    y = torch.ops.ds.moe_unpermute(rows, index, position, gate, capacity)
    ref_y = opdefs_moe.moe_unpermute(rows.detach().double(), index, position, gate.detach().double(), capacity)
    assert y.dtype == dtype and rel_error(y, ref_y) < ROW_BOUND[dtype]

    grad_y = torch.randn_like(y)
    poison()
    grad_rows, grad_gate = torch.autograd.grad(y, (rows, gate), grad_y)
    ref_rows, _, _, ref_gate = opdefs_moe.moe_unpermute_backward(grad_y.double(), rows.detach().double(), index,
                                                                 position, gate.detach().double(), capacity)
    assert rel_error(grad_rows, ref_rows) < ROW_BOUND[dtype]
    assert grad_gate.dtype == torch.float32 and rel_error(grad_gate, ref_gate) < 1e-5
    dropped = position == -1
    assert torch.all(grad_gate[dropped] == 0)


def test_gating_then_row_ops_run_without_a_host_sync() -> None:
    """The whole routing is captured in a CUDA graph, which fails on any host synchronisation."""
    logits = gating_logits(4097, 64, torch.bfloat16).contiguous()
    x = torch.randn(4097, 512, device="cuda", dtype=torch.bfloat16)

    def route() -> torch.Tensor:
        index, weight, position, _, _ = torch.ops.ds.topk_gating(logits, 2, 160, True)
        buffer = torch.ops.ds.moe_permute(x, index, position, 160, 64)
        return torch.ops.ds.moe_unpermute(buffer, index, position, weight, 160)

    expected = route()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        route()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = route()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)
