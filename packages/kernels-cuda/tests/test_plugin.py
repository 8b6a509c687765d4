"""ds-kernels-cuda registers through ds.plugins and reports, per op, why its kernels run or not."""

from __future__ import annotations

from importlib.metadata import entry_points

import pytest
import torch

from ds.core.kernels import plan_kernels
from ds.kernels.cuda._native import NativeLibrary, NativeUnavailableError, covers
from ds.kernels.cuda.backend import LAUNCHERS
from ds.kernels.cuda.opdefs import EXTRA_OPS

needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")


def test_entry_point_names_the_plugin_module() -> None:
    found = {ep.name: ep.value for ep in entry_points(group="ds.plugins")}
    assert found.get("kernels-cuda") == "ds.kernels.cuda.plugin"


def test_plugin_registers_backend_and_defines_extra_ops(components) -> None:
    registration = components.kernel_backends.registration("cuda-native")
    assert registration.plugin == "kernels-cuda"
    assert registration.value.priority > 0
    defined = set(components.kernel_ops.names())
    assert {"swiglu", "bias_gelu", "quantize_blockwise", "dequantize_blockwise"} <= defined
    assert set(EXTRA_OPS) <= set(LAUNCHERS)


def test_cpu_ops_run_on_the_reference_with_the_reason_recorded(components) -> None:
    selection = plan_kernels(components, ["cpu"])
    for op in LAUNCHERS:
        choice = selection.choice(op, "cpu")
        assert choice.backend == "torch-reference"
        reasons = {r.backend: r.reason for r in choice.rejected}
        assert "only" in reasons["cuda-native"] and "'cpu'" in reasons["cuda-native"]


@needs_no_cuda
def test_cuda_ops_without_a_cuda_torch_say_so(components) -> None:
    selection = plan_kernels(components, ["cuda"])
    choice = selection.choice("rms_norm", "cuda")
    assert choice.backend == "torch-reference"
    reason = {r.backend: r.reason for r in choice.rejected}["cuda-native"]
    assert "not built for CUDA" in reason


def test_a_missing_extension_is_reported_not_raised() -> None:
    library = NativeLibrary(package="ds.kernels.cuda.not_there", runtime="cuda", build_hint="rebuild it")
    with pytest.raises(NativeUnavailableError, match="not_there._C.*rebuild it"):
        library.load()
    assert library.problem("cuda") is not None
    assert "rebuild it" in library.problem("cuda") or "not built for CUDA" in library.problem("cuda")
    assert library.problem("cpu") == "runs on torch's 'cuda' devices only, not 'cpu'"


@pytest.mark.parametrize(
    ("architectures", "capability", "expected"),
    [
        ("80-real;90a-real;90-virtual", (8, 0), True),
        ("80-real;90a-real;90-virtual", (8, 9), True),   # sm_80 code runs on 8.9
        ("80-real;90a-real;90-virtual", (9, 0), True),
        ("80-real;90a-real;90-virtual", (12, 0), True),  # through the PTX
        ("80-real;90a-real;90-virtual", (7, 5), False),
        ("90a-real", (10, 0), False),                     # arch-specific code does not carry over
        ("90a-real", (9, 0), True),
        ("86", (8, 9), True),
    ],
)
def test_architecture_coverage(architectures: str, capability: tuple[int, int], expected: bool) -> None:
    assert covers(architectures, capability) is expected


@needs_no_cuda
def test_report_line_says_why_the_extension_is_unavailable() -> None:
    from ds.kernels.cuda import plugin

    problem = plugin.LIBRARY.problem("cuda")
    assert problem is not None
    assert plugin.ds_report_lines() == [f"ds.kernels.cuda._C: unavailable ({problem})"]
