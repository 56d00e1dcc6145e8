"""Builders for large Hugging Face configs that only make sense on the meta device."""

from __future__ import annotations

import sys

import torch
from torch import nn

from .conftest import FIXTURES


def llama_7b_meta() -> nn.Module:
    """A Llama-2-7B-shaped LlamaForCausalLM with every weight on the meta device."""
    sys.path.insert(0, str(FIXTURES))
    try:
        import hf_llama
    finally:
        sys.path.remove(str(FIXTURES))
    from transformers import LlamaForCausalLM

    cfg = hf_llama.config(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)
