"""ds's config: one pydantic tree that reads DeepSpeed-format files unchanged.

    from ds.core.config import load_config
    config = load_config("ds_config.json", world_size=8, model=model)
    config.train_micro_batch_size_per_gpu, config.fp16.enabled, config.optimizer.params
    config.section("zero_optimization")        # a plugin's validated section, or None

JSON, YAML, JSON text and dicts all work; so do ``"auto"`` values, ``5e8`` where an
integer is meant, and DeepSpeed's old spellings (with a :class:`DeprecatedKeyWarning`).
``ds config check FILE`` (:mod:`ds.core.config.command`) shows what a file resolves to.

Plugins add top-level sections with ``ds_register_config_sections``: register a
subclass of :class:`SectionModel` under its key. Its fields get ``"auto"`` for free
(the field's default), or a rule of their own with :class:`AutoResolve`, which receives
the :class:`AutoContext` (world size, dp size, the model's hidden size, parameter count
and weight dtype); old key spellings go in ``renamed_keys``::

    class ZeroConfig(SectionModel):
        renamed_keys = {"cpu_offload_params": "offload_param"}
        stage: int = 0
        reduce_bucket_size: Annotated[int, AutoResolve(
            lambda ctx: ctx.hidden_size**2 if ctx.hidden_size else 500_000_000)] = 500_000_000

    @ds.core.hookimpl
    def ds_register_config_sections(register):
        register("zero_optimization", ZeroConfig)
"""

from ds.core.config.auto import AutoContext, AutoResolve
from ds.core.config.base import DeprecatedKeyWarning, SectionModel
from ds.core.config.batch import BatchSizes, resolve_batch_sizes
from ds.core.config.build import load_config
from ds.core.config.root import DsConfig
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

__all__ = [
    "CORE_SECTIONS",
    "ActivationCheckpointingConfig",
    "AutoContext",
    "AutoResolve",
    "BatchSizes",
    "Bf16Config",
    "CheckpointConfig",
    "CommsLoggerConfig",
    "CommunicatorConfig",
    "CompileConfig",
    "DeprecatedKeyWarning",
    "DsConfig",
    "Fp16Config",
    "KernelsConfig",
    "MeshConfig",
    "MonitorConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "SectionModel",
    "WandbConfig",
    "load_config",
    "resolve_batch_sizes",
]
