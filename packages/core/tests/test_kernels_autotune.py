"""Selection by measured speed: two real CPU backends for rms_norm, one slower by construction.

``looped`` normalizes row by row in a Python loop (a hundred times slower than ``vectorized``
on these inputs) but ranks higher, so the ranking alone would pick it; timing must not.
CPU is timed here only because the tests ask for it (``MeasurePolicy(measure_cpu=True)``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ds.core
from ds.core.errors import ConfigError
from ds.core.kernels import Availability, MeasurePolicy, install_kernels, ops, reset_kernels
from ds.core.kernels import reference as core_reference
from ds.core.kernels.autotune import parse_overrides
from ds.core.plugins import Components, load_components, make_plugin_set

TIMED_CPU = MeasurePolicy(measure_cpu=True, budget_s=0.01)


def looped_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    return torch.stack([core_reference.rms_norm(row, weight, eps) for row in rows]).reshape(x.shape)


class CpuBackend:
    """A CPU backend for one op that counts its calls; optionally declares a benchmark input."""

    def __init__(self, name: str, priority: int, kernel: Callable[..., Any], op: str = "rms_norm", *,
                 benchmark: tuple[Any, ...] | None = None) -> None:
        self.name, self.priority, self.kernel, self.op, self.benchmark = name, priority, kernel, op, benchmark
        self.calls = 0

    def ops(self) -> list[str]:
        return [self.op]

    def availability(self, op: str, device_type: str) -> Availability:
        return Availability(device_type == "cpu", f"{self.name} kernel" if device_type == "cpu" else "CPU only")

    def implementation(self, op: str, device_type: str) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return self.kernel(*args, **kwargs)

        return run

    def benchmark_input(self, op: str, device_type: str) -> tuple[Any, ...] | None:
        return self.benchmark


def with_backends(*backends: CpuBackend) -> Components:
    class Plugin:
        @staticmethod
        @ds.core.hookimpl
        def ds_register_kernel_backends(register):
            for backend in backends:
                register(backend)

    return load_components(make_plugin_set(autoload=False, extra_plugins=(("cpu-backends", Plugin),)))


@pytest.fixture(autouse=True)
def fresh_selection():
    yield
    reset_kernels()


@pytest.fixture
def contenders() -> tuple[CpuBackend, CpuBackend]:
    return CpuBackend("looped", 200, looped_rms_norm), CpuBackend("vectorized", 100, core_reference.rms_norm)


def inputs(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(256, 64, dtype=dtype), torch.rand(64, dtype=dtype) + 0.5


def test_without_timing_on_cpu_the_ranking_decides(contenders) -> None:
    looped, vectorized = contenders
    selection = install_kernels(with_backends(looped, vectorized), device_types=["cpu"], policy=MeasurePolicy())
    x, weight = inputs()
    ops.rms_norm(x, weight, 1e-6)
    choice = selection.choice("rms_norm", "cpu")
    assert (choice.backend, choice.reason) == ("looped", "looped kernel")
    assert (looped.calls, vectorized.calls) == (1, 0)


def test_the_faster_backend_runs_the_op_and_the_times_are_the_reason(contenders) -> None:
    looped, vectorized = contenders
    selection = install_kernels(with_backends(looped, vectorized), device_types=["cpu"], policy=TIMED_CPU)
    assert "not called yet" in selection.choice("rms_norm", "cpu").reason
    x, weight = inputs()
    torch.testing.assert_close(ops.rms_norm(x, weight, 1e-6), core_reference.rms_norm(x, weight, 1e-6))
    choice = selection.choice("rms_norm", "cpu")
    assert choice.backend == "vectorized"
    assert re.fullmatch(r"vectorized: \d+\.\d{3} ms, looped: \d+\.\d{3} ms -> vectorized on float32 \[256, 64\], "
                        r"the first call's input", choice.reason), choice.reason
    slower_ms, faster_ms = (float(v) for v in re.findall(r"(\d+\.\d{3}) ms", choice.reason)[::-1])
    assert slower_ms > 5 * faster_ms
    reasons = {r.backend: r.reason for r in choice.rejected}
    assert reasons["looped"].startswith("slower on float32 [256, 64]")
    assert reasons["torch-reference"] == "fallback, not timed: a kernel backend runs it"
    calls = looped.calls, vectorized.calls
    ops.rms_norm(x, weight, 1e-6)
    assert (looped.calls, vectorized.calls) == (calls[0], calls[1] + 1)  # timed once, then the winner runs


def test_each_combination_of_input_dtypes_is_timed_once(contenders) -> None:
    selection = install_kernels(with_backends(*contenders), device_types=["cpu"], policy=TIMED_CPU)
    ops.rms_norm(*inputs(torch.float32), 1e-6)
    ops.rms_norm(*inputs(torch.float64), 1e-6)
    ops.rms_norm(*inputs(torch.float32), 1e-6)
    parts = selection.choice("rms_norm", "cpu").reason.split("; ")
    assert len(parts) == 2
    assert "on float32 [256, 64]" in parts[0] and "on float64 [256, 64]" in parts[1]


def test_a_declared_benchmark_input_is_timed_when_the_op_is_selected() -> None:
    x, weight = inputs()
    looped = CpuBackend("looped", 200, looped_rms_norm, benchmark=(x, weight, 1e-6))
    vectorized = CpuBackend("vectorized", 100, core_reference.rms_norm)
    selection = install_kernels(with_backends(looped, vectorized), device_types=["cpu"], policy=TIMED_CPU)
    choice = selection.choice("rms_norm", "cpu")
    assert choice.backend == "vectorized" and choice.reason.endswith("on float32 [256, 64], the benchmark input")
    calls = looped.calls
    ops.rms_norm(*inputs(), 1e-6)  # same dtypes: no second timing
    assert looped.calls == calls and selection.choice("rms_norm", "cpu").reason == choice.reason


def test_a_backend_that_fails_when_timed_loses_with_its_error(contenders) -> None:
    def broken(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        raise RuntimeError("kernel image is invalid")

    selection = install_kernels(with_backends(CpuBackend("broken", 300, broken), contenders[1]),
                                device_types=["cpu"], policy=TIMED_CPU)
    ops.rms_norm(*inputs(), 1e-6)
    choice = selection.choice("rms_norm", "cpu")
    assert choice.backend == "vectorized"
    assert "broken failed: RuntimeError: kernel image is invalid" in choice.reason
    assert ("broken", "failed when timed on float32 [256, 64], the first call's input: RuntimeError: kernel image "
            "is invalid") in [(r.backend, r.reason) for r in choice.rejected]


def test_an_op_that_writes_its_arguments_is_not_timed_on_a_callers_tensors() -> None:
    def adam(*args: Any, **kwargs: Any) -> None:
        core_reference.adam_step(*args, **kwargs)

    first, second = CpuBackend("first", 200, adam, "adam_step"), CpuBackend("second", 100, adam, "adam_step")
    selection = install_kernels(with_backends(first, second), device_types=["cpu"], policy=TIMED_CPU)
    param, grad = torch.ones(8), torch.full((8,), 0.5)
    ops.adam_step([param], [grad], [torch.zeros(8)], [torch.zeros(8)], [], lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                  weight_decay=0.0, step=1, adamw=True, bias_correction=True)
    assert (first.calls, second.calls) == (1, 0)
    torch.testing.assert_close(param, torch.full((8,), 0.9))  # one step of lr 0.1, not several
    assert selection.choice("adam_step", "cpu").backend == "first"


def test_the_operator_override_beats_the_clock(contenders) -> None:
    policy = dataclasses.replace(MeasurePolicy.from_env({"DS_KERNEL_BACKEND": "rms_norm=looped"}), measure_cpu=True)
    selection = install_kernels(with_backends(*contenders), device_types=["cpu"], policy=policy)
    ops.rms_norm(*inputs(), 1e-6)
    choice = selection.choice("rms_norm", "cpu")
    assert (choice.backend, choice.reason) == ("looped", "DS_KERNEL_BACKEND chose it (looped kernel)")
    assert ("vectorized", "DS_KERNEL_BACKEND chose 'looped'") in [(r.backend, r.reason) for r in choice.rejected]
    assert contenders[1].calls == 0


def test_an_override_that_cannot_run_here_is_noted_and_selection_goes_on(contenders) -> None:
    policy = MeasurePolicy(overrides={"rms_norm": "torch-reference", "layer_norm": "looped"})
    selection = install_kernels(with_backends(*contenders), device_types=["cpu"], policy=policy)
    assert selection.choice("rms_norm", "cpu").backend == "torch-reference"
    layer_norm = selection.choice("layer_norm", "cpu")
    assert layer_norm.backend == "torch-reference"
    assert layer_norm.reason.endswith("DS_KERNEL_BACKEND asks for 'looped', which cannot run it here")


@pytest.mark.parametrize(("text", "message"), [
    ("rms_norm", "entry 'rms_norm' is not op=backend"),
    ("rms_norm=", "entry 'rms_norm=' is not op=backend"),
])
def test_a_malformed_override_shows_the_form(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_overrides(text)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"rms_norm": "nonexistent"}, "backend 'nonexistent' for 'rms_norm', which is not registered; registered "
                                  "backends: looped, torch-reference, vectorized"),
    ({"rms_nrom": "looped"}, "names the op 'rms_nrom', which is not defined; defined ops: .*rms_norm"),
])
def test_an_override_naming_nothing_known_fails_with_the_choices(contenders, overrides: dict[str, str],
                                                                 message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        install_kernels(with_backends(*contenders), device_types=["cpu"], policy=MeasurePolicy(overrides=overrides))


def test_environment_switches() -> None:
    assert MeasurePolicy.from_env({}).measures("cuda") and not MeasurePolicy.from_env({}).measures("cpu")
    assert not MeasurePolicy.from_env({"DS_KERNEL_MEASURE": "0"}).measures("cuda")
    parsed = MeasurePolicy.from_env({"DS_KERNEL_BACKEND": " rms_norm = cuda-native , woq_matmul=cuda-triton,"})
    assert parsed.overrides == {"rms_norm": "cuda-native", "woq_matmul": "cuda-triton"}
