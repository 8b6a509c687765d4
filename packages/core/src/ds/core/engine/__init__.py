"""The training engine and ``initialize``, DeepSpeed's entry point."""

from ds.core.engine.engine import Engine
from ds.core.engine.initialize import initialize, precision_policy
from ds.core.engine.loss_scaler import LossScaler

__all__ = ["Engine", "LossScaler", "initialize", "precision_policy"]
