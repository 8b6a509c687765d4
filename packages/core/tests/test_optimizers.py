"""torch optimizers under DeepSpeed's names: registration, semantics, validation errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from ds.core.errors import ConfigError, MissingPillarError, PluginError
from ds.core.optimizers import AdamWithoutBiasCorrection, build_optimizer, register_torch_optimizers
from ds.core.plugins import Registry


@dataclass
class Section:
    """The two attributes build_optimizer reads from ds.core.config.OptimizerConfig."""

    type: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class Components:
    optimizers: Registry[Any]


def core_components() -> Components:
    registry: Registry[Any] = Registry("optimizer", case_sensitive=False)
    register_torch_optimizers(lambda name, factory, **options: registry.add(name, factory, "core", **options))
    return Components(registry)


def one_param(value: float = 1.0, grad: float = 0.5) -> torch.nn.Parameter:
    param = torch.nn.Parameter(torch.tensor([value]))
    param.grad = torch.tensor([grad])
    return param


def build(type_: str, **params: Any) -> torch.optim.Optimizer:
    return build_optimizer(Section(type_, params), [one_param()], core_components())


def test_registers_torch_optimizers_under_case_insensitive_names() -> None:
    registry = core_components().optimizers
    assert sorted(registry.names()) == ["Adagrad", "Adam", "AdamW", "Lamb", "RMSprop", "SGD"]
    for spelling, cls in [("adam", torch.optim.AdamW), ("ADAMW", torch.optim.AdamW), ("sgd", torch.optim.SGD),
                          ("adagrad", torch.optim.Adagrad), ("rmsprop", torch.optim.RMSprop)]:
        assert type(build(spelling)) is cls


def test_adam_decouples_weight_decay_unless_adam_w_mode_is_false() -> None:
    # First Adam step with bias correction moves by lr * g / |g| = lr. AdamW first shrinks
    # p by (1 - lr * wd): 1 * 0.99 - 0.1 = 0.89. L2 Adam adds wd * p to the gradient, which
    # does not change the normalised step: 1 - 0.1 = 0.9.
    for params, expected in [({}, 0.89), ({"adam_w_mode": False}, 0.9)]:
        param = one_param()
        optimizer = build_optimizer(Section("Adam", {"lr": 0.1, "weight_decay": 0.1, **params}), [param],
                                    core_components())
        optimizer.step()
        assert param.item() == pytest.approx(expected, abs=1e-6)


def test_adam_without_bias_correction_matches_hand_computed_steps() -> None:
    # m1 = 0.1 * 0.5, v1 = 0.001 * 0.25: p1 = 1 - 0.1 * 0.05 / 0.0158114 = 0.683772...
    # m2 = 0.095, v2 = 0.00049975:          p2 = p1 - 0.1 * 0.095 / 0.0223551 = 0.258813...
    param = one_param()
    optimizer = build_optimizer(Section("Adam", {"lr": 0.1, "bias_correction": False}), [param], core_components())
    assert isinstance(optimizer, AdamWithoutBiasCorrection)
    optimizer.step()
    assert param.item() == pytest.approx(0.6837724, abs=1e-6)
    optimizer.step()
    assert param.item() == pytest.approx(0.2588135, abs=1e-6)


def test_adam_without_bias_correction_amsgrad_keeps_the_largest_second_moment() -> None:
    # After grads 0.5 then 0: v2 = 0.999 * 0.00025 < v1, so amsgrad divides by sqrt(v1):
    # p2 = 0.683772 - 0.1 * 0.045 / sqrt(0.00025) = 0.399168 (plain Adam: 0.399025).
    param = one_param()
    optimizer = build_optimizer(Section("Adam", {"lr": 0.1, "bias_correction": False, "amsgrad": True}), [param],
                                core_components())
    optimizer.step()
    param.grad = torch.tensor([0.0])
    optimizer.step()
    assert param.item() == pytest.approx(0.3991676, abs=1e-6)


def test_betas_given_as_a_json_list_become_a_pair() -> None:
    optimizer = build("AdamW", lr=0.01, betas=[0.8, 0.95])
    assert optimizer.param_groups[0]["betas"] == (0.8, 0.95)


def test_torch_adam_selects_torch_default_and_cpu_params_never_ask_for_fused() -> None:
    assert build("Adam", torch_adam=True).defaults["fused"] is None
    assert build("Adam", torch_adam=False).defaults["fused"] is None  # fused only when every param is on CUDA


def test_param_groups_with_generator_params_keep_their_options() -> None:
    params = [one_param(), one_param()]
    groups = [{"params": (p for p in params[:1]), "lr": 0.5}, {"params": (p for p in params[1:])}]
    optimizer = build_optimizer(Section("Adam", {"lr": 0.1}), groups, core_components())
    assert [g["lr"] for g in optimizer.param_groups] == [0.5, 0.1]
    assert [len(g["params"]) for g in optimizer.param_groups] == [1, 1]


def test_sgd_passes_deepspeed_parameters_through() -> None:
    optimizer = build("SGD", lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"], group["dampening"]) == (0.9, True, 0.01, 0)


def test_adagrad_and_rmsprop_take_their_parameters() -> None:
    assert build("Adagrad", lr=0.2, lr_decay=0.1).param_groups[0]["lr_decay"] == 0.1
    assert build("RMSprop", alpha=0.9, centered=True).param_groups[0]["centered"] is True


def test_unknown_parameter_names_the_closest_valid_one() -> None:
    with pytest.raises(ConfigError, match=r"optimizer 'Adam': unknown parameter 'weight_decy'\. "
                                          r"Did you mean 'weight_decay'\?"):
        build("Adam", weight_decy=0.1)


def test_ill_typed_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="parameter 'betas'"):
        build("Adam", betas=[0.9, 0.99, 0.999])
    with pytest.raises(ConfigError, match="parameter 'lr'"):
        build("SGD", lr="fast")


def test_torch_range_checks_become_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"optimizer 'SGD'.*Nesterov"):
        build("SGD", nesterov=True)
    with pytest.raises(ConfigError, match=r"optimizer 'Adam'.*learning rate"):
        build("Adam", lr=-1.0)


def test_adamw_refuses_adam_w_mode_false() -> None:
    with pytest.raises(ConfigError, match="adam_w_mode false contradicts AdamW"):
        build("AdamW", adam_w_mode=False)


def test_unknown_type_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"'Adamm' is unknown\. Did you mean 'Adam'\? "
                                          r"Known optimizers: Adagrad, Adam, AdamW, Lamb, RMSprop, SGD\."):
        build("Adamm")


@pytest.mark.parametrize(
    ("type_", "command"),
    [("OneBitAdam", 'pip install "ds-core[cuda]"'),
     ("ZeroOneAdam", 'pip install "ds-core[cuda]"'), ("DeepSpeedCPUAdam", 'pip install "ds-core[zero]"'),
     ("CPUAdam", 'pip install "ds-core[zero]"')],
)
def test_pillar_optimizers_name_the_pip_command(type_: str, command: str) -> None:
    with pytest.raises(MissingPillarError) as caught:
        build(type_)
    assert command in str(caught.value)
    assert isinstance(caught.value, ConfigError)


def test_a_plugin_factory_that_returns_no_optimizer_is_reported() -> None:
    registry: Registry[Any] = Registry("optimizer", case_sensitive=False)
    registry.add("Broken", lambda params, **kw: object(), "bad-plugin")
    with pytest.raises(PluginError, match="plugin 'bad-plugin' returned object"):
        build_optimizer(Section("broken"), [one_param()], Components(registry))
