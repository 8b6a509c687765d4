"""Real-world DeepSpeed configs load unchanged and resolve to the values DeepSpeed would use."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from ds.core.config import AutoContext, DeprecatedKeyWarning, DsConfig, load_config
from ds.core.plugins import Components, load_components, make_plugin_set

CONFIGS = Path(__file__).parent / "configs"


@pytest.fixture
def components() -> Components:
    """Core alone: no pillar installed."""
    return load_components(make_plugin_set(autoload=False))


def test_bert_fp16_config_computes_accumulation_from_batch_and_micro_batch(components: Components) -> None:
    config = load_config(CONFIGS / "bert_fp16_warmup.json", world_size=8, components=components)

    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (
        4096, 64, 8)
    assert config.fp16.enabled and config.fp16.loss_scale == 0 and config.fp16.initial_scale_power == 16
    assert config.fp16.consecutive_hysteresis is True and config.fp16.loss_scale_window == 1000
    assert config.optimizer is not None and config.optimizer.type == "Adam"
    assert config.optimizer.params == {"lr": 6e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.01}
    assert config.scheduler is not None and config.scheduler.type == "WarmupLR"
    params = config.scheduler.params
    assert params == {"warmup_min_lr": 1e-8, "warmup_max_lr": 6e-3, "warmup_num_steps": 1000, "warmup_type": "linear"}
    assert type(params["warmup_num_steps"]) is int  # written 1e3
    assert config.gradient_clipping == 1.0 and config.steps_per_print == 1000
    assert (config.tensorboard.enabled, config.tensorboard.output_path, config.tensorboard.job_name) == (
        True, "logs/tb", "bert_pretrain")


def test_yaml_config_reads_exponents_as_numbers(components: Components) -> None:
    config = load_config(CONFIGS / "llama_bf16_cosine.yaml", world_size=4, components=components)

    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (
        128, 4, 8)
    assert config.bf16.enabled and not config.fp16.enabled
    assert config.optimizer is not None and config.optimizer.params["lr"] == pytest.approx(1e-5)
    assert config.optimizer.params["betas"] == [0.9, 0.95]
    assert config.scheduler is not None and config.scheduler.type == "WarmupCosineLR"
    assert config.scheduler.params == {"total_num_steps": 10_000, "warmup_num_steps": 500, "warmup_min_ratio": 0.0,
                                       "cos_min_ratio": 0.01}
    assert config.communication_data_type == "bf16"
    assert (config.wandb.enabled, config.wandb.project, config.wandb.group) == (True, "llama-ft", "run-7")
    assert config.comms_logger.prof_ops == ["all_reduce", "all_gather"]
    assert config.communicator.log_collectives is True  # DeepSpeed's comms_logger switches it on


def test_onecycle_config_with_micro_batch_alone_takes_no_accumulation(components: Components) -> None:
    config = load_config(CONFIGS / "onecycle_sgd.json", world_size=2, components=components)

    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (
        64, 32, 1)
    assert config.scheduler is not None and config.scheduler.type == "OneCycle"
    assert config.scheduler.params["cycle_first_stair_count"] == 500
    assert config.scheduler.params["cycle_momentum"] is True
    assert config.scheduler.params["cycle_max_lr"] == 0.001


def test_lr_range_test_config_drops_switched_off_profiler_and_resolves_auto_from_optimizer_lr(
        components: Components) -> None:
    config = load_config(CONFIGS / "lr_range_test.json", world_size=4, components=components)

    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (
        256, 32, 2)
    assert config.scheduler is not None and config.scheduler.type == "LRRangeTest"
    assert config.scheduler.params == {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 200,
                                       "lr_range_test_step_rate": 5.0, "lr_range_test_staircase": False}
    assert config.activation_checkpointing.number_checkpoints == 4
    assert (config.csv_monitor.enabled, config.csv_monitor.output_path) == (True, "csv/")
    assert config.checkpoint.tag_validation == "Fail" and config.checkpoint.load_universal
    assert "flops_profiler" in config.raw and "flops_profiler" not in config.to_dict()


def test_warmup_decay_total_steps_auto_comes_from_the_caller(components: Components) -> None:
    source = {"train_batch_size": 16, "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
              "scheduler": {"type": "WarmupDecayLR",
                            "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                       "warmup_num_steps": 100, "total_num_steps": "auto"}}}

    config = load_config(source, world_size=2, components=components, total_num_steps=5000)

    assert config.scheduler is not None
    assert config.scheduler.params == {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-4, "warmup_num_steps": 100,
                                       "total_num_steps": 5000}
    assert (config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (8, 1)


def test_hugging_face_autos_resolve_without_a_model(components: Components) -> None:
    source = json.loads((CONFIGS / "hf_trainer_zero2.json").read_text())
    del source["zero_optimization"]  # ds-zero's business; see test_config_plugins

    config = load_config(source, world_size=4, components=components)

    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (
        4, 1, 1)
    assert config.gradient_clipping == 1.0
    assert config.fp16.enabled is False
    assert config.optimizer is not None and config.optimizer.params == {}  # the optimizer's defaults apply
    assert config.scheduler is not None and config.scheduler.params == {"warmup_min_lr": 0.0}
    assert config.steps_per_print == 2000


def test_precision_auto_follows_the_weights_of_the_model(components: Components) -> None:
    source = {"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}
    bf16_model = nn.Linear(8, 8).to(torch.bfloat16)
    fp16_model = nn.Linear(8, 8).to(torch.float16)

    on_bf16 = load_config(source, model=bf16_model, components=components)
    on_fp16 = load_config(source, model=fp16_model, components=components)
    on_fp32 = load_config(source, model=nn.Linear(8, 8), components=components)

    assert (on_bf16.bf16.enabled, on_bf16.fp16.enabled) == (True, False)
    assert (on_fp16.bf16.enabled, on_fp16.fp16.enabled) == (False, True)
    assert (on_fp32.bf16.enabled, on_fp32.fp16.enabled) == (False, False)


def test_auto_context_reads_hugging_face_hidden_size_before_inferring_it() -> None:
    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 64), nn.Linear(64, 16))
    inferred = AutoContext.from_model(model, world_size=4, dp_world_size=2)
    model.config = SimpleNamespace(hidden_size=24)  # what a transformers PreTrainedModel carries
    declared = AutoContext.from_model(model)

    assert inferred.hidden_size == 16
    assert inferred.num_parameters == 50 * 16 + (16 * 64 + 64) + (64 * 16 + 16)
    assert (inferred.world_size, inferred.dp_world_size, inferred.param_dtype) == (4, 2, "fp32")
    assert declared.hidden_size == 24
    assert AutoContext.from_model(nn.LayerNorm(8)).hidden_size is None


def test_json_text_and_dict_sources_give_the_same_config(components: Components) -> None:
    source = {"train_batch_size": 8, "gradient_accumulation_steps": 2, "fp16": {"enabled": True}}

    from_text = load_config(json.dumps(source), world_size=2, components=components)
    from_dict = load_config(source, world_size=2, components=components)

    assert from_text.to_dict() == from_dict.to_dict()
    assert from_dict.train_micro_batch_size_per_gpu == 2
    assert from_dict.raw == source and from_dict.raw is not source
    assert load_config(from_dict) is from_dict


def test_deepspeed_old_spellings_load_with_a_warning_naming_the_new_one(components: Components) -> None:
    with pytest.warns(DeprecatedKeyWarning) as caught:
        config = load_config({"bfloat16": {"enabled": True}, "train_micro_batch_size": 4}, world_size=2,
                             components=components)

    messages = [str(w.message) for w in caught]
    assert any("'bfloat16'" in m and "'bf16'" in m for m in messages)
    assert any("'train_micro_batch_size_per_gpu'" in m for m in messages)
    assert config.bf16.enabled and config.train_batch_size == 8


def test_mesh_degrees_shrink_the_data_parallel_size(components: Components) -> None:
    source = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}

    plain = load_config(source, world_size=8, components=components)
    explicit_dp = load_config(source, world_size=8, dp_world_size=2, components=components)

    assert (plain.train_batch_size, plain.dp_world_size, plain.world_size) == (48, 8, 8)
    assert (explicit_dp.train_batch_size, explicit_dp.dp_world_size) == (12, 2)


def test_a_directly_built_config_is_a_valid_single_process_config() -> None:
    config = DsConfig()

    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu, config.gradient_accumulation_steps) == (
        1, 1, 1)
    assert config.section("zero_optimization") is None
    assert config.section("fp16") is config.fp16
    assert config.optimizer is None and config.communicator.timeout_seconds == 1800


def test_communication_dtype_accepts_deepspeed_spellings(components: Components) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = load_config({"communication_data_type": "float16", "steps_per_print": "auto", "seed": 1234},
                             components=components)

    assert config.communication_data_type == "fp16"
    assert config.steps_per_print == 10
    assert config.seed == 1234


@pytest.mark.parametrize(
    "name", ["bert_fp16_warmup.json", "llama_bf16_cosine.yaml", "onecycle_sgd.json", "lr_range_test.json"])
def test_resolved_schedules_build_with_the_scheduler_factory(name: str, components: Components) -> None:
    from ds.core.schedulers import SCHEDULERS, build_scheduler

    config = load_config(CONFIGS / name, world_size=4, components=components)
    assert config.scheduler is not None
    optimizer = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1, momentum=0.9)

    schedule = build_scheduler(config.scheduler, optimizer)

    assert type(schedule) is SCHEDULERS[config.scheduler.type]
