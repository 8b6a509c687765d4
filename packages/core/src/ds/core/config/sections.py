"""Core's config sections, spelled as DeepSpeed spells them.

Defaults are DeepSpeed's, so a ``ds_config.json`` means the same thing here as there.
Keys DeepSpeed has that ds does not honour yet are not fields: the loader rejects them
with a message that says so (:data:`ds.core.config.keys.NOT_YET_SUPPORTED`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    field_validator,
)

from ds.core.config.auto import AutoContext, AutoResolve, drop_auto_values
from ds.core.config.base import SectionModel
from ds.core.config.keys import closest
from ds.core.config.schedules import SCHEDULE_PARAMS
from ds.core.errors import ConfigError


def _enabled_when_weights_are(dtype: str) -> AutoResolve:
    """``"auto"`` for a precision switch: on when the model's weights already are that dtype."""

    def resolve(context: AutoContext) -> bool:
        return context.param_dtype == dtype

    return AutoResolve(resolve)


class Fp16Config(SectionModel):
    """fp16 mixed precision with loss scaling; ``loss_scale`` 0 means dynamic scaling."""

    enabled: Annotated[bool, _enabled_when_weights_are("fp16")] = False
    loss_scale: NonNegativeFloat = 0.0
    initial_scale_power: Annotated[int, Field(ge=0, le=64)] = 16
    loss_scale_window: PositiveInt = 1000
    hysteresis: PositiveInt = 2
    consecutive_hysteresis: bool = False
    min_loss_scale: PositiveFloat = 1.0


class Bf16Config(SectionModel):
    """bf16 mixed precision (no loss scaling needed)."""

    enabled: Annotated[bool, _enabled_when_weights_are("bf16")] = False
    immediate_grad_update: bool = False
    check_grad_overflow: bool = False


class OptimizerConfig(SectionModel):
    """An optimizer by registered name; ``params`` go to its factory as keywords.

    ``"auto"`` params are removed so the optimizer's own defaults apply.
    """

    type: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _drop_auto(cls, value: Any) -> Any:
        return drop_auto_values(value) if isinstance(value, dict) else value


class SchedulerConfig(SectionModel):
    """One of DeepSpeed's learning-rate schedules and the parameters the user set.

    ``type`` is matched without regard to case and stored as DeepSpeed spells it.
    ``params`` are checked against :data:`ds.core.config.schedules.SCHEDULE_PARAMS` when
    the config loads; the ones left out take the schedule's defaults.
    """

    type: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("type")
    @classmethod
    def _known_schedule(cls, value: str) -> str:
        by_lower = {name.lower(): name for name in SCHEDULE_PARAMS}
        if value.lower() not in by_lower:
            suggestion = closest(value, SCHEDULE_PARAMS)
            hint = f"did you mean {suggestion!r}? " if suggestion else ""
            raise ValueError(f"unknown schedule {value!r}; {hint}ds implements {', '.join(SCHEDULE_PARAMS)}")
        return by_lower[value.lower()]


class ActivationCheckpointingConfig(SectionModel):
    """DeepSpeed's activation checkpointing switches."""

    partition_activations: bool = False
    contiguous_memory_optimization: bool = False
    cpu_checkpointing: bool = False
    number_checkpoints: PositiveInt | None = None
    synchronize_checkpoint_boundary: bool = False
    profile: bool = False


class MonitorConfig(SectionModel):
    """A metrics writer on rank 0 (``tensorboard``, ``csv_monitor``)."""

    enabled: bool = False
    output_path: str = ""
    job_name: str = "DeepSpeedJobName"


class WandbConfig(SectionModel):
    """Weights & Biases logging on rank 0."""

    enabled: bool = False
    team: str | None = None
    group: str | None = None
    project: str = "deepspeed"


class CheckpointConfig(SectionModel):
    """How checkpoint tags are checked across ranks; every ds checkpoint is universal,
    so ``load_universal`` only documents intent."""

    tag_validation: Literal["Ignore", "Warn", "Fail"] = "Warn"
    load_universal: bool = False

    @field_validator("tag_validation", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        return value.capitalize() if isinstance(value, str) else value


class CommunicatorConfig(SectionModel):
    """Which communicator plugin runs collectives, and its watchdog."""

    backend: str = "torch"
    timeout_seconds: PositiveFloat = 1800.0
    log_collectives: bool = False


class CommsLoggerConfig(SectionModel):
    """DeepSpeed's ``comms_logger``; ``enabled`` turns on ``communicator.log_collectives``."""

    enabled: bool = False
    verbose: bool = False
    prof_all: bool = True
    debug: bool = False
    prof_ops: list[str] = Field(default_factory=list)


class MeshConfig(SectionModel):
    """Parallel degrees; data parallelism takes the remaining processes:
    ``dp = world_size / (pp * tp * sp)``, and experts are spread over ``ep`` of the dp ranks."""

    pp: PositiveInt = 1
    tp: PositiveInt = 1
    sp: PositiveInt = 1
    ep: PositiveInt = 1

    def data_parallel_size(self, world_size: int) -> int:
        model_parallel = self.pp * self.tp * self.sp
        dp, remainder = divmod(world_size, model_parallel)
        if remainder or dp == 0:
            raise ConfigError(
                f"mesh: pp {self.pp} * tp {self.tp} * sp {self.sp} = {model_parallel} does not divide "
                f"the world size {world_size}. Choose degrees whose product divides the number of processes."
            )
        if dp % self.ep:
            raise ConfigError(
                f"mesh: ep {self.ep} does not divide the data-parallel size {dp} "
                f"(world size {world_size} / {model_parallel}). Choose an ep that divides {dp}."
            )
        return dp


class KernelsConfig(SectionModel):
    """ds's own switches (DeepSpeed has no such section) for fused kernels swapped into the model.

    ``inject`` makes Hugging Face-style RMSNorm modules and ``torch.nn.LayerNorm`` run
    ``torch.ops.ds.rms_norm`` / ``layer_norm``; ``fused_cross_entropy`` makes a Hugging
    Face causal LM compute its loss from the hidden states without materialising the
    logits. Both keep parameter names, so checkpoints are unchanged
    (:mod:`ds.core.transforms`).
    """

    inject: bool = False
    fused_cross_entropy: bool = False


class CompileConfig(SectionModel):
    """``torch.compile`` of each repeated block of the model, in place, before partitioning.

    Not DeepSpeed's ``compile`` section, which switches DeepCompile (``deepcompile``,
    ``offload_activation``, ...) and leaves ``torch.compile`` to ``engine.compile()``:
    these five keys are ``torch.compile``'s own arguments and nothing more. DeepCompile's
    keys are rejected when switched on (:data:`ds.core.config.keys.NOT_YET_SUPPORTED`).
    """

    enabled: bool = False
    backend: str = "inductor"
    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] | None = None
    fullgraph: bool = False
    dynamic: bool | None = False


CORE_SECTIONS: dict[str, type[SectionModel]] = {
    "fp16": Fp16Config,
    "bf16": Bf16Config,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "activation_checkpointing": ActivationCheckpointingConfig,
    "tensorboard": MonitorConfig,
    "csv_monitor": MonitorConfig,
    "wandb": WandbConfig,
    "checkpoint": CheckpointConfig,
    "communicator": CommunicatorConfig,
    "comms_logger": CommsLoggerConfig,
    "mesh": MeshConfig,
    "kernels": KernelsConfig,
    "compile": CompileConfig,
}
"""Core's top-level sections, which core's builtin plugin registers."""
