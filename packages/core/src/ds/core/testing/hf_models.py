"""Tiny Hugging Face causal LMs with random weights, built from a config (nothing downloads).

The model transforms rewrite real ``transformers`` classes, so their tests need real ones;
these builders keep every test's model the same family at whatever size it needs.
``transformers`` is imported on call: it is a test dependency, not one of ds-core's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def tiny_llama(*, vocab: int, layers: int = 2, hidden: int = 24, ffn: int = 40, **overrides: Any) -> nn.Module:
    """``LlamaForCausalLM`` with 4 attention heads over 2 key/value heads; seeded, so repeatable."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      **overrides)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2(*, vocab: int, layers: int = 2) -> nn.Module:
    """``GPT2LMHeadModel`` (LayerNorm, learned positions) without dropout; seeded, so repeatable."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_embd=24, n_layer=layers, n_head=4, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)
