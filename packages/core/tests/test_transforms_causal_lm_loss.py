"""Fused cross-entropy routed into real Hugging Face causal LMs: Hugging Face's loss and gradients."""

from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
from torch import nn

from ds.core.testing import hf_models
from ds.core.transforms.causal_lm_loss import FusedCrossEntropy, unfused_reason, use_fused_cross_entropy

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 61, 11
tiny_llama = partial(hf_models.tiny_llama, vocab=VOCAB)
tiny_gpt2 = partial(hf_models.tiny_gpt2, vocab=VOCAB)


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = ids.clone()
    labels[0, :4] = -100  # a masked prompt
    return labels


def _assert_same_grads(model: nn.Module, reference: nn.Module) -> None:
    grads = {n: p.grad for n, p in reference.named_parameters()}
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("num_items", [None, 37])
def test_fused_loss_and_gradients_match_hugging_face(build, num_items: int | None) -> None:  # noqa: ANN001
    model = build()
    reference = copy.deepcopy(model)
    output_class = type(reference(input_ids=torch.zeros(1, 2, dtype=torch.long)))

    assert use_fused_cross_entropy(model) is None

    ids = torch.randint(0, VOCAB, (3, SEQ))
    extra = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    out = model(input_ids=ids, labels=_labels(ids), **extra)
    ref = reference(input_ids=ids, labels=_labels(ids), **extra)
    assert type(out) is output_class and out.logits is None
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    out.loss.backward()
    ref.loss.backward()
    _assert_same_grads(model, reference)
    assert list(model.state_dict()) == list(reference.state_dict())


def test_shift_labels_positional_labels_tuples_and_plain_calls_mean_what_they_mean_in_hugging_face() -> None:
    model = tiny_llama()
    reference = copy.deepcopy(model)
    use_fused_cross_entropy(model)
    ids = torch.randint(0, VOCAB, (2, SEQ))
    shift = torch.randint(0, VOCAB, (2, SEQ))

    fused = model(input_ids=ids, labels=ids, shift_labels=shift).loss
    torch.testing.assert_close(fused, reference(input_ids=ids, labels=ids, shift_labels=shift).loss)
    positional = model(ids, None, None, None, None, ids)
    torch.testing.assert_close(positional.loss, reference(input_ids=ids, labels=ids).loss)
    as_tuple = model(input_ids=ids, labels=ids, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0].detach(), positional.loss.detach())
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


def test_models_whose_logits_change_after_the_head_keep_their_own_loss() -> None:
    capped = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, final_logit_softcapping=30.0))
    transform = FusedCrossEntropy()

    with pytest.warns(UserWarning, match=r"Gemma2ForCausalLM keeps its own loss: its config sets "
                                         r"final_logit_softcapping=30.0"):
        transform.apply(capped, None)  # type: ignore[arg-type]

    assert "forward" not in vars(capped)
    assert unfused_reason(nn.Linear(2, 2)) == "it is not a Hugging Face transformers model"
    assert unfused_reason(tiny_llama(output_router_logits=True)) is not None
