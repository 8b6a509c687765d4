"""The root of the config tree: DeepSpeed's top-level scalars and core's sections.

Sections that plugins register are validated by their own models and reached through
:meth:`DsConfig.section`; :meth:`DsConfig.to_dict` shows the whole tree.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    PrivateAttr,
    field_validator,
    model_validator,
)

from ds.core.config.auto import AutoResolve
from ds.core.config.base import SectionModel
from ds.core.config.sections import (
    CORE_SECTIONS,
    ActivationCheckpointingConfig,
    Bf16Config,
    CheckpointConfig,
    CommsLoggerConfig,
    CommunicatorConfig,
    CompileConfig,
    Fp16Config,
    KernelsConfig,
    MeshConfig,
    MonitorConfig,
    OptimizerConfig,
    SchedulerConfig,
    WandbConfig,
)

_DTYPE_SPELLINGS = {"fp32": "fp32", "float32": "fp32", "float": "fp32", "fp16": "fp16", "float16": "fp16",
                    "half": "fp16", "bf16": "bf16", "bfloat16": "bf16"}


class DsConfig(SectionModel):
    """A validated ds config with every value resolved (no ``"auto"`` left).

    Build one with :func:`ds.core.config.load_config`; constructing it directly gives a
    valid single-process config (``DsConfig()`` trains with batch size 1), but skips
    plugin sections, batch arithmetic and ``"auto"`` resolution.
    """

    renamed_keys: ClassVar[dict[str, str]] = {
        "bfloat16": "bf16",
        "train_micro_batch_size": "train_micro_batch_size_per_gpu",
        "micro_batch_size_per_gpu": "train_micro_batch_size_per_gpu",
    }

    train_batch_size: PositiveInt = 1
    train_micro_batch_size_per_gpu: PositiveInt = 1
    gradient_accumulation_steps: PositiveInt = 1
    steps_per_print: PositiveInt = 10
    wall_clock_breakdown: bool = False
    seed: int | None = None
    gradient_clipping: Annotated[NonNegativeFloat, AutoResolve(lambda ctx: 1.0)] = 0.0
    prescale_gradients: bool = False
    gradient_predivide_factor: PositiveFloat = 1.0
    dataloader_drop_last: bool = False
    communication_data_type: Literal["fp32", "fp16", "bf16"] | None = None
    zero_allow_untested_optimizer: bool = False
    zero_force_ds_cpu_optimizer: bool = True

    optimizer: OptimizerConfig | None = None
    scheduler: SchedulerConfig | None = None
    fp16: Fp16Config = Field(default_factory=Fp16Config)
    bf16: Bf16Config = Field(default_factory=Bf16Config)
    activation_checkpointing: ActivationCheckpointingConfig = Field(default_factory=ActivationCheckpointingConfig)
    tensorboard: MonitorConfig = Field(default_factory=MonitorConfig)
    csv_monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    communicator: CommunicatorConfig = Field(default_factory=CommunicatorConfig)
    comms_logger: CommsLoggerConfig = Field(default_factory=CommsLoggerConfig)
    mesh: MeshConfig = Field(default_factory=MeshConfig)
    kernels: KernelsConfig = Field(default_factory=KernelsConfig)
    compile: CompileConfig = Field(default_factory=CompileConfig)

    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _sections: dict[str, BaseModel] = PrivateAttr(default_factory=dict)
    _world_size: int = PrivateAttr(default=1)
    _dp_world_size: int = PrivateAttr(default=1)

    @field_validator("communication_data_type", mode="before")
    @classmethod
    def _dtype_spelling(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _DTYPE_SPELLINGS.get(value.strip().lower(), value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> DsConfig:
        if self.fp16.enabled and self.bf16.enabled:
            raise ValueError("fp16.enabled and bf16.enabled are both true; enable at most one of them")
        if self.comms_logger.enabled:
            self.communicator.log_collectives = True
        return self

    def _attach(self, *, raw: dict[str, Any], sections: dict[str, BaseModel], world_size: int,
                dp_world_size: int) -> None:
        """Record what the loader found beyond core's fields (called once, by the loader)."""
        self._raw = raw
        self._sections = sections
        self._world_size = world_size
        self._dp_world_size = dp_world_size

    @property
    def raw(self) -> dict[str, Any]:
        """The config as the user wrote it, before renames, defaults and ``"auto"``."""
        return self._raw

    @property
    def world_size(self) -> int:
        """The number of processes this config was resolved for."""
        return self._world_size

    @property
    def dp_world_size(self) -> int:
        """The data-parallel size the batch sizes were resolved with."""
        return self._dp_world_size

    def section(self, key: str) -> BaseModel | None:
        """A top-level section by config key: a plugin's validated model instance, or
        core's; None when the config does not have it (so its owner uses its defaults)."""
        if key in CORE_SECTIONS:
            value = getattr(self, key)
            return value if isinstance(value, BaseModel) else None
        return self._sections.get(key)

    def plugin_sections(self) -> dict[str, BaseModel]:
        """The validated plugin-owned sections present in this config, by key."""
        return dict(self._sections)

    def to_dict(self) -> dict[str, Any]:
        """The whole resolved config, plugin sections included, as JSON-ready data."""
        data = self.model_dump(mode="json")
        for key, section in self._sections.items():
            data[key] = section.model_dump(mode="json")
        return data
