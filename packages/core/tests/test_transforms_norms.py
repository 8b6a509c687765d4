"""Kernel injection of norms into real Hugging Face models: same numbers, same parameters."""

from __future__ import annotations

import copy
import warnings
from functools import partial

import pytest
import torch
from torch import nn

from ds.core.config import DsConfig
from ds.core.testing import hf_models
from ds.core.transforms.norms import FusedLayerNorm, FusedRMSNorm, NormKernelInjection, inject_norm_kernels

pytest.importorskip("transformers")  # the models below are transformers classes

VOCAB, SEQ = 61, 11
tiny_llama = partial(hf_models.tiny_llama, vocab=VOCAB, rms_norm_eps=1e-5)
tiny_gpt2 = partial(hf_models.tiny_gpt2, vocab=VOCAB)


def _randomise_norm_weights(model: nn.Module) -> None:
    """Norm weights start at ones and biases at zeros, which would hide a dropped weight or bias."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or ".ln_" in name or name.startswith("transformer.ln_f"):
                param.copy_(torch.randn_like(param))


@pytest.mark.parametrize(("build", "fused", "count"), [(tiny_llama, FusedRMSNorm, 5), (tiny_gpt2, FusedLayerNorm, 5)])
def test_injected_model_matches_original(build, fused, count) -> None:  # noqa: ANN001 - parametrised factories
    model = build()
    _randomise_norm_weights(model)
    original = copy.deepcopy(model)
    tensors_before = {name: p for name, p in model.named_parameters()}

    replaced = inject_norm_kernels(model)

    assert sum(replaced.values()) == count
    assert sum(isinstance(m, fused) for m in model.modules()) == count
    assert list(model.state_dict()) == list(original.state_dict())
    assert all(tensors_before[name] is p for name, p in model.named_parameters())
    ids = torch.randint(0, VOCAB, (3, SEQ))
    out, ref = model(input_ids=ids, labels=ids), original(input_ids=ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    grads = {n: p.grad for n, p in original.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


class OffsetRMSNorm(nn.Module):
    """Gemma's formula, ``x * (1 + weight)``: named and shaped like an RMSNorm but not one."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(size))
        self.eps = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


class PlainRMSNorm(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


def test_look_alikes_are_left_alone_and_shared_norms_stay_shared() -> None:
    shared = PlainRMSNorm(8)
    model = nn.ModuleDict({"a": shared, "b": shared, "offset": OffsetRMSNorm(8),
                           "no_affine": nn.LayerNorm(8, elementwise_affine=False),
                           "no_bias": nn.LayerNorm(8, bias=False)})
    state = torch.random.get_rng_state()

    replaced = inject_norm_kernels(model)

    assert torch.equal(torch.random.get_rng_state(), state)
    assert dict(replaced) == {"PlainRMSNorm": 1, "LayerNorm": 1}
    assert isinstance(model["a"], FusedRMSNorm) and model["a"] is model["b"]
    assert isinstance(model["offset"], OffsetRMSNorm)
    assert type(model["no_affine"]) is nn.LayerNorm
    assert isinstance(model["no_bias"], FusedLayerNorm) and model["no_bias"].bias is None
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(model["no_bias"](x), nn.functional.layer_norm(x, (8,), model["no_bias"].weight))


def test_nothing_recognised_warns_naming_the_model_class() -> None:
    config = DsConfig.model_validate({"kernels": {"inject": True}})
    transform = NormKernelInjection()
    model = nn.Sequential(nn.Linear(4, 4), OffsetRMSNorm(4))

    with pytest.warns(UserWarning, match="no RMSNorm or LayerNorm module of Sequential was recognised"):
        transform.apply(model, None)  # type: ignore[arg-type]

    assert transform.applies(config) and not transform.applies(DsConfig())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        transform.apply(tiny_llama(), None)  # type: ignore[arg-type]
