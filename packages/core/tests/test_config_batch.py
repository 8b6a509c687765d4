"""Batch-size arithmetic: train_batch_size = micro batch * accumulation steps * dp size."""

from __future__ import annotations

from pathlib import Path

import pytest

from ds.core.config import BatchSizes, load_config, resolve_batch_sizes
from ds.core.errors import ConfigError
from ds.core.plugins import load_components, make_plugin_set

CONFIGS = Path(__file__).parent / "configs"


@pytest.mark.parametrize(
    ("train", "micro", "accum", "dp", "expected"),
    [
        (32, 4, 2, 4, (32, 4, 2)),  # all three, consistent
        (32, 4, None, 2, (32, 4, 4)),  # accumulation computed
        (32, None, 2, 2, (32, 8, 2)),  # micro batch computed
        (None, 4, 2, 2, (16, 4, 2)),  # batch computed
        (32, None, None, 4, (32, 8, 1)),  # batch alone: no accumulation
        (None, 4, None, 3, (12, 4, 1)),  # micro batch alone: no accumulation
        (None, None, 4, 2, (8, 1, 4)),  # accumulation alone: micro batch 1
        (None, None, None, 4, (4, 1, 1)),  # nothing (all "auto"): the smallest batch
    ],
)
def test_any_two_give_the_third_and_one_alone_fills_defaults(
        train: int | None, micro: int | None, accum: int | None, dp: int, expected: tuple[int, int, int]) -> None:
    assert resolve_batch_sizes(train, micro, accum, dp) == BatchSizes(*expected)


def test_inconsistent_values_show_the_arithmetic() -> None:
    with pytest.raises(ConfigError) as caught:
        resolve_batch_sizes(32, 4, 2, 2)

    assert str(caught.value).startswith(
        "train_batch_size 32 != train_micro_batch_size_per_gpu 4 * gradient_accumulation_steps 2 * "
        "data-parallel size 2 = 16")
    assert "Set train_batch_size to 16" in str(caught.value)


@pytest.mark.parametrize(
    ("train", "micro", "accum", "dp", "solving_for", "divisor"),
    [(30, 4, None, 2, "gradient_accumulation_steps", 8), (30, None, 4, 2, "train_micro_batch_size_per_gpu", 8),
     (6, None, None, 4, "train_micro_batch_size_per_gpu", 4)],
)
def test_a_third_value_that_is_not_whole_is_an_error(
        train: int, micro: int | None, accum: int | None, dp: int, solving_for: str, divisor: int) -> None:
    with pytest.raises(ConfigError, match=f"cannot compute {solving_for}: train_batch_size {train} is not "
                                          f"divisible by .* = {divisor}"):
        resolve_batch_sizes(train, micro, accum, dp)


def test_config_file_with_inconsistent_batch_names_the_file_and_the_arithmetic() -> None:
    components = load_components(make_plugin_set(autoload=False))
    path = CONFIGS / "inconsistent_batch.json"

    assert load_config(path, world_size=4, components=components).train_batch_size == 32
    with pytest.raises(ConfigError) as caught:
        load_config(path, world_size=2, components=components)

    assert str(caught.value).startswith(f"{path}: train_batch_size 32 != ")
    assert "data-parallel size 2 = 16" in str(caught.value)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ({"train_batch_size": 6.4e1, "train_micro_batch_size_per_gpu": 8.0}, (64, 8, 4)),
        ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2},
         (32, 8, 2)),
        ({"train_batch_size": 64, "train_micro_batch_size_per_gpu": "AUTO", "gradient_accumulation_steps": 4},
         (64, 8, 4)),
    ],
)
def test_config_batch_values_accept_integral_floats_and_auto(source: dict[str, object],
                                                             expected: tuple[int, int, int]) -> None:
    config = load_config(source, world_size=2, components=load_components(make_plugin_set(autoload=False)))

    assert (config.train_batch_size, config.train_micro_batch_size_per_gpu,
            config.gradient_accumulation_steps) == expected
    assert all(type(value) is int for value in expected)


@pytest.mark.parametrize("bad", [2.5, 0, -4, "eight"])
def test_config_batch_values_must_be_positive_whole_numbers(bad: object) -> None:
    components = load_components(make_plugin_set(autoload=False))

    with pytest.raises(ConfigError, match=r"'train_micro_batch_size_per_gpu' must be a positive whole number or "
                                          rf"\"auto\", got {bad!r}"):
        load_config({"train_micro_batch_size_per_gpu": bad}, components=components)
