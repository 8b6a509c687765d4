"""Core's ops, run through ``torch.ops.ds``, against torch's own implementations."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from ds.core.kernels import install_kernels, ops, reset_kernels
from ds.core.plugins import load_components, make_plugin_set

SHAPES = [(7,), (3, 5), (2, 3, 17), (4, 1, 33)]
LAYOUTS = ["contiguous", "transposed", "strided"]
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True, scope="module")
def reference_kernels():
    """Core's builtin plugin alone: its torch reference backend runs every op."""
    selection = install_kernels(load_components(make_plugin_set(autoload=False)), device_types=["cpu"])
    assert selection.choice("rms_norm", "cpu").backend == "torch-reference"
    yield
    reset_kernels()


def nonzero(shape: tuple[int, ...], dtype: torch.dtype, layout: str = "contiguous") -> torch.Tensor:
    """Random values in ±[0.5, 1.5) laid out as asked; the last dimension keeps its size."""
    def values(s: tuple[int, ...]) -> torch.Tensor:
        sign = torch.randint(0, 2, s) * 2 - 1
        return ((torch.rand(s) + 0.5) * sign).to(dtype)

    if layout == "transposed" and len(shape) >= 2:
        return values((shape[1], shape[0], *shape[2:])).transpose(0, 1)
    if layout == "strided":
        return values((*shape[:-1], 2 * shape[-1]))[..., ::2]
    return values(shape)


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 3e-2, "rtol": 2e-2}


def leaves(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def compare(ours, theirs, inputs: list[torch.Tensor | None], dtype: torch.dtype) -> None:
    """Forward and every input gradient of ``ours`` match ``theirs`` computed in float32."""
    mine = leaves(*inputs)
    exact = [None if t is None else t.detach().float().requires_grad_() for t in inputs]
    out, expected = ours(*mine), theirs(*exact)
    assert out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out.float(), expected, **tolerances(dtype))
    grad = nonzero(tuple(out.shape), torch.float32)
    out.backward(grad.to(dtype))
    expected.backward(grad)
    for got, want in zip(mine, exact):
        if got is not None:
            assert got.grad.dtype == got.dtype
            torch.testing.assert_close(got.grad.float(), want.grad, **tolerances(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_matches_torch(shape, layout, dtype):
    x, weight = nonzero(shape, dtype, layout), nonzero(shape[-1:], dtype)
    compare(lambda x, w: ops.rms_norm(x, w, 1e-5), lambda x, w: F.rms_norm(x, shape[-1:], w, 1e-5),
            [x, weight], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm_matches_torch(shape, layout, dtype, with_bias):
    x, weight = nonzero(shape, dtype, layout), nonzero(shape[-1:], dtype)
    bias = nonzero(shape[-1:], dtype) if with_bias else None
    compare(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), lambda x, w, b: F.layer_norm(x, shape[-1:], w, b, 1e-5),
            [x, weight, bias], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_softmax_matches_torch(shape, layout, dtype):
    for dim in range(-1, len(shape) - 1):
        compare(functools.partial(ops.softmax, dim=dim), functools.partial(torch.softmax, dim=dim),
                [nonzero(shape, dtype, layout)], dtype)


def test_backward_ops_are_the_exact_derivatives():
    """float64 gradcheck: each backward op is the derivative of its forward op."""
    def double(*shape: int) -> torch.Tensor:
        return nonzero(shape, torch.float64).requires_grad_()

    x, weight, bias = double(3, 6), double(6), double(6)
    assert torch.autograd.gradcheck(lambda x, w: ops.rms_norm(x, w, 1e-6), (x, weight))
    assert torch.autograd.gradcheck(lambda x, w, b: ops.layer_norm(x, w, b, 1e-5), (x, weight, bias))
    assert torch.autograd.gradcheck(lambda x, w: ops.layer_norm(x, w, None, 1e-5), (x, weight))
    assert torch.autograd.gradcheck(lambda x: ops.softmax(x, 0), (x,))


def test_bad_weight_shape_names_the_fix():
    with pytest.raises(RuntimeError, match="weight has shape \\(4,\\) but the input's last dimension is 5"):
        ops.rms_norm(torch.ones(2, 5), torch.ones(4), 1e-6)


def adam_tensors(shapes, dtype):
    params = [nonzero(s, dtype).requires_grad_() for s in shapes]
    grads_per_step = [[nonzero(s, dtype) for s in shapes] for _ in range(3)]
    return params, grads_per_step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adamw", [True, False])
def test_adam_step_matches_torch_optim(dtype, adamw):
    shapes = [(5,), (3, 7), (2, 3, 4)]
    torch_params, grads_per_step = adam_tensors(shapes, dtype)
    params = [p.detach().clone() for p in torch_params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    hyper = {"lr": 1e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    optimizer = (torch.optim.AdamW if adamw else torch.optim.Adam)(torch_params, **hyper)
    for step, grads in enumerate(grads_per_step, start=1):
        for p, g in zip(torch_params, grads):
            p.grad = g.clone()
        optimizer.step()
        with torch.no_grad():
            ops.adam_step(params, grads, exp_avgs, exp_avg_sqs, [], lr=1e-2, beta1=0.8, beta2=0.95, eps=1e-6,
                          weight_decay=0.1, step=step, adamw=adamw, bias_correction=True)
    tol = {"atol": 1e-6, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 1e-2}
    for ours, theirs in zip(params, torch_params):
        torch.testing.assert_close(ours, theirs.detach(), **tol)
    for ours, theirs in zip(exp_avgs, torch_params):
        torch.testing.assert_close(ours, optimizer.state[theirs]["exp_avg"], **tol)


def test_adam_step_without_bias_correction_writes_low_precision_copy():
    params, (grads, *_) = adam_tensors([(4,), (3, 3)], torch.float32)
    params = [p.detach() for p in params]
    start = [p.clone() for p in params]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    low = [torch.zeros_like(p, dtype=torch.bfloat16) for p in params]
    ops.adam_step(params, grads, exp_avgs, exp_avg_sqs, low, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                  weight_decay=0.0, step=1, adamw=True, bias_correction=False)
    for p, p0, g, m, v, copy in zip(params, start, grads, exp_avgs, exp_avg_sqs, low):
        torch.testing.assert_close(m, 0.1 * g)
        torch.testing.assert_close(v, 0.01 * g * g)
        torch.testing.assert_close(p, p0 - 0.1 * (0.1 * g) / ((0.01 * g * g).sqrt() + 1e-8))
        assert torch.equal(copy, p.to(torch.bfloat16))


def test_adam_step_rejects_mismatched_lists():
    params = [torch.ones(3), torch.ones(2)]
    with pytest.raises(ValueError, match="adam_step got 2 params but 1 grads; pass one per param"):
        ops.adam_step(params, [torch.ones(3)], [torch.zeros(3)] * 2, [torch.zeros(3)] * 2, [], lr=0.1, beta1=0.9,
                      beta2=0.99, eps=1e-8, weight_decay=0.0, step=1, adamw=True, bias_correction=True)


class TinyNormModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(12, 12)
        self.norm_weight = torch.nn.Parameter(torch.rand(12) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(self.linear(x), self.norm_weight, 1e-6).relu().sum()


def test_rms_norm_compiles_into_one_graph():
    torch.manual_seed(0)
    model = TinyNormModel()
    x = nonzero((4, 12), torch.float32)
    compiled = torch.compile(model, fullgraph=True)  # inductor: this machine has a C compiler
    compiled(x).backward()
    compiled_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).backward()
    torch.testing.assert_close(compiled(x), model(x))
    for compiled_grad, eager in zip(compiled_grads, model.parameters()):
        torch.testing.assert_close(compiled_grad, eager.grad)
