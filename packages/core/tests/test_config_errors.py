"""Configs ds cannot use fail at load time, naming the key path and the fix."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from ds.core.config import load_config
from ds.core.errors import ConfigError, MissingPillarError
from ds.core.plugins import Components, PluginFailure, PluginInfo, load_components, make_plugin_set

CONFIGS = Path(__file__).parent / "configs"


@pytest.fixture(scope="module")
def components() -> Components:
    """Core alone: no pillar installed."""
    return load_components(make_plugin_set(autoload=False))


def error_of(source: Any, components: Components, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(source, components=components, **kwargs)
    return str(caught.value)


def test_invalid_json_names_file_line_and_column(components: Components) -> None:
    path = CONFIGS / "trailing_comma.json"

    message = error_of(path, components)

    assert message.startswith(f"invalid JSON in {path} at line 5, column 3:")
    assert "trailing commas" in message


def test_invalid_json_text_names_line_and_column(components: Components) -> None:
    assert error_of('{\n  "train_batch_size": 8\n  "fp16": {}\n}', components).startswith(
        "invalid JSON in the JSON text at line 3, column 3: Expecting ',' delimiter")


def test_invalid_yaml_names_file_line_and_column(components: Components) -> None:
    path = CONFIGS / "bad_indent.yaml"

    assert re.match(rf"invalid YAML in {re.escape(str(path))} at line 4, column 2: ", error_of(path, components))


@pytest.mark.parametrize(
    ("text", "where"),
    [('{"fp16": {"enabled": true}, "fp16": {"enabled": false}}', "duplicate key 'fp16'"),
     ("fp16:\n  enabled: true\n  enabled: false\n", "line 3, column 3: duplicate key 'enabled'")],
)
def test_duplicate_keys_are_errors(tmp_path: Path, components: Components, text: str, where: str) -> None:
    path = tmp_path / ("config.yaml" if text.startswith("fp16:") else "config.json")
    path.write_text(text)

    assert where in error_of(path, components)


def test_missing_file_and_non_mapping_sources_say_what_is_wrong(tmp_path: Path, components: Components) -> None:
    (tmp_path / "list.json").write_text("[1, 2]")

    assert "does not exist" in error_of(str(tmp_path / "nope.json"), components)
    assert "must hold an object of config keys at the top level, got list" in error_of(tmp_path / "list.json",
                                                                                      components)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"gradient_clip": 1.0}, "unknown key 'gradient_clip'; did you mean 'gradient_clipping'?"),
        ({"fp16": {"loss_scale_windw": 500}}, "unknown key 'fp16.loss_scale_windw'; did you mean 'loss_scale_window'?"),
        ({"zero_optimisation": {"stage": 2}}, "unknown key 'zero_optimisation'; did you mean 'zero_optimization'?"),
        ({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_step": 10}}},
         "unknown key 'scheduler.params.warmup_num_step'; did you mean 'warmup_num_steps'?"),
        ({"optimizer": {"type": "AdamW", "params": {"weight_decy": 0.1}}},
         ("unknown key 'optimizer.params.weight_decy'; optimizer 'AdamW' has no such parameter; did you mean "
         "'weight_decay'?")),
        ({"wandb": {"xyzzy": 1}}, "unknown key 'wandb.xyzzy'; valid keys here: enabled, group, project, team."),
    ],
)
def test_unknown_keys_name_the_full_path_and_the_closest_valid_key(
        source: dict[str, Any], expected: str, components: Components) -> None:
    message = error_of(source, components)

    assert message.startswith(expected)
    assert message.endswith("Fix the spelling or remove the key.")


@pytest.mark.parametrize(
    "source",
    [{"flops_profiler": {"enabled": True, "profile_step": 1}}, {"amp": {"enabled": True, "opt_level": "O1"}},
     {"autotuning": {"enabled": True}}, {"elasticity": {"enabled": True, "max_train_batch_size": 2000}},
     {"data_efficiency": {"enabled": True}}, {"curriculum_learning": {"enabled": True}},
     {"sparse_attention": {"mode": "fixed", "block": 16}}, {"eigenvalue": {"enabled": True}},
     {"progressive_layer_drop": {"enabled": True, "theta": 0.5}}, {"hybrid_engine": {"enabled": True}},
     {"nebula": {"enabled": True}}, {"compile": {"deepcompile": True}}, {"sparse_gradients": True},
     {"fp16": {"enabled": True, "auto_cast": True}}],
)
def test_deepspeed_settings_ds_does_not_honour_yet_are_errors(source: dict[str, Any],
                                                              components: Components) -> None:
    key = next(iter(source))
    path = {"fp16": "fp16.auto_cast", "compile": "compile.deepcompile"}.get(key, key)

    message = error_of(source, components)

    assert message.startswith(f"'{path}' is a DeepSpeed setting that ds does not support yet. Remove it")


def test_switched_off_unsupported_settings_ask_for_nothing_and_are_dropped(components: Components) -> None:
    source = {"amp": {"enabled": "auto", "opt_level": "auto"}, "flops_profiler": {"enabled": False},
              "sparse_gradients": False, "checkpoint": {"parallel_write": {"pipeline_stage": False}},
              "fp16": {"enabled": True, "auto_cast": False}}

    config = load_config(source, components=components)

    assert config.fp16.enabled and "auto_cast" not in config.to_dict()["fp16"]
    assert config.raw == source


def test_moved_settings_name_their_new_home(components: Components) -> None:
    assert "clip gradients with the top-level gradient_clipping key instead" in error_of(
        {"optimizer": {"type": "Adam", "params": {"max_grad_norm": 1.0}}}, components)
    assert 'write "communication_data_type": "fp32" instead' in error_of({"fp32_allreduce": True}, components)


@pytest.mark.parametrize(
    ("source", "extra"),
    [({"zero_optimization": {"stage": 3}}, "zero"), ({"pipeline": {"stages": 2}}, "pipeline"),
     ({"tensor_parallel": {"autotp_size": 2}}, "pipeline"), ({"sequence_parallel_size": 2}, "pipeline"),
     ({"moe": {"num_experts": 8}}, "moe"), ({"compression_training": {"weight_quantization": {}}}, "compression")],
)
def test_pillar_keys_without_the_pillar_give_the_pip_command(source: dict[str, Any], extra: str,
                                                             components: Components) -> None:
    with pytest.raises(MissingPillarError) as caught:
        load_config(source, components=components)

    key = next(iter(source))
    assert str(caught.value) == (f"config key '{key}' needs ds-{extra}, which is not installed. "
                                 f'Fix: pip install "ds-core[{extra}]"')


def test_parallel_mesh_axes_need_their_pillar(components: Components) -> None:
    with pytest.raises(MissingPillarError, match=r"'mesh.tp' = 2 needs ds-pipeline.*pip install \"ds-core\[pipeline\]"):
        load_config({"mesh": {"tp": 2}}, world_size=4, components=components)
    with pytest.raises(MissingPillarError, match=r"'mesh.ep' = 2 needs ds-moe"):
        load_config({"mesh": {"ep": 2}}, world_size=4, components=components)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"fp16": {"loss_scale_window": 2.5}}, "'fp16.loss_scale_window' must be a whole number, got 2.5."),
        ({"fp16": {"hysteresis": "two"}}, "'fp16.hysteresis' = 'two' is invalid: it should be a valid integer"),
        ({"fp16": True}, "'fp16' must be a section (an object of keys), got True."),
        ({"gradient_clipping": -1}, "'gradient_clipping' = -1 is invalid: it should be greater than or equal to 0"),
        ({"checkpoint": {"tag_validation": "Sometimes"}}, ("'checkpoint.tag_validation' = 'Sometimes' is invalid: "
                                                          "it should be 'Ignore', 'Warn' or 'Fail'")),
        ({"optimizer": {"params": {"lr": 0.1}}}, "'optimizer.type' is required; add it to your config."),
        ({"optimizer": {"type": "auto"}}, "'optimizer.type' is \"auto\", but ds has no rule to resolve it"),
        ({"optimizer": {"type": "Adamw8bit"}}, ("'optimizer.type' is 'Adamw8bit', which no installed plugin offers. "
                                               "Did you mean 'AdamW'?")),
        ({"scheduler": {"type": "Cosine"}}, ("'scheduler.type': unknown schedule 'Cosine'; did you mean "
                                            "'WarmupCosineLR'?")),
        ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto"}}},
         "'scheduler.params.total_num_steps' is \"auto\", but ds cannot know how many optimizer steps"),
        ({"fp16": {"enabled": True}, "bf16": {"enabled": True}},
         "fp16.enabled and bf16.enabled are both true; enable at most one of them."),
        ({"communicator": {"backend": "nccl"}}, "'communicator.backend' is 'nccl', which no installed plugin offers."),
        ({"bfloat16": {"enabled": True}, "bf16": {"enabled": False}},
         "both 'bfloat16' and 'bf16' are set; 'bfloat16' is the old spelling of 'bf16'. Remove 'bfloat16'."),
    ],
)
def test_bad_values_are_reported_with_key_path_and_fix(source: dict[str, Any], expected: str,
                                                       components: Components) -> None:
    message = error_of(source, components)

    assert message.startswith(expected)
    assert "pydantic" not in message and "errors.pydantic.dev" not in message


def test_several_problems_are_listed_one_per_line(components: Components) -> None:
    message = error_of({"fp16": {"loss_scale_window": 2.5, "hysteresis": 0}, "wandb": {"enabled": "maybe"}},
                       components)

    assert message.splitlines() == [
        "3 problems in the config:",
        ("  - 'fp16.loss_scale_window' must be a whole number, got 2.5. Numbers like 5e8 are fine when they are "
        "whole; change this one to an integer."),
        "  - 'fp16.hysteresis' = 0 is invalid: it should be greater than 0. Change it in your config.",
        ("  - 'wandb.enabled' = 'maybe' is invalid: it should be a valid boolean, unable to interpret input. "
        "Change it in your config."),
    ]


def test_world_size_must_be_positive(components: Components) -> None:
    assert error_of({"train_batch_size": 4}, components, world_size=0) == "world_size must be at least 1, got 0."


def test_errors_in_a_file_start_with_the_file_name(tmp_path: Path, components: Components) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text('{"fp16": {"enabled": true, "loss_scal": 0}}')

    assert error_of(path, components).startswith(f"{path}: unknown key 'fp16.loss_scal'; did you mean 'loss_scale'?")


def test_pillar_errors_say_when_the_pillar_is_installed_but_broken_or_too_old() -> None:
    failed = make_plugin_set(autoload=False)
    failed.failures.append(PluginFailure("zero", "ds.zero.plugin", "ds-zero", "ImportError: libcudart.so.12"))
    too_old = make_plugin_set(autoload=False)
    too_old.loaded.append(PluginInfo("zero", "ds.zero.plugin", "ds-zero", "0.0.1"))
    source = {"zero_optimization": {"stage": 1}}

    with pytest.raises(MissingPillarError) as broken:
        load_config(source, components=load_components(failed))
    with pytest.raises(MissingPillarError) as old:
        load_config(source, components=load_components(too_old))

    assert str(broken.value) == ("config key 'zero_optimization' needs ds-zero, which is installed but failed to load: "
                                 'ImportError: libcudart.so.12. Fix: reinstall it with pip install "ds-core[zero]"')
    assert str(old.value) == ("config key 'zero_optimization' needs ds-zero, but the installed version (0.0.1) does "
                              'not register it. Fix: upgrade it with pip install --upgrade "ds-core[zero]"')
