"""Every CUDA kernel against a float64 torch computation, on fresh random data, on a GPU.

Relative error is ||out - ref|| / ||ref|| against float64 math on the same (upcast)
inputs. Bounds per output dtype: float32 3e-5 (transcendental functions of a few ulp,
amplified in GeLU's derivative), float16 2e-3, bfloat16 1.2e-2 (an output rounded to
bf16 alone is off by up to 2**-9 relative). Memory the ops allocate from is
poisoned with NaN bytes before each run, so an element a kernel forgets to write fails.
Each test also checks that the native backend, not the reference, ran the op.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ds.core.kernels import MeasurePolicy, install_kernels, reset_kernels
from ds.core.testing.kernel_checks import poison, rel_error

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

BOUND = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


NATIVE_OPS = ("rms_norm", "rms_norm_backward", "layer_norm", "layer_norm_backward", "swiglu", "bias_gelu",
              "adam_step", "quantize_blockwise", "dequantize_blockwise")


@pytest.fixture(autouse=True)
def native_kernels(components):
    """This file tests the CUDA kernels: pin them, whatever backend measures faster on the card."""
    policy = MeasurePolicy(overrides=dict.fromkeys(NATIVE_OPS, "cuda-native"))
    installed = install_kernels(components, policy=policy)
    for op in NATIVE_OPS:
        assert installed.choice(op, "cuda").backend == "cuda-native", installed.choice(op, "cuda")
    yield installed
    reset_kernels()


def randn(*shape: int, dtype: torch.dtype, noncontiguous: bool = False) -> torch.Tensor:
    if noncontiguous:  # every other column of a wider tensor
        return torch.randn(*shape[:-1], shape[-1] * 2, device="cuda", dtype=dtype)[..., ::2]
    return torch.randn(*shape, device="cuda", dtype=dtype)


# Layouts: 16-byte vectors with 1-8 per thread and four rows to a block (1000 bf16: 51 rows,
# the last block part-filled); 8-byte vectors (4092 in 16-bit types, 1002 in float32); single
# elements (3001; 1002 in 16-bit types); the widest row (16384); more row tiles than resident
# blocks, so each backward block accumulates many rows (20001 x 256). 16-bit LayerNorm rows of
# 4097-8192 take the streamed-rows backward (shared-memory dweight/dbias, next row prefetched):
# 5120 and 6000 leave some threads fewer vectors; 600 and 301 rows give blocks several rows.
NORM_SHAPES = [(1, 8), (3, 17, 1000), (64, 4096), (7, 5120), (2, 16384), (5, 3001), (33, 8192), (9, 4092),
               (4, 1002), (20001, 256), (600, 8192), (301, 6000)]


def check_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str, bound: float) -> None:
    """Forward and backward (via autograd) against float64 math on the same inputs."""
    hidden = x.shape[-1]
    grad = torch.randn(x.shape, device="cuda", dtype=x.dtype)
    poison()
    if kind == "rms":
        y = torch.ops.ds.rms_norm(x, weight, 1e-6)
        inputs = (x, weight)
    else:
        y = torch.ops.ds.layer_norm(x, weight, bias, 1e-5)
        inputs = (x, weight, bias)
    poison()
    grads = torch.autograd.grad(y, inputs, grad)

    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    if kind == "rms":
        ref = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-6) * w64
        ref_inputs = (x64, w64)
    else:
        b64 = bias.detach().double().requires_grad_()
        ref = F.layer_norm(x64, (hidden,), w64, b64, 1e-5)
        ref_inputs = (x64, w64, b64)
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad.double())
    assert y.dtype == x.dtype and rel_error(y, ref) < bound
    # Weight/bias gradients sum over rows in float32 before rounding: same bound.
    for got, want, given in zip(grads, ref_grads, inputs):
        assert got.shape == want.shape and got.dtype == given.dtype
        assert rel_error(got, want) < bound * 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", NORM_SHAPES)
@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_forward_and_backward(dtype: torch.dtype, shape: tuple[int, ...], kind: str) -> None:
    x = randn(*shape, dtype=dtype, noncontiguous=shape[-1] % 2 == 1).requires_grad_()
    hidden = shape[-1]
    weight = (torch.rand(hidden, device="cuda", dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(hidden, device="cuda", dtype=dtype, requires_grad=True) if kind == "layer" else None
    check_norm(x, weight, bias, kind, BOUND[dtype])


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("hidden", [2048, 4092])
def test_norm_with_float32_weight_on_bf16_input(kind: str, hidden: int) -> None:
    x = randn(128, hidden, dtype=torch.bfloat16).requires_grad_()
    weight = (torch.rand(hidden, device="cuda") + 0.5).requires_grad_()
    bias = torch.randn(hidden, device="cuda", requires_grad=True) if kind == "layer" else None
    check_norm(x, weight, bias, kind, BOUND[torch.bfloat16])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [4104, 8192])
def test_layer_norm_streamed_rows_with_other_parameter_dtypes(dtype: torch.dtype, hidden: int) -> None:
    """The streamed-rows backward with a float32 weight and bias, and with a float32 bias beside a
    16-bit weight (its two gradient column sums then take separate launches); non-contiguous x."""
    x = randn(700, hidden, dtype=dtype, noncontiguous=True).requires_grad_()
    for weight_dtype in (torch.float32, dtype):
        weight = (torch.rand(hidden, device="cuda", dtype=weight_dtype) + 0.5).requires_grad_()
        bias = torch.randn(hidden, device="cuda", requires_grad=True)
        check_norm(x, weight, bias, "layer", BOUND[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [1000, 8192])
def test_layer_norm_of_rows_with_large_means(dtype: torch.dtype, hidden: int) -> None:
    """Rows of mean +-100 and unit spread: E[x^2] - E[x]^2 in float32 loses ~1e-3 of the variance."""
    offset = torch.where(torch.rand(96, 1, device="cuda") < 0.5, -100.0, 100.0)
    x = (torch.randn(96, hidden, device="cuda") + offset).to(dtype).requires_grad_()
    weight = (torch.rand(hidden, device="cuda", dtype=dtype) + 0.5).requires_grad_()
    bias = torch.randn(hidden, device="cuda", dtype=dtype, requires_grad=True)
    check_norm(x, weight, bias, "layer", BOUND[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
# (70000, 16): more rows than the backward's 65535-row grid, so blocks walk several rows.
@pytest.mark.parametrize("shape", [(1, 2), (5, 7, 38), (128, 2 * 4096), (3, 2 * 5461), (70000, 16)])
def test_swiglu_forward_and_backward(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = randn(*shape, dtype=dtype, noncontiguous=shape[0] == 5).requires_grad_()
    grad = torch.randn(*shape[:-1], shape[-1] // 2, device="cuda", dtype=dtype)
    poison()
    y = torch.ops.ds.swiglu(x)
    poison()
    (dx,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().double().requires_grad_()
    gate, up = x64.chunk(2, -1)
    ref = F.silu(gate) * up
    (ref_dx,) = torch.autograd.grad(ref, x64, grad.double())
    assert rel_error(y, ref) < BOUND[dtype]
    assert rel_error(dx, ref_dx) < BOUND[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3), (9, 1001), (256, 4096), (4, 3, 8192), (3001, 2048)])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_forward_and_backward(dtype: torch.dtype, shape: tuple[int, ...], approximate: str) -> None:
    x = randn(*shape, dtype=dtype, noncontiguous=shape[0] == 9).requires_grad_()
    bias = torch.randn(shape[-1], device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(*shape, device="cuda", dtype=dtype)
    poison()
    y = torch.ops.ds.bias_gelu(x, bias, approximate)
    poison()
    dx, dbias = torch.autograd.grad(y, (x, bias), grad)
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    ref = F.gelu(x64 + b64, approximate=approximate)
    ref_dx, ref_db = torch.autograd.grad(ref, (x64, b64), grad.double())
    assert rel_error(y, ref) < BOUND[dtype]
    assert rel_error(dx, ref_dx) < BOUND[dtype]
    assert rel_error(dbias, ref_db) < BOUND[dtype] * 2


def adam_reference(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, adamw):
    p, g, m, v = p.double(), g.double(), m.double(), v.double()
    if adamw:
        p = p * (1 - lr * weight_decay)
    else:
        g = g + weight_decay * p
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    denom = v.sqrt() / math.sqrt(1 - beta2**step) + eps
    return p - lr / (1 - beta1**step) * m / denom, m, v


def assert_moment(out: torch.Tensor, ref: torch.Tensor, terms: torch.Tensor) -> None:
    """``out`` within 6 float32 eps of ``terms``, the summed magnitudes of its update, per element.

    m = beta1 m + (1 - beta1) g cancels when the terms have opposite signs (a one-element
    tensor came out at -0.0025 from terms of ~0.1, 2.4e-6 relative), so a bound relative to
    the moment itself is wrong. Its float32 roundings (beta1 and 1 - beta1 as float32, the
    products, the sum, Adam's g + weight_decay p, squared in v) total at worst ~4.5 eps of
    the terms; emulated in float32 over 1M elements the largest was 2.3 eps.
    """
    assert not torch.isnan(out).any(), "NaN in a moment: an element was not written"
    excess = ((out.double() - ref).abs() - 6 * torch.finfo(torch.float32).eps * terms).max().item()
    assert excess <= 0, f"moment off by {excess:.3g} beyond 6 float32 eps of its terms"


@pytest.mark.parametrize(("param_dtype", "grad_dtype", "copy_dtype"), [
    (torch.float32, torch.float32, None),
    (torch.float32, torch.bfloat16, torch.bfloat16),
    (torch.float32, torch.float16, torch.float16),
    (torch.bfloat16, torch.bfloat16, None),
])
@pytest.mark.parametrize("adamw", [True, False])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
def test_multi_tensor_adam(param_dtype, grad_dtype, copy_dtype, adamw: bool, grad_scale: float) -> None:
    """``grad_scale`` (ZeRO's fused step: clipping and loss scale) multiplies each gradient in float32."""
    sizes = [1, 7, 16383, 16385, 100_003, 3 * 1024 + 5, 1 << 20]
    params = [torch.randn(n, device="cuda", dtype=param_dtype) for n in sizes]
    grads = [torch.randn(n, device="cuda", dtype=grad_dtype) for n in sizes]
    exp_avgs = [torch.randn(n, device="cuda") * 0.1 for n in sizes]
    exp_avg_sqs = [torch.rand(n, device="cuda") * 0.01 for n in sizes]
    copies = [torch.full((n,), float("nan"), device="cuda", dtype=copy_dtype) for n in sizes] if copy_dtype else []
    before = [(p.clone(), g.clone(), m.clone(), v.clone()) for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)]
    hyper = {"lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1, "step": 3, "adamw": adamw}
    torch.ops.ds.adam_step(params, grads, exp_avgs, exp_avg_sqs, copies, bias_correction=True, grad_scale=grad_scale,
                           **hyper)
    for i, (p0, g_in, m0, v0) in enumerate(before):
        g0 = g_in.double() * grad_scale
        ref_p, ref_m, ref_v = adam_reference(p0, g0, m0, v0, **hyper)
        bound = 1e-6 if param_dtype == torch.float32 else BOUND[param_dtype]
        assert rel_error(params[i], ref_p) < bound
        grad = g0.double().abs() if adamw else g0.double().abs() + hyper["weight_decay"] * p0.double().abs()
        assert_moment(exp_avgs[i], ref_m, hyper["beta1"] * m0.double().abs() + (1 - hyper["beta1"]) * grad)
        assert_moment(exp_avg_sqs[i], ref_v, hyper["beta2"] * v0.double() + (1 - hyper["beta2"]) * grad**2)
        if copies:
            assert rel_error(copies[i], ref_p) < BOUND[copy_dtype]
            torch.testing.assert_close(copies[i], params[i].to(copy_dtype), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize(("numel", "group"), [(1, 32), (1001, 64), (4096 * 33, 128), (1 << 20, 256), (77777, 32)])
def test_blockwise_quantization(dtype, bits: int, symmetric: bool, numel: int, group: int) -> None:
    from ds.kernels.cuda import opdefs

    x = torch.randn(numel, device="cuda", dtype=dtype) * 2 + 0.3
    poison()
    codes, scales, offsets = torch.ops.ds.quantize_blockwise(x, group, bits, symmetric)
    ref_codes, ref_scales, ref_offsets = opdefs.quantize_blockwise(x, group, bits, symmetric)
    assert codes.dtype == ref_codes.dtype and codes.shape == ref_codes.shape
    torch.testing.assert_close(scales, ref_scales, rtol=1e-6, atol=0)
    torch.testing.assert_close(offsets, ref_offsets, rtol=0, atol=0)
    # torch divides by a scalar as a multiplication by its reciprocal, so a scale can
    # differ in the last bit and a value on a rounding tie land one code away (seen in up
    # to 0.3% of bf16 codes); the round-trip bound below holds for every element.
    mismatched = (codes != ref_codes).float().mean().item()
    assert mismatched <= 1e-2
    if bits == 8:
        assert (codes.int() - ref_codes.int()).abs().max().item() <= 1
    poison()
    back = torch.ops.ds.dequantize_blockwise(codes, scales, offsets, numel, group, bits, symmetric, dtype)
    ref_back = opdefs.dequantize_blockwise(codes, scales, offsets, numel, group, bits, symmetric, torch.float64)
    assert back.dtype == dtype and rel_error(back, ref_back) < BOUND[dtype]
    step = scales.double().repeat_interleave(group)[:numel]
    offset = offsets.double().repeat_interleave(group)[:numel] if not symmetric else 0.0
    # Two roundings beyond half a step. The output's own, relative to the dequantized value
    # (up to |x| + step): an asymmetric grid has no exact zero, so small x can come back as a
    # rounded value. And the float32 arithmetic on x - offset, up to 255 steps even where x
    # is near 0: (x - offset) * (1 / scale) rounds three times (a value near a tie can take
    # the far code) and code * scale once, under 2 eps of |x - offset| + step.
    rounding = (x.double().abs() + step) * torch.finfo(dtype).eps
    rounding += 2 * torch.finfo(torch.float32).eps * ((x.double() - offset).abs() + step)
    assert torch.all((back.double() - x.double()).abs() <= step / 2 * (1 + 1e-5) + rounding)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("bits", "symmetric"), [(8, True), (4, False)])
def test_dequantize_of_strided_and_misaligned_codes(dtype, bits: int, symmetric: bool) -> None:
    """Codes as an every-other-byte view and as a view one byte into a buffer: the launcher's
    contiguous, 16-byte aligned copy gives the same output as the codes themselves."""
    from ds.kernels.cuda import opdefs

    numel, group = 50001, 128  # 6250 whole 8-element pieces and a tail of one
    x = torch.randn(numel, device="cuda", dtype=dtype)
    codes, scales, offsets = torch.ops.ds.quantize_blockwise(x, group, bits, symmetric)
    poison()
    want = torch.ops.ds.dequantize_blockwise(codes, scales, offsets, numel, group, bits, symmetric, dtype)
    ref = opdefs.dequantize_blockwise(codes, scales, offsets, numel, group, bits, symmetric, torch.float64)
    assert rel_error(want, ref) < BOUND[dtype]
    strided = torch.empty(codes.numel() * 2, device="cuda", dtype=codes.dtype)
    strided[::2] = codes
    shifted = torch.empty(codes.numel() + 1, device="cuda", dtype=codes.dtype)[1:]
    shifted.copy_(codes)
    for view in (strided[::2], shifted):
        poison()
        got = torch.ops.ds.dequantize_blockwise(view, scales, offsets, numel, group, bits, symmetric, dtype)
        assert torch.equal(got, want)


def test_torch_compile_of_a_model_using_the_kernels() -> None:
    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(256, 2 * 512, bias=False)
            self.down = torch.nn.Linear(512, 256)
            self.norm_weight = torch.nn.Parameter(torch.rand(256) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.ops.ds.rms_norm(x, self.norm_weight, 1e-6)
            h = torch.ops.ds.swiglu(self.up(h))
            return x + torch.ops.ds.bias_gelu(self.down(h), self.down.bias, "tanh")

    model = Block().cuda()
    x = torch.randn(8, 64, 256, device="cuda")
    eager = model(x)
    eager.square().mean().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    assert rel_error(out, eager) < 1e-5
    for p, want in zip(model.parameters(), eager_grads):
        assert rel_error(p.grad, want) < 1e-4
