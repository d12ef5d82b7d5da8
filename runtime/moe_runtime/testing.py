"""Test and benchmark helpers: tiny transformers Mixtral checkpoints built on the fly.

Imports transformers lazily; nothing in the serving path imports this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def save_tiny_hf_mixtral(path: str | Path, *, seed: int = 0, shard: bool = False, **overrides: Any):
    """Build a random transformers MixtralForCausalLM, save it with save_pretrained; return the model."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    config: dict[str, Any] = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=256,
    )
    config.update(overrides)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**config)).eval()
    model.save_pretrained(path, max_shard_size="100KB" if shard else "5GB")
    return model
