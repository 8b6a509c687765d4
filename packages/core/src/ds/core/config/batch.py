"""Batch-size arithmetic: ``train_batch_size = micro batch * accumulation steps * dp size``.

DeepSpeed's rules, with the gaps filled the same way:

* all three given: they must agree;
* any two given: the third is computed, and must come out a whole number;
* ``train_batch_size`` alone: no accumulation (1 step), micro batch = batch / dp size;
* ``train_micro_batch_size_per_gpu`` alone: no accumulation;
* ``gradient_accumulation_steps`` alone, or none: micro batch 1 (where DeepSpeed
  refuses, ds picks the smallest batch, so an all-``"auto"`` config loads).

``"auto"`` counts as not given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import PositiveInt, TypeAdapter, ValidationError

from ds.core.config.auto import is_auto
from ds.core.errors import ConfigError

TRAIN_BATCH = "train_batch_size"
MICRO_BATCH = "train_micro_batch_size_per_gpu"
ACCUMULATION = "gradient_accumulation_steps"
BATCH_KEYS = (TRAIN_BATCH, MICRO_BATCH, ACCUMULATION)

_POSITIVE_INT: TypeAdapter[int] = TypeAdapter(PositiveInt)


@dataclass(frozen=True)
class BatchSizes:
    """The three batch numbers of a run, always consistent with its dp size."""

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int

    def as_config(self) -> dict[str, int]:
        return {TRAIN_BATCH: self.train_batch_size, MICRO_BATCH: self.train_micro_batch_size_per_gpu,
                ACCUMULATION: self.gradient_accumulation_steps}


def resolve_batch_sizes(
    train_batch_size: int | None,
    train_micro_batch_size_per_gpu: int | None,
    gradient_accumulation_steps: int | None,
    dp_world_size: int,
) -> BatchSizes:
    """Fill in whichever batch numbers are None; raise ConfigError if they cannot agree."""
    train, micro, accum = train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps
    if train is not None and micro is not None and accum is None:
        accum = _divide(train, f"{MICRO_BATCH} {micro}", micro, dp_world_size, ACCUMULATION)
    elif train is not None and micro is None:
        accum = accum or 1
        micro = _divide(train, f"{ACCUMULATION} {accum}", accum, dp_world_size, MICRO_BATCH)
    else:
        micro = micro or 1
        accum = accum or 1
        train = train or micro * accum * dp_world_size
    product = micro * accum * dp_world_size
    if train != product:
        raise ConfigError(
            f"{TRAIN_BATCH} {train} != {MICRO_BATCH} {micro} * {ACCUMULATION} {accum} * "
            f"data-parallel size {dp_world_size} = {product}. Set {TRAIN_BATCH} to {product}, "
            f'change the other two, or set one of the three to "auto" so ds computes it.'
        )
    return BatchSizes(train, micro, accum)


def _divide(train: int, factor_text: str, factor: int, dp: int, solving_for: str) -> int:
    quotient, remainder = divmod(train, factor * dp)
    if remainder == 0:
        return quotient
    raise ConfigError(
        f"cannot compute {solving_for}: {TRAIN_BATCH} {train} is not divisible by {factor_text} * "
        f"data-parallel size {dp} = {factor * dp}. Choose a {TRAIN_BATCH} that is a multiple of "
        f"{factor * dp}, or set {solving_for} explicitly."
    )


def batch_sizes_from_config(data: dict[str, Any], dp_world_size: int) -> BatchSizes:
    """Read the three batch keys of a config (numbers like ``32.0`` or ``"auto"``) and resolve them."""
    values: dict[str, int | None] = {}
    for key in BATCH_KEYS:
        value = data.get(key)
        if value is None or is_auto(value):
            values[key] = None
            continue
        try:
            values[key] = _POSITIVE_INT.validate_python(value)
        except ValidationError:
            raise ConfigError(
                f'\'{key}\' must be a positive whole number or "auto", got {value!r}.'
            ) from None
    return resolve_batch_sizes(values[TRAIN_BATCH], values[MICRO_BATCH], values[ACCUMULATION], dp_world_size)
