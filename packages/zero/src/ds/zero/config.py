"""The ``zero_optimization`` config section, with DeepSpeed's keys, defaults and meaning.

Values ds accepts but does not implement yet (MiCS, ``reduce_scatter: false``,
``allgather_partitions: false``, ``overlap_comm: false`` at stage 3) are rejected when the
config loads, with the key named, never silently ignored. ``allgather_bucket_size`` is
accepted and bounds nothing: stages 1/2 gather each reduce bucket in place, needing no
gather buffer, and stage 3 gathers per block.
``offload_param: {device: nvme}`` (stage 3 only) keeps parameter shards in files under
``nvme_path`` between uses (:mod:`ds.zero.param_swap`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from ds.core.config.auto import AutoContext, AutoResolve
from ds.core.config.base import SectionModel, warn_renamed


def _hidden_squared(scale: float, fallback: int) -> AutoResolve:
    """DeepSpeed/HF "auto" bucket sizes scale with the model's hidden size."""

    def resolve(context: AutoContext) -> int:
        return int(scale * context.hidden_size**2) if context.hidden_size else fallback

    return AutoResolve(resolve)


def _persistence(context: AutoContext) -> int:
    return 10 * context.hidden_size if context.hidden_size else 100_000


class OffloadConfig(SectionModel):
    """``offload_optimizer`` / ``offload_param``: where state lives between uses."""

    device: Literal["none", "cpu", "nvme"] = "none"
    nvme_path: str | None = None
    pin_memory: bool = False
    buffer_count: PositiveInt = 4
    buffer_size: PositiveInt = 100_000_000
    max_in_cpu: NonNegativeInt = 1_000_000_000
    fast_init: bool = False
    ratio: Annotated[float, Field(ge=0.0, le=1.0)] = 1.0

    @field_validator("device", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class ZeroConfig(SectionModel):
    """DeepSpeed's ``zero_optimization``; ``stage`` 0 is plain data parallelism.

    ZeRO++ (details and error bounds in :mod:`ds.zero.zeropp`):

    * ``zero_quantized_weights`` (qwZ, stages 1-3): parameters are all-gathered for
      compute as block int8 (blocks of 256, one fp32 scale each); master weights and
      optimizer state stay exact.
    * ``zero_quantized_gradients`` (qgZ, stages 1-3): gradient reduce-scatters become a
      block-int8 all-to-all followed by a local fp32 sum (one hop).
    * ``zero_hpz_partition_size`` (hpZ, stage 3): after forward, parameters stay sharded
      within groups of this many consecutive ranks (a node), so backward gathers them
      there; it must divide the data-parallel size, and 1 turns it off.
    """

    stage: Annotated[int, Field(ge=0, le=3)] = 0
    contiguous_gradients: bool = True
    overlap_comm: bool = True
    reduce_scatter: bool = True
    reduce_bucket_size: Annotated[PositiveInt, _hidden_squared(1.0, 500_000_000)] = 500_000_000
    allgather_partitions: bool = True
    allgather_bucket_size: PositiveInt = 500_000_000
    stage3_prefetch_bucket_size: Annotated[PositiveInt, _hidden_squared(0.9, 50_000_000)] = 50_000_000
    stage3_param_persistence_threshold: Annotated[NonNegativeInt, AutoResolve(_persistence)] = 100_000
    stage3_max_live_parameters: PositiveInt = 1_000_000_000
    stage3_max_reuse_distance: NonNegativeInt = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False
    sub_group_size: PositiveInt = 1_000_000_000
    round_robin_gradients: bool = False
    ignore_unused_parameters: bool = True
    offload_optimizer: OffloadConfig = Field(default_factory=OffloadConfig)
    offload_param: OffloadConfig = Field(default_factory=OffloadConfig)
    zero_hpz_partition_size: PositiveInt = 1
    zero_quantized_weights: bool = False
    zero_quantized_gradients: bool = False
    mics_shard_size: int = -1

    @model_validator(mode="before")
    @classmethod
    def _cpu_offload(cls, data: Any) -> Any:
        # DeepSpeed's old boolean spelling of optimizer offload.
        if isinstance(data, dict) and "cpu_offload" in data:
            data = dict(data)
            enabled = data.pop("cpu_offload")
            warn_renamed("zero_optimization.cpu_offload", "zero_optimization.offload_optimizer.device")
            if enabled:
                data.setdefault("offload_optimizer", {"device": "cpu"})
        return data

    @model_validator(mode="after")
    def _not_yet(self) -> ZeroConfig:
        unsupported = {
            "mics_shard_size": self.mics_shard_size > 0,
            "reduce_scatter": not self.reduce_scatter,
            "allgather_partitions": not self.allgather_partitions,  # DeepSpeed's broadcast alternative
        }
        for key, asked in unsupported.items():
            if asked:
                raise ValueError(
                    f"zero_optimization.{key} is not supported by this version of ds-zero yet; "
                    "remove it (or set it to its default) to train without it."
                )
        if self.stage == 3 and not self.overlap_comm:
            raise ValueError(
                "zero_optimization.overlap_comm false is not supported at stage 3: FSDP2 always gathers and "
                "reduces on its own streams, overlapped with compute. Remove overlap_comm (or set it true)."
            )
        zeropp_min_stage = {
            "zero_quantized_weights": (self.zero_quantized_weights, 1),
            "zero_quantized_gradients": (self.zero_quantized_gradients, 1),
            "zero_hpz_partition_size": (self.zero_hpz_partition_size > 1, 3),
        }
        for key, (asked, min_stage) in zeropp_min_stage.items():
            if asked and self.stage < min_stage:
                raise ValueError(
                    f"zero_optimization.{key} (ZeRO++) needs stage {min_stage} or higher, not {self.stage}; "
                    f"raise the stage or remove {key}."
                )
        if self.offload_optimizer.device != "none" and self.stage == 0:
            raise ValueError("zero_optimization.offload_optimizer needs stage 1, 2 or 3; raise the stage or remove "
                             "offload_optimizer.")
        for key, offload in (("offload_optimizer", self.offload_optimizer), ("offload_param", self.offload_param)):
            if offload.device == "nvme" and not offload.nvme_path:
                raise ValueError(f"zero_optimization.{key}.device nvme needs nvme_path, a folder on a fast disk.")
        if self.offload_param.device != "none" and self.stage != 3:
            raise ValueError("zero_optimization.offload_param needs stage 3; set stage to 3 or remove offload_param.")
        return self
