"""Choosing a backend per op and device type, plugin-defined ops, and what selection reports."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import ds.core
from ds.core.errors import PluginError
from ds.core.kernels import (
    Availability,
    KernelUnavailableError,
    TorchReferenceBackend,
    install_kernels,
    installed_kernels,
    ops,
    plan_kernels,
    reset_kernels,
)
from ds.core.kernels import reference as core_reference
from ds.core.plugins import CORE_PLUGIN_NAME, Components, default_components, load_components, make_plugin_set


class FakeBackend:
    """A backend defined by the tests: runs the reference but counts what core asks of it."""

    def __init__(self, name: str, priority: int, ops_: tuple[str, ...] = ("rms_norm",), *,
                 available: bool = True, reason: str = "fake kernels", fail: str | None = None) -> None:
        self.name, self.priority, self._ops = name, priority, ops_
        self.available, self.reason, self.fail = available, reason, fail
        self.availability_calls: list[tuple[str, str]] = []
        self.runs: list[str] = []

    def ops(self) -> tuple[str, ...]:
        return self._ops

    def availability(self, op: str, device_type: str) -> Availability:
        self.availability_calls.append((op, device_type))
        if self.fail == "availability":
            raise OSError("libfake.so: cannot open shared object file")
        return Availability(self.available, self.reason)

    def implementation(self, op: str, device_type: str):
        if self.fail == "implementation":
            raise ImportError("undefined symbol: fake_rms_norm")
        reference = TorchReferenceBackend().implementation(op, device_type)

        def run(*args, **kwargs):
            self.runs.append(op)
            return reference(*args, **kwargs)

        return run


def backends_plugin(*backends: object) -> object:
    class Plugin:
        @staticmethod
        @ds.core.hookimpl
        def ds_register_kernel_backends(register):
            for backend in backends:
                register(backend)

    return Plugin


def components_of(**plugins: object) -> Components:
    """Core's builtin plugin (which registers the torch reference) plus ``plugins``."""
    return load_components(make_plugin_set(autoload=False, extra_plugins=tuple(plugins.items())))


def with_reference(*backends: object) -> Components:
    return components_of(backends=backends_plugin(*backends))


@pytest.fixture(autouse=True)
def fresh_selection():
    yield
    reset_kernels()


def run_rms_norm() -> Tensor:
    return torch.ops.ds.rms_norm(torch.rand(2, 4) + 0.5, torch.rand(4) + 0.5, 1e-6)


def test_available_higher_priority_backend_runs_the_op():
    fast = FakeBackend("fast", 100)
    selection = install_kernels(with_reference(fast), device_types=["cpu"])
    choice = selection.choice("rms_norm", "cpu")
    assert (choice.backend, choice.reason) == ("fast", "fake kernels")
    assert ("torch-reference", "not consulted: 'fast' ranks higher and runs it") in [
        (r.backend, r.reason) for r in choice.rejected]
    x, weight = torch.rand(3, 4) + 0.5, torch.rand(4) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), core_reference.rms_norm(x, weight, 1e-6))
    assert fast.runs == ["rms_norm"]
    assert selection.choice("layer_norm", "cpu").backend == "torch-reference"


def test_unavailable_backend_falls_back_with_its_reason():
    cuda_only = FakeBackend("cuda-only", 100, available=False, reason="no CUDA device")
    choice = install_kernels(with_reference(cuda_only), device_types=["cpu"]).choice("rms_norm", "cpu")
    assert choice.backend == "torch-reference"
    assert [(r.backend, r.reason) for r in choice.rejected] == [("cuda-only", "unavailable: no CUDA device")]
    run_rms_norm()
    assert cuda_only.runs == []


@pytest.mark.parametrize("fail, message", [
    ("availability", "availability() raised OSError: libfake.so: cannot open shared object file"),
    ("implementation", "implementation() raised ImportError: undefined symbol: fake_rms_norm"),
])
def test_backend_that_raises_is_reported_and_skipped(fail, message):
    broken = FakeBackend("broken", 100, fail=fail)
    choice = install_kernels(with_reference(broken), device_types=["cpu"]).choice("rms_norm", "cpu")
    assert choice.backend == "torch-reference"
    assert [(r.backend, r.reason) for r in choice.rejected] == [("broken", message)]
    assert run_rms_norm().shape == (2, 4)


def test_backends_are_tried_by_priority_and_reference_last():
    low, high = FakeBackend("low", 5), FakeBackend("high", 50)
    negative = FakeBackend("negative", -10)
    selection = install_kernels(with_reference(low, negative, high), device_types=["cpu"])
    assert [b.name for b in selection.backends] == ["high", "low", "negative", "torch-reference"]
    choice = selection.choice("rms_norm", "cpu")
    assert choice.backend == "high"
    assert {r.backend for r in choice.rejected} == {"low", "negative", "torch-reference"}
    assert low.availability_calls == []  # never consulted once a better backend won
    other = selection.choice("softmax", "cpu")
    assert ("high", "does not implement this op") in [(r.backend, r.reason) for r in other.rejected]


def test_selection_happens_once_not_per_call():
    fast = FakeBackend("fast", 100)
    install_kernels(with_reference(fast), device_types=["cpu"])
    for _ in range(3):
        run_rms_norm()
    assert fast.availability_calls == [("rms_norm", "cpu")]
    assert fast.runs == ["rms_norm"] * 3


def test_reinstalling_replaces_the_previous_choice():
    fast = FakeBackend("fast", 100)
    install_kernels(with_reference(fast), device_types=["cpu"])
    install_kernels(with_reference(), device_types=["cpu"])
    run_rms_norm()
    assert fast.runs == []


def test_a_device_type_is_selected_lazily_on_first_call():
    fast = FakeBackend("fast", 100)
    selection = install_kernels(with_reference(fast), device_types=[])
    assert selection.choices == {}
    run_rms_norm()
    assert fast.runs == ["rms_norm"]
    assert installed_kernels().choice("rms_norm", "cpu").backend == "fast"


def test_first_call_installs_the_default_selection_from_installed_plugins():
    reset_kernels()
    x, weight = torch.rand(3, 4) + 0.5, torch.rand(4) + 0.5
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), core_reference.rms_norm(x, weight, 1e-6))
    selection = installed_kernels()
    assert selection.components is default_components()
    assert selection.choice("rms_norm", "cpu").backend is not None


def test_malformed_backend_is_reported_not_used():
    class NotABackend:
        name = "half-done"
        priority = 1

    selection = install_kernels(with_reference(NotABackend()), device_types=["cpu"])
    info = next(b for b in selection.backends if b.name == "half-done")
    assert "is not a KernelBackend" in info.problem
    choice = selection.choice("rms_norm", "cpu")
    assert choice.backend == "torch-reference"
    assert any(r.backend == "half-done" and "is not a KernelBackend" in r.reason for r in choice.rejected)


def test_without_any_runnable_backend_the_op_raises_with_the_reasons():
    cuda_only = FakeBackend("cuda-only", 100, available=False, reason="no CUDA device")
    plugin_set = make_plugin_set(autoload=False, extra_plugins=(("backends", backends_plugin(cuda_only)),))
    plugin_set.manager.unregister(name=CORE_PLUGIN_NAME)  # removes the torch reference
    selection = install_kernels(load_components(plugin_set), device_types=["cpu"])
    choice = selection.choice("rms_norm", "cpu")
    assert choice.backend is None
    with pytest.raises(KernelUnavailableError, match="cuda-only: unavailable: no CUDA device"):
        run_rms_norm()


# ------------------------------------------------------------------------------------------
# ops defined by plugins
# ------------------------------------------------------------------------------------------


def scaled_tanh(x: Tensor, scale: float) -> Tensor:
    return torch.tanh(x) * scale


def scaled_tanh_backward(grad_output: Tensor, x: Tensor, scale: float) -> Tensor:
    return grad_output * scale * (1 - torch.tanh(x) ** 2)


def scaled_exp(x: Tensor, *, scale: float) -> Tensor:
    return torch.exp(x) * scale


def scaled_exp_backward(grad_output: Tensor, output: Tensor, *, scale: float) -> Tensor:
    return grad_output * output


class TanhPlugin:
    @staticmethod
    @ds.core.hookimpl
    def ds_define_kernel_ops(define):
        define("test_scaled_tanh", scaled_tanh, backward=scaled_tanh_backward)

    @staticmethod
    @ds.core.hookimpl
    def ds_register_kernel_backends(register):
        register(FakeBackend("tanh-fast", 10, ("test_scaled_tanh", "test_scaled_tanh_backward")))


def test_plugin_op_is_a_differentiable_torch_op_backends_can_implement():
    selection = install_kernels(components_of(tanh=TanhPlugin), device_types=["cpu"])
    assert selection.choice("test_scaled_tanh", "cpu").backend == "tanh-fast"
    assert selection.choice("test_scaled_tanh_backward", "cpu").backend == "tanh-fast"
    x = (torch.rand(3, 5, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: torch.ops.ds.test_scaled_tanh(x, 1.5), (x,))
    compiled = torch.compile(lambda x: torch.ops.ds.test_scaled_tanh(x, 2.0).sum(), backend="aot_eager",
                             fullgraph=True)
    torch.testing.assert_close(compiled(x), scaled_tanh(x, 2.0).sum())


def plugin_defining(name: str, reference, **options) -> object:
    class Plugin:
        @staticmethod
        @ds.core.hookimpl
        def ds_define_kernel_ops(define):
            define(name, reference, **options)

    return Plugin


def test_backward_from_the_saved_output_with_keyword_only_arguments():
    exp_op = plugin_defining("test_scaled_exp", scaled_exp, backward=scaled_exp_backward, saves="output")
    selection = install_kernels(components_of(exp=exp_op), device_types=["cpu"])
    assert selection.choice("test_scaled_exp_backward", "cpu").backend == "torch-reference"
    x = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: torch.ops.ds.test_scaled_exp(x, scale=3.0), (x,))


def test_backward_convention_is_checked_before_anything_is_defined():
    def two_grads(grad_output: Tensor, x: Tensor, scale: float) -> tuple[Tensor, Tensor]:
        return grad_output, grad_output

    bad = plugin_defining("test_mismatched", scaled_tanh, backward=two_grads)
    with pytest.raises(PluginError, match="'test_mismatched' has 1 tensor arguments but its backward returns 2"):
        plan_kernels(components_of(bad=bad))
    assert not hasattr(torch.ops.ds, "test_mismatched_backward")


def test_plugin_cannot_redefine_a_core_op():
    clash = plugin_defining("rms_norm", scaled_tanh)
    with pytest.raises(PluginError, match="'rms_norm' is already defined by plugin 'core'.*'clash' must choose"):
        plan_kernels(components_of(clash=clash))


def test_unknown_define_option_is_an_error_listing_the_accepted_ones():
    typo = plugin_defining("test_typo", scaled_tanh, mutates=("x",))
    with pytest.raises(PluginError, match=r"unknown options \['mutates'\]; accepted: \['backward', 'fake'"):
        plan_kernels(components_of(typo=typo))


def test_reference_without_type_hints_is_an_error_naming_the_fix():
    def untyped(x, scale):
        return x * scale

    with pytest.raises(PluginError, match="test_untyped.*Give its reference torch.library-compatible type hints"):
        plan_kernels(components_of(untyped=plugin_defining("test_untyped", untyped)))
