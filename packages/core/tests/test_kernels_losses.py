"""Fused cross-entropy (logits consumed in place) and its chunked linear variant against F.cross_entropy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds.core.kernels import LossInputError, cross_entropy, fused_linear_cross_entropy, install_kernels, reset_kernels
from ds.core.plugins import load_components, make_plugin_set

ROWS, VOCAB, IGNORE = 37, 1003, -100
# Loss and logits gradients from bfloat16 logits are computed in float32 from the exact
# bf16 values, so only the bf16 rounding of the stored gradient (2**-9 relative) remains.
GRAD_TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-7}, torch.bfloat16: {"rtol": 8e-3, "atol": 1e-6}}


@pytest.fixture(autouse=True, scope="module")
def reference_kernels():
    selection = install_kernels(load_components(make_plugin_set(autoload=False)), device_types=["cpu"])
    assert selection.choice("cross_entropy_fwd_bwd", "cpu").backend == "torch-reference"
    yield
    reset_kernels()


def targets(rows: int, vocab: int, ignored: int = 5) -> torch.Tensor:
    t = torch.randint(0, vocab, (rows,))
    t[torch.randperm(rows)[:ignored]] = IGNORE
    return t


def torch_loss(logits: torch.Tensor, target: torch.Tensor, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """F.cross_entropy's loss and logits gradient in float64 on the same values."""
    exact = logits.detach().double().requires_grad_()
    loss = F.cross_entropy(exact.reshape(-1, exact.shape[-1]), target.reshape(-1), ignore_index=IGNORE, **kwargs)
    if kwargs.get("reduction") == "none":
        loss = loss.view(target.shape)
    return loss, exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_loss_and_gradient_match_torch(dtype: torch.dtype, reduction: str, label_smoothing: float) -> None:
    logits = (torch.randn(ROWS, VOCAB) * 3).to(dtype)
    target = targets(ROWS, VOCAB)
    expected, exact = torch_loss(logits, target, reduction=reduction, label_smoothing=label_smoothing)
    upstream = torch.randn(expected.shape, dtype=torch.float64)
    expected.backward(upstream)

    mine = logits.clone().requires_grad_()
    loss = cross_entropy(mine * 1, target, ignore_index=IGNORE, reduction=reduction, label_smoothing=label_smoothing)
    assert loss.dtype == torch.float32 and loss.shape == expected.shape
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    loss.backward(upstream.float())
    assert mine.grad.dtype == dtype
    torch.testing.assert_close(mine.grad.double(), exact.grad, **GRAD_TOLERANCE[dtype])
    assert (mine.grad[target == IGNORE] == 0).all()


def test_logits_buffer_is_consumed_and_becomes_the_gradient() -> None:
    logits = torch.randn(ROWS, VOCAB)
    target = targets(ROWS, VOCAB)
    expected, exact = torch_loss(logits, target, reduction="sum")
    expected.backward()
    buffer = logits.clone().requires_grad_()
    consumed = buffer * 1  # the non-leaf an LM head would produce
    loss = cross_entropy(consumed, target, ignore_index=IGNORE, reduction="sum")
    torch.testing.assert_close(consumed.detach().double(), exact.grad, rtol=1e-5, atol=1e-7)
    loss.backward()
    torch.testing.assert_close(buffer.grad.double(), exact.grad, rtol=1e-5, atol=1e-7)


def test_batched_and_strided_logits() -> None:
    wide = torch.randn(3, 11, 2 * VOCAB)
    logits = wide[..., ::2]  # neither contiguous nor flattenable without a copy
    target = torch.randint(0, VOCAB, (3, 11))
    expected, exact = torch_loss(logits, target)
    expected.backward()
    mine = logits.clone().requires_grad_()
    loss = cross_entropy(mine[..., :], target)
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(mine.grad.double(), exact.grad.view(3, 11, VOCAB), rtol=1e-5, atol=1e-7)


def test_an_op_that_saved_the_logits_fails_loudly_instead_of_using_the_gradient() -> None:
    z = torch.randn(4, 10, requires_grad=True)
    logits = torch.exp(z)  # exp keeps its output for backward
    loss = cross_entropy(logits, torch.tensor([1, 2, 3, 4]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_out_of_range_target_gives_nan_not_a_silent_number() -> None:
    target = torch.tensor([1, VOCAB, IGNORE, -3])
    loss = cross_entropy(torch.randn(4, VOCAB), target, reduction="none")
    assert torch.isfinite(loss[0]) and loss[2] == 0
    assert torch.isnan(loss[1]) and torch.isnan(loss[3])


def test_backward_runs_once() -> None:
    logits = torch.randn(4, 10, requires_grad=True)
    loss = cross_entropy(logits * 1, torch.tensor([1, 2, 3, 4]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunk_size", [16, None])
def test_linear_variant_matches_torch(dtype: torch.dtype, reduction: str, chunk_size: int | None) -> None:
    size = 64
    hidden = torch.randn(2, 19, size).to(dtype)
    weight = (torch.randn(VOCAB, size) / size**0.5).to(dtype)
    target = targets(38, VOCAB).view(2, 19)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    expected = F.cross_entropy((h64 @ w64.t()).view(-1, VOCAB), target.view(-1), ignore_index=IGNORE,
                               reduction=reduction, label_smoothing=0.05)
    expected.backward(torch.tensor(0.7, dtype=torch.float64))

    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = fused_linear_cross_entropy(h, w, target, ignore_index=IGNORE, reduction=reduction, label_smoothing=0.05,
                                      chunk_size=chunk_size)
    loss.backward(torch.tensor(0.7))
    # bf16: the logits themselves are a bf16 matmul, as in torch's own bf16 LM head.
    close = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 2e-3}
    torch.testing.assert_close(loss.double(), expected.detach(), **close)
    assert h.grad.shape == hidden.shape and h.grad.dtype == dtype and w.grad.dtype == dtype
    scale = expected.detach().abs() if reduction == "sum" else 1.0
    torch.testing.assert_close(h.grad.double() / scale, h64.grad / scale, **close)
    torch.testing.assert_close(w.grad.double() / scale, w64.grad / scale, **close)


def test_linear_variant_skips_gradients_nobody_needs() -> None:
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(50, 8)  # a frozen head
    target = torch.randint(0, 50, (9,))
    fused_linear_cross_entropy(hidden, weight, target, chunk_size=4).backward()
    hidden64 = hidden.detach().double().requires_grad_()
    F.cross_entropy(hidden64 @ weight.double().t(), target).backward()
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-5, atol=1e-7)
    assert weight.grad is None


def test_linear_variant_in_no_grad_computes_only_the_loss() -> None:
    hidden, weight = torch.randn(9, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    target = torch.randint(0, 50, (9,))
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, target, chunk_size=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight.t(), target).detach())


def test_op_traces_under_torch_compile() -> None:
    def per_row(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        loss, lse = torch.ops.ds.cross_entropy_fwd_bwd(logits, target, IGNORE, 0.0, 2.0)
        return loss + lse

    logits, target = torch.randn(5, 40), torch.randint(0, 40, (5,))
    eager_logits, compiled_logits = logits.clone(), logits.clone()
    compiled = torch.compile(per_row, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(compiled_logits, target), per_row(eager_logits, target))
    torch.testing.assert_close(compiled_logits, eager_logits)
    torch.testing.assert_close(eager_logits, 2 * (torch.softmax(logits, 1) - F.one_hot(target, 40)))


def test_losses_differentiate_inside_torch_compile() -> None:
    def head(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return cross_entropy(hidden @ weight.t(), target) + fused_linear_cross_entropy(hidden, weight, target,
                                                                                       chunk_size=8)

    hidden, weight = torch.randn(16, 8, requires_grad=True), torch.randn(50, 8, requires_grad=True)
    target = torch.randint(0, 50, (16,))
    torch.compile(head, backend="eager")(hidden, weight, target).backward()
    hidden64, weight64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    (2 * F.cross_entropy(hidden64 @ weight64.t(), target)).backward()
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), weight64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: cross_entropy(torch.randn(3, 5), torch.zeros(4, dtype=torch.long)), "target has shape"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.zeros(3)), "integer class indices"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), reduction="avg"), "reduction"),
    (lambda: cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), label_smoothing=1.5), "[0, 1]"),
    (lambda: fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long),
                                        reduction="none"), "'mean' or 'sum'"),
    (lambda: fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 6), torch.zeros(3, dtype=torch.long)),
     "must agree on H"),
    (lambda: fused_linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4).double(),
                                        torch.zeros(3, dtype=torch.long)), "share one floating-point dtype"),
])
def test_bad_arguments_name_the_fix(call, message: str) -> None:
    with pytest.raises(LossInputError, match=message.replace("[", r"\[").replace("]", r"\]")):
        call()
