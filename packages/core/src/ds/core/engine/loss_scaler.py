"""fp16 loss scaling with DeepSpeed's semantics.

Dynamic scaling starts at ``2**initial_scale_power``. An overflow consumes one unit of
hysteresis; when none is left the scale halves (never below ``min_loss_scale``). After
``loss_scale_window`` steps without overflow the scale doubles. With
``consecutive_hysteresis`` every clean step refills the hysteresis. A static
``loss_scale`` > 0 never changes. bf16 and fp32 training use a fixed scale of 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class LossScaler:
    scale: float = 1.0
    dynamic: bool = False
    scale_window: int = 1000
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    min_scale: float = 1.0
    iteration: int = 0
    last_overflow_iteration: int = -1
    remaining_hysteresis: int = 2

    @classmethod
    def from_config(cls, fp16: Any) -> LossScaler:
        """Build from the ``fp16`` config section; a disabled section gives scale 1."""
        if not fp16.enabled:
            return cls()
        if fp16.loss_scale and fp16.loss_scale > 0:
            return cls(scale=float(fp16.loss_scale))
        return cls(
            scale=float(2 ** fp16.initial_scale_power),
            dynamic=True,
            scale_window=int(fp16.loss_scale_window),
            hysteresis=int(fp16.hysteresis),
            consecutive_hysteresis=bool(fp16.consecutive_hysteresis),
            min_scale=float(fp16.min_loss_scale),
            remaining_hysteresis=int(fp16.hysteresis),
        )

    def update(self, overflow: bool) -> None:
        """Advance one optimizer step, given whether its gradients overflowed."""
        if not self.dynamic:
            return
        if overflow:
            if self.hysteresis == 1 or self.remaining_hysteresis <= 1:
                self.scale = max(self.scale / 2, self.min_scale)
            else:
                self.remaining_hysteresis -= 1
            self.last_overflow_iteration = self.iteration
        else:
            if self.consecutive_hysteresis:
                self.remaining_hysteresis = self.hysteresis
            if (self.iteration - self.last_overflow_iteration) % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.remaining_hysteresis = self.hysteresis
                self.scale *= 2
        self.iteration += 1

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
