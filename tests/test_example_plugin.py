"""The reference third-party plugin, loaded in-process: what its hooks give ds.

``tests/packaging`` proves the plugin is found once installed; these tests check,
quickly and without installing anything, what ``ds_register_optimizers``,
``ds_define_kernel_ops`` and ``ds_register_kernel_backends`` make of it.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from ds.core import hookimpl
from ds.core.engine.initialize import initialize
from ds.core.errors import PluginError
from ds.core.kernels import REFERENCE_BACKEND, install_kernels, plan_kernels, reset_kernels
from ds.core.plugins import Components, load_components, make_plugin_set

PLUGIN_SOURCE = Path(__file__).resolve().parent / "packaging" / "ds-example-plugin" / "src" / "ds_example_plugin"


def load_example_plugin() -> ModuleType:
    name = "ds_example_plugin"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, PLUGIN_SOURCE / "__init__.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture
def components() -> Components:
    """Core plus the example plugin, and no other installed plugin."""
    return load_components(make_plugin_set(autoload=False, allow=set(),
                                           extra_plugins=(("example", load_example_plugin()),)))


@pytest.fixture
def installed_kernels(components: Components) -> Iterator[None]:
    install_kernels(components)
    yield
    reset_kernels()


def test_ds_register_optimizers_makes_the_name_usable_in_a_config(components: Components) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    before = [param.detach().clone() for param in model.parameters()]
    config = {"train_batch_size": 4, "optimizer": {"type": "examplesignsgd", "params": {"lr": 0.25}}}

    engine, optimizer, _, _ = initialize(model=model, config=config, components=components)
    engine.backward(engine(torch.randn(4, 3)).square().sum())
    engine.step()

    assert components.optimizers.registration("ExampleSignSGD").plugin == "example"
    assert type(optimizer).__name__ == "ExampleSignSGD"
    for param, old in zip(engine.module.parameters(), before):
        torch.testing.assert_close((param.detach() - old).abs(), torch.full_like(old, 0.25))


class ClashingPlugin:
    """Registers, under another spelling, an optimizer name core already owns."""

    @hookimpl
    def ds_register_optimizers(self, register: Callable[..., None]) -> None:
        register("sgd", torch.optim.SGD)


def test_ds_register_optimizers_rejects_a_name_taken_by_another_plugin() -> None:
    plugins = make_plugin_set(autoload=False, allow=set(), extra_plugins=(("clashing", ClashingPlugin()),))
    with pytest.raises(PluginError, match="(?i)optimizer 'sgd' is registered twice") as error:
        load_components(plugins)
    assert "plugin 'core'" in str(error.value) and "plugin 'clashing'" in str(error.value)


def test_ds_define_kernel_ops_and_backend_choose_per_device(components: Components) -> None:
    selection = plan_kernels(components, device_types=["cpu", "meta"])

    on_cpu = selection.choice("example_silu", "cpu")
    assert (on_cpu.backend, on_cpu.reason) == ("example-cpu", "torch.nn.functional.silu on CPU")
    elsewhere = selection.choice("example_silu", "meta")
    assert elsewhere.backend == REFERENCE_BACKEND
    assert ("example-cpu", "unavailable: example-cpu runs on CPU only") in [
        (rejection.backend, rejection.reason) for rejection in elsewhere.rejected
    ]


@pytest.mark.usefixtures("installed_kernels")
def test_plugin_op_runs_and_matches_its_reference() -> None:
    x = torch.linspace(-4, 4, 33)
    y = torch.ops.ds.example_silu(x)
    torch.testing.assert_close(y, x * torch.sigmoid(x))
