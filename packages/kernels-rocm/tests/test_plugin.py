"""ds-kernels-rocm registers through ds.plugins and, without ROCm, reports every op unavailable with the reason."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

from ds.core.kernels import plan_kernels
from ds.core.kernels.ops import CORE_OPS
from ds.core.plugins import load_components, make_plugin_set

needs_no_rocm = pytest.mark.skipif(torch.version.hip is not None, reason="checks the behaviour without ROCm")


@pytest.fixture
def components():
    return load_components(make_plugin_set(autoload=False, allow={"kernels-rocm"}))


def test_entry_point_names_the_plugin_module() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="ds.plugins")}
    assert found.get("kernels-rocm") == "ds.kernels.rocm.plugin"


def test_backend_is_registered_and_covers_the_core_ops(components) -> None:
    registration = components.kernel_backends.registration("rocm-native")
    assert registration.plugin == "kernels-rocm"
    backend = registration.value
    assert backend.library.module_name == "ds.kernels.rocm._C"
    assert set(CORE_OPS) - {"softmax", "softmax_backward"} <= set(backend.ops())


def test_it_declares_no_ops_of_its_own(components) -> None:
    assert components.kernel_ops.names() == []


@needs_no_rocm
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_without_rocm_every_op_falls_back_with_a_reason(components, device_type: str) -> None:
    selection = plan_kernels(components, [device_type])
    for op in ("rms_norm", "layer_norm_backward", "adam_step"):
        choice = selection.choice(op, device_type)
        assert choice.backend == "torch-reference"
        reason = {r.backend: r.reason for r in choice.rejected}["rocm-native"]
        expected = "not built for HIP" if device_type == "cuda" else "'cuda' devices only"
        assert expected in reason


@needs_no_rocm
def test_fallback_results_are_the_reference(components) -> None:
    from ds.core.kernels import install_kernels, reset_kernels

    install_kernels(components, device_types=["cpu"])
    try:
        x, weight = torch.randn(4, 32), torch.rand(32) + 0.5
        expected = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
        torch.testing.assert_close(torch.ops.ds.rms_norm(x, weight, 1e-6), expected)
    finally:
        reset_kernels()


@needs_no_rocm
def test_report_line_says_why_the_extension_is_unavailable() -> None:
    from ds.kernels.rocm import plugin

    assert plugin.ds_report_lines() == [
        f"ds.kernels.rocm._C: unavailable ({plugin.LIBRARY.problem('cuda')})"
    ]
    assert "not built for HIP" in plugin.ds_report_lines()[0]
