"""DeepSpeed's schedules: values at chosen steps, worked out by hand from DeepSpeed's formulas.

``n`` is the number of ``scheduler.step()`` calls; DeepSpeed's ``last_batch_iteration``
is ``i = n - 1``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from ds.core.errors import CheckpointError, ConfigError
from ds.core.schedulers import OneCycle, StepSchedule, WarmupLR, build_scheduler


@dataclass
class Section:
    """The two attributes build_scheduler reads from ds.core.config.SchedulerConfig."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)


def sgd(lr: float = 0.1, groups: int = 1, **options: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))]} for _ in range(groups)], lr=lr, **options)


def adam(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.Adam([torch.nn.Parameter(torch.ones(1))], lr=lr, betas=(0.9, 0.999))


def lrs_over(scheduler: StepSchedule, steps: int) -> list[float]:
    """The lr the optimizer holds after 0, 1, ..., ``steps`` scheduler steps."""
    optimizer = scheduler.optimizer
    seen = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()  # no gradients: changes nothing, keeps torch's call-order check quiet
        scheduler.step()
        seen.append(optimizer.param_groups[0]["lr"])
    return seen


def test_warmup_lr_log_warmup() -> None:
    # lr(i) = 0.1 * log(i + 1) / log(10) for i < 10, then 0.1.
    scheduler = build_scheduler(Section("WarmupLR", {"warmup_min_lr": 0.0, "warmup_max_lr": 0.1,
                                                     "warmup_num_steps": 10}), sgd())
    lrs = lrs_over(scheduler, 12)
    assert lrs[0] == lrs[1] == 0.0
    assert lrs[2] == pytest.approx(0.0301029996)  # i = 1: 0.1 * log 2 / log 10
    assert lrs[5] == pytest.approx(0.0698970004)  # i = 4: 0.1 * log 5 / log 10
    assert lrs[10] == pytest.approx(0.1)  # i = 9: log 10 / log 10
    assert lrs[12] == pytest.approx(0.1)


def test_warmup_lr_linear_warmup_from_a_floor() -> None:
    # lr(i) = 0.02 + 0.08 * i / 8 for i < 8.
    scheduler = build_scheduler(Section("warmuplr", {"warmup_min_lr": 0.02, "warmup_max_lr": 0.1,
                                                     "warmup_num_steps": 8, "warmup_type": "linear"}), sgd())
    lrs = lrs_over(scheduler, 10)
    assert lrs[1] == pytest.approx(0.02)
    assert lrs[5] == pytest.approx(0.06)  # i = 4
    assert lrs[9] == pytest.approx(0.1)  # i = 8
    assert lrs[10] == pytest.approx(0.1)


def test_warmup_max_lr_defaults_to_each_groups_lr() -> None:
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.4},
                                 {"params": [torch.nn.Parameter(torch.ones(1))], "lr": 0.2}], lr=0.1)
    scheduler = WarmupLR(optimizer, warmup_num_steps=4, warmup_type="linear")
    lrs_over(scheduler, 5)
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.4, 0.2])


def test_per_group_values_and_their_count_is_checked() -> None:
    optimizer = sgd(groups=2)
    scheduler = WarmupLR(optimizer, warmup_min_lr=[0.0, 0.01], warmup_max_lr=[0.1, 0.2], warmup_num_steps=2,
                         warmup_type="linear")
    assert scheduler.lrs_at(2) == pytest.approx([0.05, 0.105])  # i = 1: half way
    with pytest.raises(ConfigError, match="warmup_min_lr has 3 values for 2 param groups"):
        WarmupLR(sgd(groups=2), warmup_min_lr=[0.0, 0.1, 0.2])


def test_warmup_decay_lr_decays_linearly_to_the_floor_at_total_num_steps() -> None:
    # Linear warmup to 0.1 over 10, then 0.1 * (20 - i) / 10.
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 0.1, "warmup_num_steps": 10, "total_num_steps": 20,
              "warmup_type": "linear"}
    lrs = lrs_over(build_scheduler(Section("WarmupDecayLR", params), sgd()), 25)
    assert lrs[6] == pytest.approx(0.05)  # i = 5, warming up
    assert lrs[11] == pytest.approx(0.1)  # i = 10, peak
    assert lrs[16] == pytest.approx(0.05)  # i = 15, half way down
    assert lrs[21] == 0.0  # i = 20 = total_num_steps
    assert lrs[25] == 0.0  # stays at the floor
    floor = lrs_over(build_scheduler(Section("WarmupDecayLR", {**params, "warmup_min_lr": 0.01}), sgd()), 21)
    assert floor[21] == pytest.approx(0.01)


def test_warmup_cosine_lr() -> None:
    # Ratio of lr 0.1: 0.2 + 0.8 * i / 10 while warming up, then
    # 0.1 + 0.9 * (1 + cos(pi * (i - 9) / 10)) / 2.
    params = {"warmup_min_ratio": 0.2, "warmup_num_steps": 10, "total_num_steps": 20, "cos_min_ratio": 0.1,
              "warmup_type": "linear"}
    lrs = lrs_over(build_scheduler(Section("WarmupCosineLR", params), sgd(lr=0.1)), 25)
    assert lrs[0] == pytest.approx(0.02)
    assert lrs[6] == pytest.approx(0.06)  # i = 5: 0.2 + 0.8 * 0.5 = 0.6
    assert lrs[11] == pytest.approx(0.09779754)  # i = 10: 0.1 + 0.9 * (1 + cos(0.1 pi)) / 2
    assert lrs[15] == pytest.approx(0.055)  # i = 14: cos(pi / 2) = 0
    assert lrs[20] == pytest.approx(0.01)  # i = 19: cos(pi) = -1, the minimum
    assert lrs[25] == pytest.approx(0.01)  # held there, not rising again


def test_one_cycle_lr_and_momentum() -> None:
    # Up over 4 steps, down over 6, then lr = 0.01 / (1 + 0.5 * d / 2).
    params = {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 4, "cycle_second_step_size": 6,
              "decay_step_size": 2, "decay_lr_rate": 0.5, "cycle_min_mom": 0.85, "cycle_max_mom": 0.95}
    scheduler = build_scheduler(Section("OneCycle", params), adam())
    optimizer = scheduler.optimizer
    lrs, betas = [optimizer.param_groups[0]["lr"]], [optimizer.param_groups[0]["betas"]]
    for _ in range(14):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
        betas.append(optimizer.param_groups[0]["betas"])
    assert lrs[0] == pytest.approx(0.01)
    assert lrs[2] == pytest.approx(0.055)  # half way up
    assert lrs[4] == pytest.approx(0.1)  # the peak, at cycle_first_step_size
    assert max(lrs) == lrs[4]
    assert lrs[7] == pytest.approx(0.055)  # half way down
    assert lrs[10] == pytest.approx(0.01)  # end of the cycle
    assert lrs[14] == pytest.approx(0.005)  # d = 4: 0.01 / (1 + 0.5 * 2)
    assert betas[0] == pytest.approx((0.95, 0.999))  # momentum is high where lr is low
    assert betas[4] == pytest.approx((0.85, 0.999))
    assert betas[7] == pytest.approx((0.90, 0.999))
    assert betas[14] == pytest.approx((0.95, 0.999))  # decay_mom_rate 0 holds cycle_max_mom


def test_one_cycle_staircase_and_sgd_momentum() -> None:
    # Two stairs up: progress 0.25 rounds to 0, 0.75 to 0.5.
    scheduler = OneCycle(sgd(momentum=0.9), cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=4,
                         cycle_first_stair_count=2, cycle_min_mom=0.8, cycle_max_mom=0.9)
    assert scheduler.lrs_at(1) == pytest.approx([0.01])
    assert scheduler.lrs_at(3) == pytest.approx([0.055])
    assert scheduler.lrs_at(4) == pytest.approx([0.1])
    lrs_over(scheduler, 4)
    assert scheduler.optimizer.param_groups[0]["momentum"] == pytest.approx(0.8)


def test_one_cycle_without_momentum_in_the_optimizer_warns(caplog: pytest.LogCaptureFixture) -> None:
    optimizer = torch.optim.Adagrad([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    with caplog.at_level(logging.WARNING, logger="ds.core.schedulers"):
        scheduler = OneCycle(optimizer, cycle_min_lr=0.01, cycle_first_step_size=2)
    assert "momentum is not cycled" in caplog.text
    assert scheduler.lrs_at(2) == pytest.approx([0.1])  # cycle_max_lr defaults to the optimizer's lr


def test_lr_range_test_continuous_and_staircase() -> None:
    # lr = 0.01 * (1 + 2 * x), x = i / 5 or floor(i / 5).
    params = {"lr_range_test_min_lr": 0.01, "lr_range_test_step_size": 5, "lr_range_test_step_rate": 2}
    lrs = lrs_over(build_scheduler(Section("LRRangeTest", params), sgd()), 11)
    assert lrs[0] == lrs[1] == pytest.approx(0.01)
    assert lrs[8] == pytest.approx(0.038)  # i = 7: 0.01 * (1 + 2.8)
    assert lrs[11] == pytest.approx(0.05)  # i = 10: 0.01 * (1 + 4)
    stairs = lrs_over(build_scheduler(Section("LRRangeTest", {**params, "lr_range_test_staircase": True}), sgd()), 8)
    assert stairs[8] == pytest.approx(0.03)  # floor(7 / 5) = 1


def test_state_dict_is_json_and_resuming_continues_the_schedule() -> None:
    params = {"warmup_max_lr": 0.1, "warmup_num_steps": 10, "total_num_steps": 30}
    reference = lrs_over(build_scheduler(Section("WarmupDecayLR", params), sgd()), 20)
    first = build_scheduler(Section("WarmupDecayLR", params), sgd())
    lrs_over(first, 12)
    state = json.loads(json.dumps(first.state_dict()))
    assert state == {"last_epoch": 12}
    resumed = build_scheduler(Section("WarmupDecayLR", params), sgd())
    resumed.load_state_dict(state)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(reference[12])
    assert resumed.get_last_lr() == pytest.approx([reference[12]])
    assert lrs_over(resumed, 8) == pytest.approx(reference[12:])


def test_one_cycle_resume_restores_momentum() -> None:
    params = {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 4}
    resumed = build_scheduler(Section("OneCycle", params), adam())
    resumed.load_state_dict({"last_epoch": 4})
    assert resumed.optimizer.param_groups[0]["betas"] == pytest.approx((0.8, 0.999))


def test_last_batch_iteration_starts_part_way() -> None:
    scheduler = build_scheduler(Section("WarmupLR", {"warmup_max_lr": 0.1, "warmup_num_steps": 10,
                                                     "warmup_type": "linear", "last_batch_iteration": 4}), sgd())
    assert scheduler.last_epoch == 5
    assert scheduler.optimizer.param_groups[0]["lr"] == pytest.approx(0.04)  # i = 4


def test_bad_state_is_a_checkpoint_error() -> None:
    scheduler = WarmupLR(sgd())
    with pytest.raises(CheckpointError, match="last_epoch"):
        scheduler.load_state_dict({"last_batch_iteration": 3})


def test_unknown_type_and_parameters_name_the_closest_valid_one() -> None:
    with pytest.raises(ConfigError, match=r"'WarmupLr2' is unknown\. Did you mean 'WarmupLR'\?"):
        build_scheduler(Section("WarmupLr2"), sgd())
    with pytest.raises(ConfigError, match=r"unknown parameter 'warmup_num_step'\. Did you mean 'warmup_num_steps'\?"):
        build_scheduler(Section("WarmupLR", {"warmup_num_step": 10}), sgd())


def test_bad_values_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="parameter 'warmup_type'"):
        build_scheduler(Section("WarmupLR", {"warmup_type": "cosine"}), sgd())
    with pytest.raises(ConfigError, match="parameter 'total_num_steps' is required"):
        build_scheduler(Section("WarmupDecayLR"), sgd())
    with pytest.raises(ConfigError, match="parameter 'warmup_num_steps'"):
        build_scheduler(Section("WarmupLR", {"warmup_num_steps": 10.5}), sgd())
    with pytest.raises(ConfigError, match=r"total_num_steps \(5\) is smaller than warmup_num_steps \(10\)"):
        build_scheduler(Section("WarmupDecayLR", {"total_num_steps": 5, "warmup_num_steps": 10}), sgd())


def test_integral_floats_from_json_are_accepted_as_step_counts() -> None:
    scheduler = build_scheduler(Section("WarmupLR", {"warmup_num_steps": 1e3}), sgd())
    assert scheduler.warmup_num_steps == 1000
