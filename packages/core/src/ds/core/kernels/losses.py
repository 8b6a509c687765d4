"""Cross-entropy over large vocabularies without a second vocabulary-sized buffer.

With a 128k vocabulary the language-model loss is where training runs out of memory:
torch keeps the logits, their log-softmax and, in backward, a gradient of the same size,
each tokens x vocabulary elements. Here the forward pass computes the loss *and* the
gradient with respect to the logits in one go, writing the gradient over the logits
(one row at a time, with an online softmax), so no second tokens x vocabulary buffer
ever exists; backward only scales what forward left behind::

    from ds.core.kernels import cross_entropy, fused_linear_cross_entropy

    loss = cross_entropy(logits, target)                 # logits is consumed
    loss = fused_linear_cross_entropy(hidden, lm_head.weight, target)

:func:`fused_linear_cross_entropy` goes further: it never materialises the full logits
either. It walks over the tokens in chunks, computes each chunk's logits, turns them into
their gradient in place and immediately folds that into the gradients of the hidden
states and of the weight, so only one chunk of logits is alive at a time.

Both run ``torch.ops.ds.cross_entropy_fwd_bwd``, defined here from its plain-torch
reference (which runs on every device); kernel packages register fused kernels for it.
Neither synchronises with the host: the mean's token count stays a device tensor and is
applied in backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ds.core.errors import DsError
from ds.core.kernels.registry import define_op

REDUCTIONS = ("mean", "sum", "none")
REFERENCE_CHUNK_ELEMENTS = 1 << 24
"""The reference works on this many logits at a time, so a fallback never holds a float32 copy of them all."""
MIN_LINEAR_CHUNK = 256
"""Fewest tokens per chunk of :func:`fused_linear_cross_entropy`: smaller matmuls waste the GPU."""


class LossInputError(DsError, ValueError):
    """Arguments a loss cannot work with; the message names the argument and the fix."""


def cross_entropy_fwd_bwd(
    logits: Tensor, target: Tensor, ignore_index: int = -100, label_smoothing: float = 0.0, grad_scale: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Per-row loss and log-sum-exp of ``logits`` [rows, vocab]; overwrites ``logits`` with the loss gradient.

    With ``s = label_smoothing`` and ``V = vocab``, a row whose target is ``t`` gets
    ``loss = lse - (1 - s) x[t] - s / V * sum(x)`` (torch's smoothed cross-entropy) and the
    gradient ``grad_scale * (softmax(x) - (1 - s) onehot(t) - s / V)`` written over it. A row
    whose target is ``ignore_index`` gets loss 0 and a zero gradient; a target outside
    ``[0, V)`` gets a NaN loss and a NaN gradient row, so a bad label shows up without the
    host waiting for the GPU to check it. ``lse`` is given for every row. Outputs are in
    float32 (float64 for float64 logits).
    """
    torch._check(logits.dim() == 2, lambda: f"logits must be [rows, vocab], got shape {tuple(logits.shape)}")
    torch._check(target.shape == logits.shape[:1],
                 lambda: f"target must have shape ({logits.shape[0]},), got {tuple(target.shape)}")
    rows, vocab = logits.shape
    compute = torch.promote_types(logits.dtype, torch.float32)
    loss = logits.new_empty(rows, dtype=compute)
    lse = logits.new_empty(rows, dtype=compute)
    confidence = 1.0 - label_smoothing
    step = max(1, REFERENCE_CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        x = logits[start:stop].to(compute)
        t = target[start:stop].long()
        kept = t != ignore_index
        in_range = (t >= 0) & (t < vocab)
        safe = torch.where(in_range, t, 0).unsqueeze(1)
        row_lse = torch.logsumexp(x, dim=1)
        row_loss = row_lse - confidence * x.gather(1, safe).squeeze(1)
        if label_smoothing > 0.0:  # skipped at 0: 0 * sum would turn a row with -inf logits into NaN
            row_loss = row_loss - label_smoothing / vocab * x.sum(dim=1)
        nan = torch.full_like(row_loss, float("nan"))
        loss[start:stop] = torch.where(kept, torch.where(in_range, row_loss, nan), 0.0)
        lse[start:stop] = row_lse
        grad = torch.exp(x - row_lse.unsqueeze(1)) - label_smoothing / vocab
        grad.scatter_add_(1, safe, torch.where(in_range, -confidence, 0.0).to(compute).unsqueeze(1))
        row_scale = torch.where(in_range, grad_scale, nan).unsqueeze(1)
        logits[start:stop] = torch.where(kept.unsqueeze(1), grad * row_scale, 0.0)
    return loss, lse


define_op("cross_entropy_fwd_bwd", cross_entropy_fwd_bwd, mutates_args=("logits",))


def _check_common(target: Tensor, expected_shape: torch.Size, device: torch.device, reduction: str,
                  label_smoothing: float) -> None:
    if reduction not in REDUCTIONS:
        raise LossInputError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise LossInputError(f"label_smoothing must lie in [0, 1], got {label_smoothing}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise LossInputError(f"target must hold integer class indices, got dtype {target.dtype}; "
                             "convert it with target.long()")
    if target.shape != expected_shape:
        raise LossInputError(f"target has shape {tuple(target.shape)} but must have shape {tuple(expected_shape)} "
                             "(one class index per row of logits)")
    if target.device != device:
        raise LossInputError(f"target is on {target.device} but the inputs are on {device}; move it there")


def _reduce(row_losses: Tensor, kept: Tensor, reduction: str) -> tuple[Tensor, Tensor | None]:
    """The reduced loss, and the token count the gradient must be divided by (mean only)."""
    if reduction == "none":
        return row_losses, None
    if reduction == "sum":
        return row_losses.sum(), None
    count = kept.sum().to(row_losses.dtype)
    return row_losses.sum() / count, count


def _backward_scale(grad_output: Tensor, count: Tensor | None) -> Tensor:
    return grad_output if count is None else grad_output / count


class _CrossEntropy(torch.autograd.Function):
    """Loss forward; the logits buffer, overwritten with the unscaled gradient, is backward's answer."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, target: Tensor, ignore_index: int, reduction: str,
                label_smoothing: float) -> Tensor:
        vocab = logits.shape[-1]
        rows = logits.detach().reshape(-1, vocab)
        flat_target = target.reshape(-1)
        row_losses, _ = torch.ops.ds.cross_entropy_fwd_bwd(rows, flat_target, ignore_index, label_smoothing, 1.0)
        loss, count = _reduce(row_losses.view(target.shape), flat_target != ignore_index, reduction)
        ctx.save_for_backward(rows)
        ctx.logits_shape = logits.shape
        ctx.count = count
        ctx.reduction = reduction
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        _refuse_second_backward(ctx)
        (grad,) = ctx.saved_tensors
        scale = _backward_scale(grad_output, ctx.count)
        grad.mul_(scale.reshape(-1, 1) if ctx.reduction == "none" else scale)
        return grad.view(ctx.logits_shape), None, None, None, None


def _refuse_second_backward(ctx: Any) -> None:
    if ctx.consumed:
        raise RuntimeError("a fused cross-entropy was differentiated twice: its backward scales the gradient "
                           "it stored in place, so it can run once; recompute the loss instead of retain_graph=True")
    ctx.consumed = True


def cross_entropy(logits: Tensor, target: Tensor, *, ignore_index: int = -100, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Tensor:
    """``F.cross_entropy(logits, target, ...)`` without a gradient buffer the size of ``logits``.

    ``logits`` [..., vocab] (float32, float16 or bfloat16) is **consumed**: the forward
    pass overwrites it with the gradient of the loss, so the caller must not read it
    afterwards (a view that cannot be flattened is copied, and then left untouched). An
    op that saved ``logits`` for its own backward (a soft-capping ``tanh``, say) makes
    autograd fail with its in-place-modification error; apply such ops before.
    ``target`` [...] holds class indices; rows equal to ``ignore_index`` are left out of
    the loss and the mean. The loss is float32 and differentiable once (backward scales
    the stored gradient in place). Matches ``F.cross_entropy`` including label smoothing,
    except that a target outside ``[0, vocab)`` yields NaN instead of an error.
    """
    if logits.dim() < 1 or logits.shape[-1] == 0 or not logits.dtype.is_floating_point:
        raise LossInputError(f"logits must be a floating-point tensor [..., vocab] with vocab > 0, got shape "
                             f"{tuple(logits.shape)} and dtype {logits.dtype}")
    _check_common(target, logits.shape[:-1], logits.device, reduction, label_smoothing)
    return _CrossEntropy.apply(logits, target, ignore_index, reduction, label_smoothing)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both input gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx: Any, hidden: Tensor, weight: Tensor, target: Tensor, ignore_index: int, reduction: str,
                label_smoothing: float, chunk_size: int, grad_enabled: bool) -> Tensor:
        need_hidden, need_weight = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        size = hidden.shape[-1]
        flat_hidden = hidden.reshape(-1, size)
        flat_target = target.reshape(-1)
        rows = flat_hidden.shape[0]
        grad_hidden = torch.empty_like(flat_hidden, memory_format=torch.contiguous_format) if need_hidden else None
        grad_weight = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_weight else None
        row_losses = flat_hidden.new_empty(rows, dtype=torch.float32)
        for start in range(0, rows, chunk_size):
            stop = min(start + chunk_size, rows)
            chunk = flat_hidden[start:stop]
            logits = chunk @ weight.t()
            row_losses[start:stop], _ = torch.ops.ds.cross_entropy_fwd_bwd(
                logits, flat_target[start:stop], ignore_index, label_smoothing, 1.0)
            if grad_hidden is not None:
                torch.mm(logits, weight, out=grad_hidden[start:stop])
            if grad_weight is not None:
                grad_weight.addmm_(logits.t(), chunk)
            del logits
        loss, count = _reduce(row_losses, flat_target != ignore_index, reduction)
        ctx.grads = (grad_hidden, grad_weight)
        ctx.hidden_shape = hidden.shape
        ctx.count = count
        ctx.consumed = False
        return loss

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        _refuse_second_backward(ctx)
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = (None, None)
        scale = _backward_scale(grad_output, ctx.count)
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(scale).view(ctx.hidden_shape)
        if grad_weight is not None:
            grad_weight.mul_(scale)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, ignore_index: int = -100,
                               reduction: str = "mean", label_smoothing: float = 0.0,
                               chunk_size: int | None = None) -> Tensor:
    """``cross_entropy(hidden @ weight.T, target)`` without ever holding all the logits.

    ``hidden`` [..., H] and ``weight`` [V, H] (the language-model head, same dtype) are
    multiplied ``chunk_size`` tokens at a time; each chunk's logits become their gradient
    in place and are folded at once into the gradients of ``hidden`` and ``weight``
    (accumulated in ``weight``'s dtype, as autograd would), which forward keeps for
    backward. So forward does the work of backward too, and memory is one chunk of logits
    plus the two gradients. ``chunk_size`` defaults to the number of tokens whose logits
    take no more memory than ``hidden`` (at least 256). ``reduction`` is ``"mean"`` or
    ``"sum"``: a per-token loss would need its upstream gradient before forward ends.
    """
    if reduction == "none":
        raise LossInputError("fused_linear_cross_entropy needs reduction 'mean' or 'sum': its gradients are "
                             "computed in forward, before a per-token upstream gradient exists; use cross_entropy "
                             "on materialised logits for reduction='none'")
    if hidden.dim() < 1 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise LossInputError(f"hidden [..., H] and weight [V, H] must agree on H, got shapes {tuple(hidden.shape)} "
                             f"and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype or not hidden.dtype.is_floating_point:
        raise LossInputError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share one floating-point "
                             "dtype; cast one of them")
    if weight.device != hidden.device:
        raise LossInputError(f"weight is on {weight.device} but hidden is on {hidden.device}; move it there")
    _check_common(target, hidden.shape[:-1], hidden.device, reduction, label_smoothing)
    if chunk_size is None:
        rows = hidden.numel() // max(hidden.shape[-1], 1)
        chunk_size = max(MIN_LINEAR_CHUNK, -(-rows * hidden.shape[-1] // max(weight.shape[0], 1)))
    if chunk_size < 1:
        raise LossInputError(f"chunk_size must be a positive number of tokens, got {chunk_size}")
    return _LinearCrossEntropy.apply(hidden, weight, target, ignore_index, reduction, label_smoothing, chunk_size,
                                     torch.is_grad_enabled())


__all__ = ["LossInputError", "cross_entropy", "cross_entropy_fwd_bwd", "fused_linear_cross_entropy"]
