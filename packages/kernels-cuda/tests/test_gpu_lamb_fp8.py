"""Fused LAMB and the fp8 block quantizers against float64 / torch references, on a GPU.

LAMB: several consecutive steps (each must leave the workspace's arrival counters at
zero for the next) over odd sizes, chunk-boundary sizes, an empty tensor and hundreds of
small tensors, with parameters scaled so that some trust ratios hit max_coeff and some
min_coeff. Bounds, against the float64 reference: the parameter change of an fp32 master
3e-4 relative (a wrong trust ratio is off by order 1) plus half a float32 ulp of the new
parameter (a change of 1e-3 clamped by max_coeff on |p| ~ 100, an ulp of 7.6e-6, is
otherwise ~1e-3 relative from that rounding alone), moments 1e-6, a bf16 parameter
1.2e-2 (bf16 rounding); low-precision copies equal the parameter rounded.

fp8: codes and scales are compared with the torch reference on the same input (both scale
by the correctly rounded float32 reciprocal and round to nearest even with saturation, so
they should agree bit for bit; one ulp of scale and neighbouring codes on ties are
tolerated); dequantized values exactly, from the kernel's own codes. Outputs come from
NaN-poisoned memory.
"""

from __future__ import annotations

import math

import pytest
import torch

from ds.core.kernels import reference
from ds.core.optimizer_classes import FusedAdam
from ds.core.optimizers import make_adamw
from ds.core.testing.kernel_checks import poison, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BF16_BOUND = 1.2e-2  # a value rounded to bf16 alone is off by up to 2**-9 relative
LAMB_HYPER = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-6, "weight_decay": 0.01,
              "bias_correction": True, "max_coeff": 10.0, "min_coeff": 0.01, "eps_inside_sqrt": False}


def _needs_native(installed, *ops: str) -> None:
    for op in ops:
        choice = installed.choice(op, "cuda")
        if op.endswith("fp8") and torch.cuda.get_device_capability() < (8, 9):
            pytest.skip(f"fp8 kernels need compute capability 8.9: {choice}")
        assert choice.backend == "cuda-native", choice


def _lamb_state(sizes: list[int], param_dtype: torch.dtype, grad_dtype: torch.dtype):
    scales = [1.0, 100.0, 1e-4]  # ratios near 1, clamped to max_coeff, clamped to min_coeff
    params = [torch.randn(n, device="cuda", dtype=torch.float32).mul_(scales[i % 3]).to(param_dtype)
              for i, n in enumerate(sizes)]
    exp_avgs = [torch.randn(n, device="cuda") * 0.1 for n in sizes]
    exp_avg_sqs = [torch.rand(n, device="cuda") * 0.01 for n in sizes]
    return params, exp_avgs, exp_avg_sqs


def _run_lamb_steps(sizes: list[int], param_dtype: torch.dtype, grad_dtype: torch.dtype,
                    copy_dtype: torch.dtype | None, hyper: dict, steps: int = 3) -> None:
    params, exp_avgs, exp_avg_sqs = _lamb_state(sizes, param_dtype, grad_dtype)
    ref_p = [p.double() for p in params]
    ref_m = [m.double() for m in exp_avgs]
    ref_v = [v.double() for v in exp_avg_sqs]
    for step in range(1, steps + 1):
        grads = [torch.randn(n, device="cuda", dtype=grad_dtype) for n in sizes]
        copies = [torch.full((n,), float("nan"), device="cuda", dtype=copy_dtype) for n in sizes] if copy_dtype else []
        before = [p.double() for p in params]
        poison()
        torch.ops.ds.lamb_step(params, grads, exp_avgs, exp_avg_sqs, copies, step=step, **hyper)
        ref_before = [p.clone() for p in ref_p]
        reference.lamb_step(ref_p, [g.double() for g in grads], ref_m, ref_v, [], step=step, **hyper)
        for i, n in enumerate(sizes):
            if n == 0:
                continue
            if param_dtype == torch.float32:
                change, ref_change = params[i].double() - before[i], ref_p[i] - ref_before[i]
                # Rounding the new parameter to float32 costs up to half an ulp of |p| whatever the change.
                allowed = 3e-4 * ref_change.norm() + torch.finfo(torch.float32).eps / 2 * params[i].double().norm()
                assert not torch.isnan(change).any(), (step, i, n)
                assert (change - ref_change).norm() <= allowed, (step, i, n)
            else:
                assert rel_error(params[i], ref_p[i]) < BF16_BOUND, (step, i, n)
            assert rel_error(exp_avgs[i], ref_m[i]) < 1e-6, (step, i, n)
            assert rel_error(exp_avg_sqs[i], ref_v[i]) < 1e-6, (step, i, n)
            if copies:
                assert torch.equal(copies[i], params[i].to(copy_dtype)), (step, i, n)
        # Continue the reference from what the kernel produced, so errors do not compound.
        ref_p = [p.double() for p in params]
        ref_m = [m.double() for m in exp_avgs]
        ref_v = [v.double() for v in exp_avg_sqs]


@pytest.mark.parametrize(("param_dtype", "grad_dtype", "copy_dtype"), [
    (torch.float32, torch.float32, None),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, None),
])
def test_multi_tensor_lamb(installed, param_dtype, grad_dtype, copy_dtype) -> None:
    _needs_native(installed, "lamb_step")
    sizes = [1, 7, 16383, 16385, 0, 100_003, 3 * 1024 + 5, 1 << 20, 5 * 16384]
    _run_lamb_steps(sizes, param_dtype, grad_dtype, copy_dtype, LAMB_HYPER)


@pytest.mark.parametrize("options", [
    {"bias_correction": False, "eps_inside_sqrt": True},
    {"max_coeff": 0.5, "min_coeff": 0.1, "weight_decay": 0.0},
])
def test_lamb_options_over_many_small_tensors(installed, options: dict) -> None:
    _needs_native(installed, "lamb_step")
    generator = torch.Generator().manual_seed(5)
    sizes = torch.randint(1, 3000, (300,), generator=generator).tolist() + [40_000, 3]
    _run_lamb_steps(sizes, torch.float32, torch.float32, torch.bfloat16, {**LAMB_HYPER, **options}, steps=2)


def test_fused_adamw_from_the_factory_matches_torch_on_gpu(installed) -> None:
    _needs_native(installed, "adam_step")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(257, 129), torch.nn.GELU(), torch.nn.Linear(129, 33)).cuda()
    twin = torch.nn.Sequential(torch.nn.Linear(257, 129), torch.nn.GELU(), torch.nn.Linear(129, 33)).cuda()
    twin.load_state_dict(model.state_dict())
    ours = make_adamw(model.parameters(), lr=1e-3, betas=[0.9, 0.95], weight_decay=0.1)
    assert isinstance(ours, FusedAdam)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    for _ in range(5):
        x = torch.randn(16, 257, device="cuda")
        for net, optimizer in ((model, ours), (twin, theirs)):
            optimizer.zero_grad()
            net(x).square().mean().backward()
            optimizer.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _fp8_input(shape: tuple[int, ...], dtype: torch.dtype, noncontiguous: bool) -> torch.Tensor:
    """Magnitudes over eight decades, so groups mix normal and subnormal fp8 codes."""
    columns = shape[-1] * 2 if noncontiguous else shape[-1]  # noncontiguous: every other column
    x = torch.randn(*shape[:-1], columns, device="cuda") * torch.logspace(-4, 4, columns, device="cuda")
    x = x.to(dtype)
    return x[..., ::2] if noncontiguous else x


@pytest.mark.parametrize("fp8_dtype", FP8)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "group_size", "noncontiguous"), [
    ((1,), 32, False), ((1001,), 64, False), ((33, 4104), 128, False), ((1 << 20,), 256, False),
    ((77777,), 32, False), ((9, 515), 128, True), ((3, 5, 333), 64, True),
])
def test_fp8_quantize_and_dequantize_match_torch(installed, fp8_dtype, dtype, shape, group_size,
                                                 noncontiguous) -> None:
    from ds.kernels.cuda import opdefs_fp8

    _needs_native(installed, "quantize_fp8", "dequantize_fp8")
    x = _fp8_input(shape, dtype, noncontiguous)
    poison()
    codes, scales = torch.ops.ds.quantize_fp8(x, group_size, fp8_dtype)
    ref_codes, ref_scales = opdefs_fp8.quantize_fp8(x, group_size, fp8_dtype)
    assert codes.dtype == fp8_dtype and codes.shape == x.shape
    assert scales.shape == ref_scales.shape == (math.ceil(x.numel() / group_size),)
    torch.testing.assert_close(scales, ref_scales, rtol=2**-23, atol=0)  # expected equal; 1 ulp tolerated
    # Expected bit-equal; should a scale differ in its last bit, a value on a rounding tie may
    # land on the neighbouring code (same sign, adjacent bit pattern) and nowhere else.
    bits, ref_bits = codes.view(torch.uint8).int(), ref_codes.view(torch.uint8).int()
    differs = bits != ref_bits
    assert differs.float().mean().item() <= 1e-3
    assert ((bits - ref_bits).abs()[differs] == 1).all()
    for out_dtype in DTYPES:
        poison()
        y = torch.ops.ds.dequantize_fp8(codes, scales, group_size, out_dtype)
        ref_y = opdefs_fp8.dequantize_fp8(codes, scales, group_size, out_dtype)
        assert y.dtype == out_dtype and y.shape == x.shape
        assert not torch.isnan(y).any(), "NaN in the output: an element was not written"
        assert torch.equal(y, ref_y)
