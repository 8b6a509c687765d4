"""The fused cross-entropy kernel against float64 torch on a GPU, and the memory it saves.

``torch.ops.ds.cross_entropy_fwd_bwd`` writes the gradient over the logits; it is checked
element by element against float64 math on the same (upcast) logits. A 16-bit gradient is
rounded three times to the stored dtype: the op's output, then the backward's in-place
``grad.mul_(grad_output / count)``, whose float32 0-dim scale torch's CUDA kernel first casts
to the gradient's dtype (1/876 in bfloat16 is 0.25% off), and the product. So the bound is
(1 + u)**3 - 1 relative with u the dtype's unit roundoff (bfloat16 2**-8, float16 2**-11;
the 3u**2 term covers the float32 arithmetic's ~1e-6), float16 plus 2**-24 absolute
(gradients of 1/vocab size sit among float16's subnormals); float32 1e-5 relative (the
kernel's exp2/log approximations). Label smoothing subtracts s/vocab, so the
relative bound applies to |gradient| + s/vocab.
Losses and log-sum-exps are float32 from the exact inputs: 1e-5 relative + 1e-4 absolute.
Memory the ops allocate from is poisoned with NaN bytes first, so an unwritten output fails.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds.core.kernels import cross_entropy, fused_linear_cross_entropy
from ds.core.testing.kernel_checks import poison, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

IGNORE = -100
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
VOCABS = [32000, 50257, 128256]
GRAD_BOUND = {
    torch.float32: (1e-5, 0.0),
    torch.float16: ((1 + 2**-11) ** 3 - 1, 2**-24),
    torch.bfloat16: ((1 + 2**-8) ** 3 - 1, 0.0),
}


@pytest.fixture(autouse=True)
def native_kernels(installed):
    choice = installed.choice("cross_entropy_fwd_bwd", "cuda")
    assert choice.backend == "cuda-native", choice
    yield installed


def targets(rows: int, vocab: int) -> torch.Tensor:
    t = torch.randint(0, vocab, (rows,), device="cuda")
    t[::7] = IGNORE
    t[1] = vocab - 1  # the last column is the scalar tail for odd vocabularies
    t[2] = 0          # the first is in the scalar head when a row starts unaligned
    return t


def expected(logits: torch.Tensor, target: torch.Tensor, smoothing: float, scale: float):
    """Per-row loss, lse and gradient in float64, from the exact values of ``logits``."""
    x = logits.double()
    vocab = x.shape[1]
    lse = torch.logsumexp(x, 1)
    loss = F.cross_entropy(x, target, ignore_index=IGNORE, reduction="none", label_smoothing=smoothing)
    kept = (target != IGNORE).unsqueeze(1)
    onehot = F.one_hot(target.clamp_min(0), vocab).double()
    grad = torch.softmax(x, 1) - (1 - smoothing) * onehot - smoothing / vocab
    return loss, lse, torch.where(kept, grad * scale, 0.0)


def assert_gradient(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, smoothing: float) -> None:
    rtol, atol = GRAD_BOUND[dtype]
    out = out.double()
    assert not torch.isnan(out).any(), "NaN in the gradient: an element was not written"
    allowed = rtol * (ref.abs() + smoothing / ref.shape[1]) + atol
    excess = ((out - ref).abs() - allowed).max().item()
    assert excess <= 0, f"gradient off by {excess:.3g} beyond the {dtype} bound"


def assert_rows(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not torch.isnan(out).any(), "NaN in a per-row output: a row was not written"
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_kernel_matches_float64(dtype: torch.dtype, vocab: int, smoothing: float) -> None:
    rows = 37
    logits = (torch.randn(rows, vocab, device="cuda") * 2).to(dtype)
    target = targets(rows, vocab)
    loss_ref, lse_ref, grad_ref = expected(logits, target, smoothing, 0.5)
    poison()
    loss, lse = torch.ops.ds.cross_entropy_fwd_bwd(logits, target, IGNORE, smoothing, 0.5)
    assert loss.dtype == lse.dtype == torch.float32
    assert_rows(loss, loss_ref)
    assert_rows(lse, lse_ref)
    assert_gradient(logits, grad_ref, dtype, smoothing)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_of_a_wider_buffer_are_written_in_place_and_nothing_else(dtype: torch.dtype) -> None:
    rows, vocab, pad = 21, 50257, 11  # odd row stride: every row starts at a different alignment
    buffer = (torch.randn(rows, vocab + pad, device="cuda") * 2).to(dtype)
    buffer[:, vocab:] = 512.0  # exact in every float dtype
    logits = buffer[:, :vocab]
    target = targets(rows, vocab)
    loss_ref, _, grad_ref = expected(logits, target, 0.0, 1.0)
    poison()
    loss, _ = torch.ops.ds.cross_entropy_fwd_bwd(logits, target, IGNORE, 0.0, 1.0)
    assert_rows(loss, loss_ref)
    assert_gradient(buffer[:, :vocab], grad_ref, dtype, 0.0)
    assert (buffer[:, vocab:] == 512.0).all(), "the kernel wrote past the end of a row"


def test_transposed_logits_are_computed_and_written_back() -> None:
    rows, vocab = 19, 32000
    logits = torch.randn(vocab, rows, device="cuda", dtype=torch.bfloat16).t()
    target = targets(rows, vocab)
    loss_ref, _, grad_ref = expected(logits, target, 0.0, 1.0)
    loss, _ = torch.ops.ds.cross_entropy_fwd_bwd(logits, target, IGNORE, 0.0, 1.0)
    assert_rows(loss, loss_ref)
    assert_gradient(logits, grad_ref, torch.bfloat16, 0.0)


def test_bad_targets_and_masked_logits() -> None:
    vocab = 1001
    logits = torch.randn(4, vocab, device="cuda")
    logits[0, 500:] = float("-inf")  # a masked tail must not turn the row into NaN
    target = torch.tensor([3, vocab, IGNORE, -2], device="cuda")
    loss_ref, _, grad_ref = expected(logits[:1], target[:1], 0.0, 1.0)
    loss, lse = torch.ops.ds.cross_entropy_fwd_bwd(logits, target, IGNORE, 0.0, 1.0)
    assert_rows(loss[:1], loss_ref)
    assert_gradient(logits[:1], grad_ref, torch.float32, 0.0)
    assert torch.isnan(loss[1]) and torch.isnan(loss[3]) and loss[2] == 0
    assert torch.isnan(logits[1]).all() and (logits[2] == 0).all() and torch.isfinite(lse).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cross_entropy_matches_torch_and_allocates_no_second_logits_buffer(dtype: torch.dtype) -> None:
    rows, vocab = 1023, 128256
    source = (torch.randn(rows, vocab, device="cuda") * 2).to(dtype)
    target = targets(rows, vocab)
    exact = source.double().requires_grad_()
    reference = F.cross_entropy(exact, target, ignore_index=IGNORE, label_smoothing=0.1)
    reference.backward()

    leaf = source.clone().requires_grad_()
    logits = leaf * 1  # a non-leaf, as an LM head's output is
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = cross_entropy(logits, target, ignore_index=IGNORE, label_smoothing=0.1)
    (grad,) = torch.autograd.grad(loss, logits)
    extra = torch.cuda.max_memory_allocated() - before
    assert extra < logits.numel() * logits.element_size() // 16, f"{extra} bytes beyond the logits"
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-5, atol=1e-5)
    assert_gradient(grad, exact.grad, dtype, 0.1 / (target != IGNORE).sum().item())


def test_linear_variant_matches_float64_and_never_holds_all_logits() -> None:
    tokens, size, vocab = 2049, 128, 32000
    hidden = torch.randn(tokens, size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(vocab, size, device="cuda") / size**0.5).to(torch.bfloat16).requires_grad_()
    target = targets(tokens, vocab)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    reference = F.cross_entropy(h64 @ w64.t(), target, ignore_index=IGNORE)
    reference.backward()

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fused_linear_cross_entropy(hidden, weight, target, ignore_index=IGNORE, chunk_size=256)
    loss.backward()
    extra = torch.cuda.max_memory_allocated() - before
    full_logits = tokens * vocab * 2
    assert extra < full_logits // 2, f"peak {extra} bytes, the full logits would take {full_logits}"
    # The logits are a bf16 matmul, as in torch's own bf16 LM head: bf16-level agreement.
    torch.testing.assert_close(loss.double(), reference.detach(), rtol=1e-2, atol=1e-2)
    for got, want in ((hidden.grad, h64.grad), (weight.grad, w64.grad)):
        assert rel_error(got, want) < 2e-2
