"""The ops this package defines run, differentiate and compile on CPU through their torch references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds.kernels.cuda import opdefs


def test_swiglu_matches_its_formula_forward_and_backward(installed) -> None:
    x = torch.randn(3, 5, 14, dtype=torch.float64, requires_grad=True)
    y = torch.ops.ds.swiglu(x.float()).double()
    gate, up = x.chunk(2, -1)
    expected = F.silu(gate) * up
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(expected)
    (dx,) = torch.autograd.grad(expected, x, grad)
    xf = x.detach().float().requires_grad_()
    torch.ops.ds.swiglu(xf).backward(grad.float())
    torch.testing.assert_close(xf.grad.double(), dx, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu_gradients_match_autograd(installed, approximate: str) -> None:
    x = torch.randn(7, 33, requires_grad=True)
    bias = torch.randn(33, requires_grad=True)
    torch.ops.ds.bias_gelu(x, bias, approximate).sum().backward()
    x2, b2 = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.gelu(x2 + b2, approximate=approximate).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(bias.grad, b2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("numel", [1, 255, 1000, 4096])
def test_blockwise_quantization_round_trips_within_half_a_step(installed, bits: int, symmetric: bool,
                                                               numel: int) -> None:
    group = 64
    x = torch.randn(numel) * 3 + 0.5
    codes, scales, offsets = torch.ops.ds.quantize_blockwise(x, group, bits, symmetric)
    assert codes.numel() == (numel if bits == 8 else (numel + 1) // 2)
    assert scales.shape == (-(-numel // group),)
    assert offsets.numel() == (0 if symmetric else scales.numel())
    back = torch.ops.ds.dequantize_blockwise(codes, scales, offsets, numel, group, bits, symmetric, torch.float32)
    step = scales.repeat_interleave(group)[:numel]
    assert torch.all((back - x).abs() <= step / 2 + 1e-6)


def test_int4_codes_pack_low_nibble_first() -> None:
    x = torch.tensor([-7.0, 7.0, 1.0, -1.0])
    codes, scales, _ = opdefs.quantize_blockwise(x, 32, 4, True)
    assert scales.item() == 1.0
    assert codes.tolist() == [(-7 & 0xF) | (7 << 4), 1 | ((-1 & 0xF) << 4)]


def test_quantize_rejects_unsupported_group_sizes() -> None:
    with pytest.raises(RuntimeError, match="group_size must be one of"):
        opdefs.quantize_blockwise(torch.randn(64), 48, 8, True)


def test_ops_trace_under_torch_compile(installed) -> None:
    def block(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return torch.ops.ds.bias_gelu(torch.ops.ds.swiglu(x), bias, "tanh")

    x, bias = torch.randn(4, 16), torch.randn(8)
    compiled = torch.compile(block, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, bias), block(x, bias))
