"""Model transforms: rewrites of the user's model applied before partitioning.

Plugins register transforms with ``ds_register_model_transforms``; core registers its own:

* :class:`ds.core.transforms.norms.NormKernelInjection` (``kernels.inject``, order 600):
  RMSNorm and LayerNorm modules run ds's fused norm ops;
* :class:`ds.core.transforms.causal_lm_loss.FusedCrossEntropy`
  (``kernels.fused_cross_entropy``, order 610): a Hugging Face causal LM's loss without
  materialised logits;
* :class:`ds.core.transforms.compile.CompileBlocks` (``compile.enabled``, order 700):
  ``torch.compile`` of each repeated block, in place.

Every one of them keeps parameter names, so checkpoints do not depend on the switches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from torch import nn

if TYPE_CHECKING:
    from ds.core.config import DsConfig
    from ds.core.partition import PartitionContext


class ModelTransform(Protocol):
    """A rewrite such as tensor parallelism, expert parallelism or kernel injection.

    ``order`` fixes where it runs among the others (lower first; the hook spec lists
    the conventional values) so composition never depends on plugin load order.
    """

    name: str
    order: int

    def applies(self, config: DsConfig) -> bool:
        """Whether the config asks for this transform."""

    def apply(self, module: nn.Module, context: PartitionContext) -> nn.Module:
        """Return the rewritten module (may be the same object, modified in place)."""
