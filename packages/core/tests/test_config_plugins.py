"""Plugin-owned config sections: registration, "auto", old spellings, errors, validation hook.

ds-zero is not a dependency of core's tests, so a stand-in ``zero_optimization`` section
with DeepSpeed's keys plays its part, registered through the real hook.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import pytest
from pydantic import BaseModel, Field, model_validator
from torch import nn

from ds.core import hookimpl
from ds.core.config import (
    CORE_SECTIONS,
    AutoContext,
    AutoResolve,
    DeprecatedKeyWarning,
    DsConfig,
    SectionModel,
    load_config,
)
from ds.core.config.base import warn_renamed
from ds.core.errors import ConfigError, PluginError
from ds.core.plugins import Components, Registry, load_components, make_plugin_set

CONFIGS = Path(__file__).parent / "configs"


def _hidden_squared(scale: float, fallback: int) -> AutoResolve:
    return AutoResolve(lambda ctx: int(scale * ctx.hidden_size**2) if ctx.hidden_size else fallback)


class Offload(SectionModel):
    device: Literal["none", "cpu", "nvme"] = "none"
    pin_memory: bool = False


class ZeroSection(SectionModel):
    renamed_keys: ClassVar[dict[str, str]] = {
        "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save"}

    stage: Annotated[int, Field(ge=0, le=3)] = 0
    contiguous_gradients: bool = True
    overlap_comm: bool = False
    reduce_scatter: bool = True
    allgather_partitions: bool = True
    allgather_bucket_size: int = 500_000_000
    reduce_bucket_size: Annotated[int, _hidden_squared(1.0, 500_000_000)] = 500_000_000
    stage3_prefetch_bucket_size: Annotated[int, _hidden_squared(0.9, 50_000_000)] = 50_000_000
    stage3_param_persistence_threshold: Annotated[
        int, AutoResolve(lambda ctx: 10 * ctx.hidden_size if ctx.hidden_size else 100_000)] = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_max_reuse_distance: int = 1_000_000_000
    stage3_gather_16bit_weights_on_model_save: bool = False
    sub_group_size: int = 1_000_000_000
    offload_optimizer: Offload | None = None
    offload_param: Offload | None = None

    @model_validator(mode="before")
    @classmethod
    def _cpu_offload(cls, data: Any) -> Any:
        if isinstance(data, dict) and "cpu_offload" in data:
            data = dict(data)
            warn_renamed("zero_optimization.cpu_offload", "zero_optimization.offload_optimizer")
            if data.pop("cpu_offload"):
                data.setdefault("offload_optimizer", {"device": "cpu"})
        return data


class PipelineSection(SectionModel):
    stages: int | Literal["auto"] = "auto"
    partition: str = "best"


class ZeroPlugin:
    def __init__(self) -> None:
        self.validated: list[tuple[DsConfig, int]] = []

    @hookimpl
    def ds_register_config_sections(self, register: Callable[..., None]) -> None:
        register("zero_optimization", ZeroSection, aliases=("zero_config",))

    @hookimpl
    def ds_validate_config(self, config: DsConfig, world_size: int) -> None:
        self.validated.append((config, world_size))
        zero = config.section("zero_optimization")
        if isinstance(zero, ZeroSection) and zero.stage == 3 and config.fp16.enabled and world_size > 64:
            raise ConfigError("zero_optimization.stage 3 with fp16 is not supported above 64 ranks; use bf16.")


class PipelinePlugin:
    @hookimpl
    def ds_register_config_sections(self, register: Callable[..., None]) -> None:
        register("pipeline", PipelineSection)


def components_with(*plugins: object) -> Components:
    extra = tuple((f"test-{index}", plugin) for index, plugin in enumerate(plugins))
    return load_components(make_plugin_set(autoload=False, extra_plugins=extra))


@pytest.fixture
def zero() -> ZeroPlugin:
    return ZeroPlugin()


@pytest.fixture
def components(zero: ZeroPlugin) -> Components:
    return components_with(zero)


def zero_section(config: DsConfig) -> ZeroSection:
    section = config.section("zero_optimization")
    assert isinstance(section, ZeroSection)
    return section


def test_hugging_face_zero2_config_validates_the_plugin_section(components: Components) -> None:
    config = load_config(CONFIGS / "hf_trainer_zero2.json", world_size=2, components=components)

    zero = zero_section(config)
    assert zero.stage == 2 and zero.overlap_comm and zero.contiguous_gradients
    assert zero.reduce_bucket_size == 200_000_000 and type(zero.reduce_bucket_size) is int  # written 2e8
    assert zero.offload_optimizer == Offload(device="cpu", pin_memory=True)
    assert (config.train_batch_size, config.gradient_clipping, config.fp16.enabled) == (2, 1.0, False)
    assert config.to_dict()["zero_optimization"]["allgather_bucket_size"] == 200_000_000


def test_hugging_face_zero3_autos_scale_with_the_model_hidden_size(components: Components) -> None:
    model = nn.Sequential(nn.Embedding(100, 32), nn.Linear(32, 32), nn.Linear(32, 128), nn.Linear(128, 32))

    with_model = load_config(CONFIGS / "hf_trainer_zero3.json", world_size=4, model=model, components=components,
                             total_num_steps=1000)
    without = load_config(CONFIGS / "hf_trainer_zero3.json", world_size=4, components=components,
                          total_num_steps=1000)

    zero = zero_section(with_model)
    assert zero.stage == 3 and zero.offload_param == Offload(device="cpu", pin_memory=True)
    assert zero.reduce_bucket_size == 32 * 32
    assert zero.stage3_prefetch_bucket_size == int(0.9 * 32 * 32)
    assert zero.stage3_param_persistence_threshold == 320
    assert zero.sub_group_size == 1_000_000_000 and zero.stage3_max_live_parameters == 1_000_000_000
    assert zero.stage3_gather_16bit_weights_on_model_save is True
    assert (zero_section(without).reduce_bucket_size, zero_section(without).stage3_param_persistence_threshold) == (
        500_000_000, 100_000)
    assert with_model.scheduler is not None
    assert with_model.scheduler.params == {"warmup_min_lr": 0.0, "total_num_steps": 1000}
    assert (with_model.bf16.enabled, with_model.fp16.enabled) == (False, False)


def test_deepspeed_docs_zero2_reads_5e8_and_5_0e8_as_integers(components: Components) -> None:
    config = load_config(CONFIGS / "deepspeed_docs_zero2_offload.json", world_size=4, components=components)

    zero = zero_section(config)
    assert (zero.allgather_bucket_size, zero.reduce_bucket_size) == (500_000_000, 500_000_000)
    assert type(zero.allgather_bucket_size) is int and type(zero.reduce_bucket_size) is int
    assert zero.offload_optimizer == Offload(device="cpu")
    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (
        64, 4, 4)


def test_cifar_stage0_config_with_legacy_keys_loads_with_warnings(components: Components) -> None:
    with pytest.warns(DeprecatedKeyWarning, match=r"'zero_optimization\.cpu_offload'.*'zero_optimization\."
                                                  r"offload_optimizer'"):
        config = load_config(CONFIGS / "cifar10_stage0_legacy.json", world_size=4, components=components)

    zero = zero_section(config)
    assert zero.stage == 0 and zero.offload_optimizer is None
    assert (config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (4, 1)
    assert (config.fp16.enabled, config.fp16.loss_scale_window, config.fp16.initial_scale_power) == (True, 500, 15)


def test_section_renamed_keys_and_registered_aliases_warn_with_full_paths(components: Components) -> None:
    source = {"zero_config": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}}

    with pytest.warns(DeprecatedKeyWarning) as caught:
        config = load_config(source, components=components)

    messages = [str(w.message) for w in caught]
    assert any("'zero_config'" in m and "'zero_optimization'" in m for m in messages)
    assert any("'zero_optimization.stage3_gather_fp16_weights_on_model_save'" in m
               and "'zero_optimization.stage3_gather_16bit_weights_on_model_save'" in m for m in messages)
    assert zero_section(config).stage3_gather_16bit_weights_on_model_save is True


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ({"stgae": 2}, "unknown key 'zero_optimization.stgae'; did you mean 'stage'?"),
        ({"offload_optimizer": {"devce": "cpu"}}, ("unknown key 'zero_optimization.offload_optimizer.devce'; "
                                                 "did you mean 'device'?")),
        ({"stage": 4}, "'zero_optimization.stage' = 4 is invalid: it should be less than or equal to 3."),
        ({"offload_param": {"device": "gpu"}}, ("'zero_optimization.offload_param.device' = 'gpu' is invalid: "
                                               "it should be 'none', 'cpu' or 'nvme'.")),
        ({"reduce_bucket_size": 2.5e8 + 0.5}, "'zero_optimization.reduce_bucket_size' must be a whole number"),
    ],
)
def test_plugin_section_errors_name_the_key_path_and_the_fix(section: dict[str, Any], expected: str,
                                                             components: Components) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config({"zero_optimization": section}, components=components)

    assert str(caught.value).startswith(expected)


def test_validation_hook_sees_the_resolved_config_and_world_size(zero: ZeroPlugin, components: Components) -> None:
    source = {"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": True}, "zero_optimization": {"stage": 3}}

    config = load_config(source, world_size=64, components=components)
    with pytest.raises(ConfigError, match="not supported above 64 ranks; use bf16"):
        load_config(source, world_size=128, components=components)

    assert zero.validated[0] == (config, 64)
    assert zero.validated[1][1] == 128
    assert zero_section(zero.validated[0][0]).stage == 3


def test_core_sections_count_once_whether_or_not_the_registry_holds_them(components: Components) -> None:
    plugins = components.plugins
    bare = Components(plugins, *(Registry(kind) for kind in ("config section", "partitioner", "communicator",
                                                             "optimizer", "kernel op", "kernel backend",
                                                             "model transform", "command")))
    source = json.loads((CONFIGS / "bert_fp16_warmup.json").read_text())

    assert set(CORE_SECTIONS) <= set(components.config_sections.names())
    assert load_config(source, world_size=8, components=bare).to_dict() == load_config(
        source, world_size=8, components=components).to_dict()
    assert load_config(source, world_size=8, components=components).plugin_sections() == {}


def test_core_section_models_are_the_root_fields() -> None:
    for key, model in CORE_SECTIONS.items():
        assert DsConfig.model_fields[key].annotation in (model, model | None)


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [("train_batch_size", ZeroSection, "registers config key 'train_batch_size', which ds core owns"),
     ("my_section", {"stage": 1}, "registered config section 'my_section' as {'stage': 1}; register a pydantic")],
)
def test_bad_registrations_are_plugin_errors(key: str, value: object, expected: str) -> None:
    class BadPlugin:
        @hookimpl
        def ds_register_config_sections(self, register: Callable[..., None]) -> None:
            register(key, value)

    with pytest.raises(PluginError, match=f"plugin 'test-0' {expected}"):
        load_config({}, components=components_with(BadPlugin()))


def test_a_plugin_can_honour_a_key_ds_core_does_not() -> None:
    class Profiler(BaseModel):
        enabled: bool = False
        profile_step: int = 1

    class ProfilerPlugin:
        @hookimpl
        def ds_register_config_sections(self, register: Callable[..., None]) -> None:
            register("flops_profiler", Profiler)

    config = load_config({"flops_profiler": {"enabled": True, "profile_step": 5e0}},
                         components=components_with(ProfilerPlugin()))

    assert config.section("flops_profiler") == Profiler(enabled=True, profile_step=5)


def test_installed_pipeline_pillar_allows_a_mesh_and_shrinks_dp() -> None:
    with_pipeline = components_with(PipelinePlugin())
    source = {"train_batch_size": 32, "gradient_accumulation_steps": 2, "mesh": {"tp": 2, "pp": 2},
              "pipeline": {"stages": "auto", "partition": "uniform"}}

    config = load_config(source, world_size=8, components=with_pipeline)

    assert (config.dp_world_size, config.train_micro_batch_size_per_gpu) == (2, 8)
    assert config.section("pipeline") == PipelineSection(stages="auto", partition="uniform")
    with pytest.raises(ConfigError, match=r"mesh: pp 2 \* tp 2 \* sp 1 = 4 does not divide the world size 6"):
        load_config(source, world_size=6, components=with_pipeline)


def test_auto_resolvers_that_cannot_decide_name_the_key() -> None:
    class NeedsModel(SectionModel):
        width: Annotated[int, AutoResolve(lambda ctx: _require_hidden(ctx))] = 0
        depth: int

    class NeedsModelPlugin:
        @hookimpl
        def ds_register_config_sections(self, register: Callable[..., None]) -> None:
            register("needs_model", NeedsModel)

    components = components_with(NeedsModelPlugin())

    with pytest.raises(ConfigError, match=r"^'needs_model.width' is \"auto\", but no model was given"):
        load_config({"needs_model": {"width": "auto", "depth": 1}}, components=components)
    with pytest.raises(ConfigError, match=r"^'needs_model.depth' is \"auto\", but ds has no rule to resolve it"):
        load_config({"needs_model": {"depth": "auto"}}, components=components)
    assert load_config({"needs_model": {"width": "auto", "depth": 1}}, model=nn.Linear(4, 4),
                       components=components).section("needs_model") == NeedsModel(width=4, depth=1)


def _require_hidden(context: AutoContext) -> int:
    if context.hidden_size is None:
        raise ValueError("no model was given to read the hidden size from")
    return context.hidden_size
