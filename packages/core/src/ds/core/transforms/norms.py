"""Kernel injection: a model's RMSNorm and LayerNorm modules run ds's fused norm ops.

In eager torch a Hugging Face RMSNorm is half a dozen kernels (upcast, square, mean,
rsqrt, two multiplies, downcast), each reading and writing the whole activation; a
decoder runs two per layer, forward and backward. ``torch.ops.ds.rms_norm`` and
``layer_norm`` do the work in one pass on a GPU with ds-kernels-cuda installed (the
torch reference elsewhere), have their own fused backward, and trace under
torch.compile.

Modules are recognised by structure, not by a list of model classes, so new Hugging
Face models work without a ds release:

* an RMSNorm is a module whose class name ends in ``RMSNorm``, whose only parameter is a
  1-D ``weight``, which has a float ``variance_epsilon`` or ``eps`` and no children, and
  which computes what ``ds::rms_norm`` computes. The last point is checked once per class
  by running the module's own forward on a small random input with a random weight, so
  look-alikes with other formulas (Gemma's ``x * (1 + weight)``, gated norms taking a
  second input) are left alone;
* a LayerNorm is exactly ``torch.nn.LayerNorm`` over one dimension with an affine weight
  (a bias is optional).

A replacement holds the original ``Parameter`` objects under the original attribute
names, so parameter names, state dicts, checkpoints and the optimizer's parameter groups
do not change. Norms whose weight is already a DTensor (tensor or sequence parallel ran
first) are left to the module's own forward, since the ops take plain tensors.

The output dtype is the input's, as in every ds op; Hugging Face's RMSNorm returns the
promoted dtype of weight and input, which differs only when the two differ (the ds
engine casts both to the compute dtype).
"""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.func import functional_call

from ds.core.kernels import ops

if TYPE_CHECKING:
    from ds.core.config import DsConfig
    from ds.core.partition import PartitionContext

logger = logging.getLogger(__name__)

PROBE_ROWS = 3
PROBE_TOLERANCE = 1e-5
"""Relative and absolute float32 tolerance of the per-class check against ``ds::rms_norm``."""


class FusedRMSNorm(nn.Module):
    """RMS normalization through ``torch.ops.ds.rms_norm``, holding the replaced module's weight."""

    def __init__(self, weight: nn.Parameter, eps: float, replaced: str) -> None:
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.replaced = replaced

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, replaces={self.replaced}"


class FusedLayerNorm(nn.Module):
    """Layer normalization through ``torch.ops.ds.layer_norm``, holding the replaced module's parameters."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, eps: float) -> None:
        super().__init__()
        self.weight = weight
        self.register_parameter("bias", bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, bias={self.bias is not None}"


def _rms_epsilon(module: nn.Module) -> float | None:
    for attribute in ("variance_epsilon", "eps"):
        value = getattr(module, attribute, None)
        if isinstance(value, float):
            return value
    return None


def _looks_like_rms_norm(module: nn.Module) -> bool:
    if not type(module).__name__.endswith("RMSNorm") or next(module.children(), None) is not None:
        return False
    weight = getattr(module, "weight", None)
    params = list(module.parameters())
    return isinstance(weight, nn.Parameter) and weight.dim() == 1 and len(params) == 1 and params[0] is weight


def _computes_rms_norm(module: nn.Module, eps: float) -> bool:
    """Whether the module's forward equals ``ds::rms_norm`` on a random probe (weight swapped in, on the CPU).

    A private generator keeps the global random state untouched, so a run with injection
    draws the same dropout masks and initialisations as one without.
    """
    size = module.weight.shape[0]
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(PROBE_ROWS, size, generator=generator)
    weight = torch.randn(size, generator=generator)
    try:
        with torch.no_grad():
            got = functional_call(module, {"weight": weight}, (x,))
    except Exception:  # noqa: BLE001 - any failure (extra inputs, other shapes) means "not a plain RMSNorm"
        return False
    expected = ops.rms_norm(x, weight, eps)
    return (isinstance(got, torch.Tensor) and got.shape == expected.shape
            and torch.allclose(got.float(), expected, rtol=PROBE_TOLERANCE, atol=PROBE_TOLERANCE))


def _is_affine_layer_norm(module: nn.Module) -> bool:
    return type(module) is nn.LayerNorm and module.elementwise_affine and len(module.normalized_shape) == 1


def _replacement(module: nn.Module, probed: dict[type[nn.Module], bool]) -> nn.Module | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and isinstance(weight.data, DTensor):
        return None
    if _is_affine_layer_norm(module):
        return FusedLayerNorm(module.weight, module.bias, float(module.eps))
    eps = _rms_epsilon(module)
    if eps is not None and _looks_like_rms_norm(module):
        cls = type(module)
        if cls not in probed:
            probed[cls] = _computes_rms_norm(module, eps)
        if probed[cls]:
            return FusedRMSNorm(module.weight, eps, cls.__name__)
    return None


def inject_norm_kernels(model: nn.Module) -> Counter[str]:
    """Replace every recognised norm inside ``model`` in place; count replacements by class name.

    A norm shared by several parents is replaced by one shared replacement. ``model``
    itself is never replaced (only its descendants are).
    """
    probed: dict[type[nn.Module], bool] = {}
    replacements: dict[int, nn.Module | None] = {}
    replaced: Counter[str] = Counter()
    for path, child in list(model.named_modules(remove_duplicate=False))[1:]:
        if id(child) not in replacements:
            replacements[id(child)] = _replacement(child, probed)
            if replacements[id(child)] is not None:
                replaced[type(child).__name__] += 1
        new = replacements[id(child)]
        if new is not None:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, new)
    rejected = sorted(cls.__name__ for cls, ok in probed.items() if not ok)
    if rejected:
        logger.info("kernel injection: %s look like RMSNorm but compute something else; left unchanged",
                    ", ".join(rejected))
    return replaced


class NormKernelInjection:
    """``kernels.inject``: RMSNorm and LayerNorm modules run ds's fused norm ops."""

    name = "kernel-injection-norms"
    order = 600

    def applies(self, config: DsConfig) -> bool:
        return config.kernels.inject

    def apply(self, module: nn.Module, context: PartitionContext) -> nn.Module:  # noqa: ARG002 - protocol
        replaced = inject_norm_kernels(module)
        if replaced:
            logger.info("kernel injection: %s", ", ".join(f"{n} x{c}" for n, c in sorted(replaced.items())))
        else:
            warnings.warn(
                f"kernels.inject is on but no RMSNorm or LayerNorm module of {type(module).__name__} was "
                "recognised, so nothing was replaced (see ds.core.transforms.norms for what is recognised). "
                "Set kernels.inject to false to silence this.",
                stacklevel=2,
            )
        return module
