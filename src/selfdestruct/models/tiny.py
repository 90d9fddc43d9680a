"""Tiny Llama-architecture models built from a config: the embedded default runs without any download."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from selfdestruct.models.arch import TinyLlamaConfig

__all__ = ["TinyLlamaConfig", "build_tiny_llama", "count_parameters"]


def build_tiny_llama(arch: TinyLlamaConfig, tokenizer, seed: int) -> LlamaForCausalLM:
    """A freshly initialised ``LlamaForCausalLM`` whose special-token ids match ``tokenizer``."""
    config = LlamaConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        max_position_embeddings=arch.max_position_embeddings,
        tie_word_embeddings=arch.tie_word_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
