"""The fp8 quantizers' references, their registration, and the LAMB / fp8 launchers' fallbacks, on the CPU."""

from __future__ import annotations

import pytest
import torch

from ds.core.kernels import plan_kernels
from ds.kernels.cuda import launch_fp8, launch_lamb
from ds.kernels.cuda._native import NativeLibrary
from ds.kernels.cuda.backend import LAUNCHERS, REQUIREMENTS
from ds.kernels.cuda.opdefs_fp8 import FP8_OPS, dequantize_fp8, quantize_fp8

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
# Largest rounding error near fp8_max, as a fraction of the group's amax: half an ulp at the top
# binade (16 of 448 for e4m3, 4096 of 57344 for e5m2).
ROUND_TRIP = {torch.float8_e4m3fn: 1 / 28, torch.float8_e5m2: 1 / 14}


def _groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    flat = x.reshape(-1).double()
    pad = -flat.numel() % group_size
    return torch.cat([flat, flat.new_zeros(pad)]).view(-1, group_size)


@pytest.mark.parametrize("fp8_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize(("shape", "group_size"), [((1,), 32), ((3, 37), 64), ((5, 77, 3), 128), ((1000,), 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_round_trip_is_within_half_an_ulp_of_the_scaled_group(fp8_dtype, shape, group_size, dtype) -> None:
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-3, 3, shape[-1])).to(dtype)
    codes, scales = quantize_fp8(x, group_size, fp8_dtype)
    assert codes.dtype == fp8_dtype and codes.shape == x.shape and scales.dtype == torch.float32
    groups = _groups(x, group_size)
    amax = groups.abs().amax(dim=1)
    assert scales.numel() == groups.shape[0]
    torch.testing.assert_close(scales.double(), (amax.float() / FP8_MAX[fp8_dtype]).double(), rtol=0, atol=0)
    code_values = _groups(codes.float(), group_size)
    assert torch.isfinite(code_values).all()
    # The element at amax maps to fp8_max itself: the whole range is used, nothing overflows.
    torch.testing.assert_close(code_values.abs().amax(dim=1), torch.full_like(amax, FP8_MAX[fp8_dtype]))
    back = dequantize_fp8(codes, scales, group_size, torch.float32)
    assert back.shape == x.shape
    error = (_groups(back, group_size) - groups).abs()
    assert (error <= amax[:, None] * ROUND_TRIP[fp8_dtype] * (1 + 1e-6)).all()


def test_values_past_the_range_saturate_and_zero_groups_stay_zero() -> None:
    x = torch.zeros(64)
    x[32:] = torch.linspace(-1.0, 1.0, 32)
    codes, scales = quantize_fp8(x, 32, torch.float8_e4m3fn)
    assert scales[0] == 0 and (codes[:32].float() == 0).all()
    assert codes[32:].float().abs().max() == 448.0
    assert (dequantize_fp8(codes, scales, 32, torch.float32)[:32] == 0).all()


def test_bad_group_sizes_dtypes_and_scale_counts_are_named() -> None:
    x = torch.randn(100)
    with pytest.raises(RuntimeError, match="group_size must be one of"):
        quantize_fp8(x, 48)
    with pytest.raises(RuntimeError, match="fp8_dtype must be torch.float8_e4m3fn or torch.float8_e5m2"):
        quantize_fp8(x, 32, torch.int8)
    codes, scales = quantize_fp8(x, 32)
    with pytest.raises(RuntimeError, match="100 codes in groups of 32 need 4 scales, got 3"):
        dequantize_fp8(codes, scales[:3], 32)


def test_plugin_defines_the_fp8_ops_and_the_backend_lists_lamb_and_fp8(components) -> None:
    assert set(FP8_OPS) <= set(components.kernel_ops.names())
    assert {"lamb_step", *FP8_OPS} <= set(LAUNCHERS)
    selection = plan_kernels(components, ["cpu"])
    for op in ("lamb_step", *FP8_OPS):
        assert selection.choice(op, "cpu").backend == "torch-reference"


def test_fp8_is_reported_unavailable_under_hip_without_a_gpu() -> None:
    hip = NativeLibrary(package="ds.kernels.rocm", runtime="hip", build_hint="")
    assert REQUIREMENTS["quantize_fp8"] is launch_fp8.fp8_problem
    assert "compiled for CUDA only" in launch_fp8.fp8_problem(hip)


def test_ops_through_the_dispatcher_run_the_reference_on_cpu(installed) -> None:
    x = torch.randn(7, 45, dtype=torch.bfloat16)
    codes, scales = torch.ops.ds.quantize_fp8(x, 64, torch.float8_e5m2)
    ref_codes, ref_scales = quantize_fp8(x, 64, torch.float8_e5m2)
    assert torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8)) and torch.equal(scales, ref_scales)
    torch.testing.assert_close(torch.ops.ds.dequantize_fp8(codes, scales, 64, torch.bfloat16),
                               dequantize_fp8(codes, scales, 64, torch.bfloat16))


def test_launchers_fall_back_to_the_reference_for_cpu_tensors() -> None:
    torch.manual_seed(3)
    params = [torch.randn(5), torch.randn(9)]
    expected = [p.clone() for p in params]
    grads = [torch.randn(5), torch.randn(9)]
    hyper = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8, "weight_decay": 0.01, "step": 1,
             "bias_correction": True, "max_coeff": 10.0, "min_coeff": 0.01, "eps_inside_sqrt": False}
    launch_lamb.lamb_step(None, params, grads, [torch.zeros(5), torch.zeros(9)], [torch.zeros(5), torch.zeros(9)],
                          [], **hyper)
    torch.ops.ds.lamb_step(expected, grads, [torch.zeros(5), torch.zeros(9)], [torch.zeros(5), torch.zeros(9)], [],
                           **hyper)
    assert all(torch.equal(a, b) for a, b in zip(params, expected))
    codes, _ = launch_fp8.quantize_fp8(None, torch.randn(40), 32)
    assert codes.dtype == torch.float8_e4m3fn
