"""The gradient side of a ZeRO 1/2 flat group: its full bucket and its reduced slice.

:class:`~ds.zero.stage12.ShardedOptimizerPartitioner` decides when a bucket is reduced; this
module only holds the buffers and the rules for filling them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from ds.zero.flat_group import FlatGroup


class GradientBucket:
    """Gradient bookkeeping of one flat group; every buffer here exists only inside a window.

    ``full_grad`` (the whole bucket, reduce dtype) is allocated when the bucket's first
    gradient of a window arrives. Stage 1 keeps it until the step, and after the
    reduce-scatter its own slice, ``shard_grad``, holds the reduced gradient. Stage 2
    frees it as soon as the reduce-scatter is done; ``shard_grad`` is then its own
    buffer, created by the window's first reduction (which writes straight into it) and
    accumulated into by later micro-steps. Both are dropped by ``release`` after the step,
    so between steps, when the next forward builds its activations, no gradient memory
    is held (as with torch's ``zero_grad(set_to_none=True)``).

    ``full_grad`` is allocated uninitialised: a parameter's first gradient is copied into
    its view and later ones added, and views no gradient reached are zeroed just before the
    reduction. Zero-filling the bucket and adding every gradient to it moved twice the bytes
    per gradient element (a model-sized write and read more per backward).
    """

    def __init__(self, group: FlatGroup, reduce_dtype: torch.dtype, *, persistent_full: bool) -> None:
        self.group = group
        self.dtype = reduce_dtype
        self.ready = 0
        self.full_grad: torch.Tensor | None = None
        self.shard_grad: torch.Tensor | None = None
        self.views: list[torch.Tensor] = []
        self.written: list[bool] = []
        self.pending: tuple[Any, torch.Tensor] | None = None
        self.launched = False  # reduced at least once since the last zero_grad
        self.persistent_full = persistent_full

    def allocate(self) -> None:
        self.full_grad = torch.empty(self.group.padded_numel, dtype=self.dtype, device=self.group.full.device)
        self.full_grad[self.group.numel :].zero_()  # the padding that evens the ranks' slices
        self.views = self.group.param_views(self.full_grad)
        self.written = [False] * len(self.views)
        if self.persistent_full:
            self.shard_grad = self.full_grad[self.group.lo : self.group.hi]

    def accumulate(self, index: int, grad: torch.Tensor) -> None:
        if self.written[index]:
            self.views[index].add_(grad)
        else:
            self.views[index].copy_(grad)
            self.written[index] = True

    def zero_unwritten(self) -> None:
        """Zero the views of parameters no gradient reached, before the bucket is reduced."""
        for index, view in enumerate(self.views):
            if not self.written[index]:
                view.zero_()
                self.written[index] = True

    def reduced_gradient(self) -> torch.Tensor:
        """This rank's summed gradient slice; zeros when nothing reached the bucket."""
        if self.shard_grad is None:
            self.shard_grad = torch.zeros(self.group.shard_numel, dtype=self.dtype, device=self.group.full.device)
        return self.shard_grad

    def release(self) -> None:
        self.ready = 0
        self.launched = False
        self.shard_grad = None
        self.drop_full()

    def drop_full(self) -> None:
        self.full_grad, self.views, self.written = None, [], []
