"""Qwen2-MoE, Qwen3-MoE and OLMoE against transformers, fp32, loaded by weights.py (Mixtral:
test_model_parity.py); config.json picks the family, unsupported ones fail clearly."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_runtime.errors import CheckpointError, ConfigError
from moe_runtime.generate import SamplingParams, generate
from moe_runtime.model import ModelArgs
from moe_runtime.testing import save_tiny_hf_model, transformers_greedy
from moe_runtime.weights import load_checkpoint

# initializer_range 0.2 rather than 0.02: routing far from uniform and every family feature (the shared
# expert, q/k norms, biases, renormalisation) moves the logits well past the tolerance (checked below).
CONFIGS = {
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen2_moe-renormalised-tied-sharded": ("qwen2_moe", dict(norm_topk_prob=True, tie_word_embeddings=True,
                                                              shard=True)),
    "qwen2_moe-e8-top1-no-qkv-bias": ("qwen2_moe", dict(num_experts=8, num_experts_per_tok=1, qkv_bias=False)),
    "qwen3_moe": ("qwen3_moe", {}),
    "qwen3_moe-biased-window-renormalised": ("qwen3_moe", dict(
        attention_bias=True, head_dim=8, use_sliding_window=True, sliding_window=5, norm_topk_prob=True)),
    "olmoe": ("olmoe", {}),
    "olmoe-clipped-biased-mha": ("olmoe", dict(
        clip_qkv=1.5, attention_bias=True, num_key_value_heads=4,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
}


def _save(path, name, seed):
    """A tiny transformers model of CONFIGS[name], its norms and biases jittered (transformers starts
    them at 1 and 0, which would hide a misplaced one), saved again; returns the model."""
    family, overrides = CONFIGS[name]
    hf = save_tiny_hf_model(path, family, seed=seed, initializer_range=0.2, **overrides)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in hf.named_parameters():
            if pname.endswith(("bias", "norm.weight")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    hf.save_pretrained(path, max_shard_size="100KB" if overrides.get("shard") else "5GB")
    return hf


def _logits(model, tokens):
    with torch.no_grad():
        return model(tokens, torch.arange(tokens.shape[1])[None], kv_len=tokens.shape[1])


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf = _save(tmp_path / name, name, seed=1)
    ours = load_checkpoint(tmp_path / name)
    assert ours.args.model_type == CONFIGS[name][0]
    tokens = torch.randint(0, hf.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = hf(tokens).logits
    torch.testing.assert_close(_logits(ours, tokens), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_greedy_generation_matches_transformers_generate(tmp_path, name):
    hf = _save(tmp_path / name, name, seed=3)
    ours = load_checkpoint(tmp_path / name)
    prompts = [[5, 9, 17, 3], [11, 4, 8, 30, 12, 7, 1, 60], [42]]
    completions = generate(ours, prompts, SamplingParams(max_new_tokens=10))
    assert [c.output_ids for c in completions] == transformers_greedy(hf, prompts, 10)


def _without_shared_expert(model):
    for moe in model.moe_blocks:
        moe.shared_expert = None


def _with_args(model, **changes):
    for layer in model.layers:
        layer.attention.args = layer.moe.args = layer.moe.args.with_(**changes)


SWITCHES = {
    "qwen2_moe shared expert": ("qwen2_moe", _without_shared_expert),
    "qwen2_moe no top-k renormalisation": ("qwen2_moe", lambda m: _with_args(m, norm_topk_prob=True)),
    "qwen3_moe per-head q/k norm": ("qwen3_moe", lambda m: _with_args(m, qk_norm=None)),
    "olmoe full q/k norm": ("olmoe", lambda m: _with_args(m, qk_norm=None)),
    "olmoe clip_qkv": ("olmoe-clipped-biased-mha", lambda m: _with_args(m, clip_qkv=None)),
}


@pytest.mark.parametrize("switch", SWITCHES)
def test_each_family_feature_moves_the_logits_past_the_parity_tolerance(tmp_path, switch):
    name, undo = SWITCHES[switch]
    _save(tmp_path / name, name, seed=1)
    ours = load_checkpoint(tmp_path / name)
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(2))
    before = _logits(ours, tokens)
    undo(ours)
    assert (_logits(ours, tokens) - before).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe", "olmoe"])
def test_per_expert_load_counts_every_token_slot(tmp_path, family):
    save_tiny_hf_model(tmp_path / family, family, num_experts_per_tok=3)
    model = load_checkpoint(tmp_path / family)
    _logits(model, torch.randint(0, 128, (1, 9)))
    load = model.expert_load()
    assert load.shape == (model.args.num_layers, model.args.num_experts)
    assert load.sum(dim=1).tolist() == [9 * 3] * model.args.num_layers


def _config(tmp_path, family, **overrides):
    save_tiny_hf_model(tmp_path, family, **overrides)
    return json.loads((tmp_path / "config.json").read_text())


EXPECTED_ARGS = {  # what each family's config.json (transformers 5.23 defaults) sets
    "mixtral": dict(norm_topk_prob=True, shared_expert_intermediate_size=0, qkv_bias=False, o_bias=False,
                    qk_norm=None, intermediate_size=96, rope_theta=1e6),
    "qwen2_moe": dict(norm_topk_prob=False, shared_expert_intermediate_size=80, qkv_bias=True, o_bias=False,
                      qk_norm=None, intermediate_size=48, rope_theta=1e4, sliding_window=None),
    "qwen3_moe": dict(norm_topk_prob=False, shared_expert_intermediate_size=0, qkv_bias=False, o_bias=False,
                      qk_norm="head", intermediate_size=48, rope_theta=1e4, num_experts=4),
    "olmoe": dict(norm_topk_prob=False, shared_expert_intermediate_size=0, qkv_bias=False, o_bias=False,
                  qk_norm="full", intermediate_size=96, rope_theta=1e4, clip_qkv=None),
}


@pytest.mark.parametrize("family", EXPECTED_ARGS)
def test_config_json_picks_the_family_and_its_defaults(tmp_path, family):
    args = ModelArgs.from_hf_config(_config(tmp_path, family))
    assert args.model_type == family
    assert {k: getattr(args, k) for k in EXPECTED_ARGS[family]} == EXPECTED_ARGS[family]


def test_unknown_model_type_fails_naming_it_and_the_supported_ones(tmp_path):
    save_tiny_hf_model(tmp_path, "olmoe")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "deepseek_v3"}))
    with pytest.raises(CheckpointError, match=r"config\.json: unsupported model_type 'deepseek_v3': "
                                              r"supported are mixtral, qwen2_moe, qwen3_moe, olmoe"):
        load_checkpoint(tmp_path)


UNSUPPORTED = {
    "dense layers by step": ("qwen2_moe", dict(decoder_sparse_step=2), r"dense MLP layers \[0\]"),
    "dense layers listed": ("qwen3_moe", dict(mlp_only_layers=[1]), r"dense MLP layers \[1\]"),
    "per-layer sliding window": ("qwen2_moe", dict(use_sliding_window=True), "use_sliding_window"),
    "scaled rope": ("olmoe", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
                    "rope_type 'linear'"),
    "not swiglu": ("qwen3_moe", dict(hidden_act="gelu"), "hidden_act 'gelu'"),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_family_features_fail_clearly(tmp_path, case):
    family, changes, message = UNSUPPORTED[case]
    config = _config(tmp_path, family) | changes
    with pytest.raises(ConfigError, match=message):
        ModelArgs.from_hf_config(config)


def _rewrite(path, edit):
    file = path / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})
    return file


SHARED_UP = "model.layers.1.mlp.shared_expert.up_proj.weight"
EXPERT_DOWN = "model.layers.0.mlp.experts.3.down_proj.weight"


@pytest.mark.parametrize("name", [SHARED_UP, EXPERT_DOWN, "model.layers.1.self_attn.q_proj.bias"])
def test_missing_family_tensor_is_named(tmp_path, name):
    save_tiny_hf_model(tmp_path, "qwen2_moe")
    _rewrite(tmp_path, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) " + name.replace(".", r"\.")):
        load_checkpoint(tmp_path)


def test_misshaped_q_norm_is_named_with_both_shapes(tmp_path):
    save_tiny_hf_model(tmp_path, "qwen3_moe")
    name = "model.layers.0.self_attn.q_norm.weight"
    file = _rewrite(tmp_path, lambda t: t.update({name: torch.ones(64)}))
    with pytest.raises(CheckpointError, match=rf"{file}.*{name}.*\[64\], expected \[16\]"):
        load_checkpoint(tmp_path)


def test_tensor_of_another_family_is_unexpected(tmp_path):
    save_tiny_hf_model(tmp_path, "qwen3_moe")
    name = "model.layers.0.mlp.shared_expert_gate.weight"
    file = _rewrite(tmp_path, lambda t: t.update({name: torch.zeros(1, 64)}))
    with pytest.raises(CheckpointError, match=rf"{file}.*unexpected tensor '{name}'.*qwen3_moe config"):
        load_checkpoint(tmp_path)
