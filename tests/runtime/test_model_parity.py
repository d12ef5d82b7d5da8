"""Our Mixtral implementation against transformers' MixtralForCausalLM, fp32, loaded by weights.py."""

from __future__ import annotations

import pytest
import torch

from moe_runtime.generate import SamplingParams, generate
from moe_runtime.testing import save_tiny_hf_mixtral, transformers_greedy
from moe_runtime.weights import load_checkpoint

CONFIGS = {
    "e4-top2": dict(num_local_experts=4, num_experts_per_tok=2),
    "e8-top1": dict(num_local_experts=8, num_experts_per_tok=1),
    "e8-top2-odd-hidden": dict(num_local_experts=8, num_experts_per_tok=2, hidden_size=33, head_dim=8,
                               intermediate_size=19),
    "e4-top1-sharded": dict(num_local_experts=4, num_experts_per_tok=1, shard=True),
    "mha-tied-window": dict(num_key_value_heads=4, tie_word_embeddings=True, sliding_window=5),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf = save_tiny_hf_mixtral(tmp_path / name, seed=1, **CONFIGS[name])
    ours = load_checkpoint(tmp_path / name)
    tokens = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = ours(tokens, torch.arange(12)[None], kv_len=12)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["e4-top2", "e8-top2-odd-hidden"])
def test_greedy_generation_matches_transformers_generate(tmp_path, name):
    hf = save_tiny_hf_mixtral(tmp_path / name, seed=3, **CONFIGS[name])
    ours = load_checkpoint(tmp_path / name)
    prompts = [[5, 9, 17, 3], [11, 4, 8, 30, 12, 7, 1, 60], [42]]
    completions = generate(ours, prompts, SamplingParams(max_new_tokens=10))
    assert [c.output_ids for c in completions] == transformers_greedy(hf, prompts, 10)


def test_per_expert_load_counts_every_token_slot(tiny_checkpoint):
    path, _ = tiny_checkpoint
    model = load_checkpoint(path)
    tokens = torch.randint(0, 128, (1, 9))
    with torch.no_grad():
        model(tokens, torch.arange(9)[None], kv_len=9)
    load = model.expert_load()
    assert load.shape == (model.args.num_layers, model.args.num_experts)
    assert load.sum(dim=1).tolist() == [9 * model.args.top_k] * model.args.num_layers
