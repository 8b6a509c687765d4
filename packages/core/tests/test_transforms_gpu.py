"""Transforms on a GPU in bf16: as accurate as Hugging Face's own bf16 model against float64.

Error bound: the transformed model's loss and gradients may be no further from the
float64 model than twice the untransformed (or uncompiled) bf16 model's distance, or 3e-3 (loss) / 3e-2
(gradient, norm-wise relative), whichever is larger; bf16 keeps 8 mantissa bits.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ds.core.config import CompileConfig
from ds.core.testing.hf_models import tiny_llama
from ds.core.testing.kernel_checks import poison, rel_error
from ds.core.transforms.causal_lm_loss import use_fused_cross_entropy
from ds.core.transforms.compile import compile_blocks
from ds.core.transforms.norms import inject_norm_kernels

pytest.importorskip("transformers")  # the models below are transformers classes
pytestmark = pytest.mark.gpu

VOCAB, SEQ, BATCH = 1003, 37, 3
LOSS_FLOOR, GRAD_FLOOR = 3e-3, 3e-2


def _tiny_llama() -> nn.Module:
    model = tiny_llama(vocab=VOCAB, layers=3, hidden=264, ffn=520, use_cache=False).cuda()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.5 * torch.randn_like(param))
    return model


def _loss_and_grads(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict[str, torch.Tensor]]:
    poison()
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters()}


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), device="cuda")
    labels = ids.clone()
    labels[1, :9] = -100
    return ids, labels


def test_injected_norms_and_fused_loss_in_bf16_are_as_accurate_as_hugging_face() -> None:
    base = _tiny_llama()
    reference, plain, fused = copy.deepcopy(base).double(), copy.deepcopy(base).bfloat16(), base.bfloat16()
    assert sum(inject_norm_kernels(fused).values()) == 7
    assert use_fused_cross_entropy(fused) is None
    ids, labels = _inputs()

    ref_loss, ref_grads = _loss_and_grads(reference, ids, labels)
    plain_loss, plain_grads = _loss_and_grads(plain, ids, labels)
    fused_loss, fused_grads = _loss_and_grads(fused, ids, labels)

    plain_error = abs(plain_loss - ref_loss) / ref_loss
    assert abs(fused_loss - ref_loss) / ref_loss <= max(2 * plain_error, LOSS_FLOOR)
    for name, grad in fused_grads.items():
        bound = max(2 * rel_error(plain_grads[name], ref_grads[name]), GRAD_FLOOR)
        assert rel_error(grad, ref_grads[name]) <= bound, name


def test_compiled_transformed_model_is_as_accurate_as_the_eager_one() -> None:
    base = _tiny_llama()
    reference, eager = copy.deepcopy(base).double(), base.bfloat16()
    inject_norm_kernels(eager)
    use_fused_cross_entropy(eager)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compile_blocks(compiled, CompileConfig(enabled=True))
    ids, labels = _inputs()

    ref_loss, ref_grads = _loss_and_grads(reference, ids, labels)
    eager_loss, eager_grads = _loss_and_grads(eager, ids, labels)
    compiled_loss, compiled_grads = _loss_and_grads(compiled, ids, labels)

    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # one graph serves every layer
    eager_error = abs(eager_loss - ref_loss) / ref_loss
    assert abs(compiled_loss - ref_loss) / ref_loss <= max(2 * eager_error, LOSS_FLOOR)
    for name, grad in compiled_grads.items():
        bound = max(2 * rel_error(eager_grads[name], ref_grads[name]), GRAD_FLOOR)
        assert rel_error(grad, ref_grads[name]) <= bound, name
