"""The embedded model's architecture as a config dataclass, importable without torch (the config checks run first)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TinyLlamaConfig:
    """Architecture of a from-scratch Llama (``conf/model/tiny.yaml``, ``conf/model/micro.yaml``)."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 128
    tie_word_embeddings: bool = False
