"""Model families: a transformers config.json (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) as ModelArgs fields.

Owns which config key each family names differently, each family's defaults (transformers 5.23's config
classes) and the features the runtime lacks: those fail here with a ConfigError, never silently. Pure
dict code: no torch, no I/O, no modules (model.py builds ModelArgs from what this returns).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from moe_runtime.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def hf_config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """ModelArgs keyword arguments for a transformers `config.json`; unknown or unsupported ones fail."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"unsupported model_type {model_type!r}: supported are "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"unsupported hidden_act {config['hidden_act']!r}: only 'silu' (SwiGLU experts)")
    try:
        return _common_fields(config) | _FAMILY_FIELDS[model_type](config)
    except KeyError as exc:
        raise ConfigError(f"config.json lacks required field {exc.args[0]!r}") from exc


def _common_fields(config: dict[str, Any]) -> dict[str, Any]:
    return dict(
        model_type=config["model_type"],
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        num_kv_heads=config.get("num_key_value_heads") or config["num_attention_heads"],
        head_dim=config.get("head_dim"),
        top_k=config["num_experts_per_tok"],
        rms_norm_eps=config.get("rms_norm_eps", 1e-5),
        rope_theta=_rope_theta(config, default=1e6 if config["model_type"] == "mixtral" else 1e4),
        max_seq_len=config.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        bos_token_id=config.get("bos_token_id"),
        eos_token_id=_first(config.get("eos_token_id")),
    )


def _rope_theta(config: dict[str, Any], default: float) -> float:
    """rope_theta from transformers 5's rope_parameters or the older top-level key (default: the config
    class's default_theta: 1e6 for Mixtral, 1e4 for the others). Only unscaled RoPE is supported."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"unsupported rope_type {rope_type!r}: only 'default'")
    return float(rope.get("rope_theta", config.get("rope_theta", default)))


def _mixtral(config: dict[str, Any]) -> dict[str, Any]:
    return dict(
        intermediate_size=config["intermediate_size"],
        num_experts=config["num_local_experts"],
        sliding_window=config.get("sliding_window"),
        norm_topk_prob=True,  # MixtralTopKRouter always renormalises the top-k weights
    )


def _qwen2_moe(config: dict[str, Any]) -> dict[str, Any]:
    if config.get("use_sliding_window"):
        raise ConfigError("qwen2_moe with use_sliding_window=true (sliding attention on some layers only, "
                          "per max_window_layers) is not supported")
    return _qwen_moe_layers(config) | dict(
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        # The shared expert (DeepSpeed-MoE's residual expert, PR-MoE): a dense SwiGLU on every token,
        # scaled by sigmoid(shared_expert_gate(x)) and added to the routed experts' output.
        shared_expert_intermediate_size=config["shared_expert_intermediate_size"],
        qkv_bias=bool(config.get("qkv_bias", True)),  # q/k/v only; o_proj has none
    )


def _qwen3_moe(config: dict[str, Any]) -> dict[str, Any]:
    bias = bool(config.get("attention_bias", False))
    return _qwen_moe_layers(config) | dict(
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        sliding_window=config.get("sliding_window") if config.get("use_sliding_window") else None,
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="head",  # RMSNorm over each head's D of q and k, before RoPE
    )


def _olmoe(config: dict[str, Any]) -> dict[str, Any]:
    bias = bool(config.get("attention_bias", False))
    return dict(
        intermediate_size=config["intermediate_size"],
        num_experts=config["num_experts"],
        norm_topk_prob=bool(config.get("norm_topk_prob", False)),
        qkv_bias=bias,
        o_bias=bias,
        qk_norm="full",  # RMSNorm over the whole q [NH*D] and k [NKV*D] projections, before RoPE
        clip_qkv=config.get("clip_qkv"),
    )


def _qwen_moe_layers(config: dict[str, Any]) -> dict[str, Any]:
    """Experts of a Qwen MoE config; every layer must be sparse (dense MLP layers are not supported)."""
    # transformers 5.23 writes Qwen3-MoE's num_experts as num_local_experts (its attribute_map).
    num_experts = config.get("num_experts", config.get("num_local_experts"))
    if num_experts is None:
        raise KeyError("num_experts")
    step, dense = config.get("decoder_sparse_step", 1), config.get("mlp_only_layers") or []
    layers = range(config["num_hidden_layers"])
    dense_layers = [i for i in layers if i in dense or num_experts == 0 or (i + 1) % step != 0]
    if dense_layers:
        raise ConfigError(f"{config['model_type']}: dense MLP layers {dense_layers} (mlp_only_layers={dense}, "
                          f"decoder_sparse_step={step}, num_experts={num_experts}) are not supported: "
                          "every layer must be a sparse MoE layer")
    return dict(intermediate_size=config["moe_intermediate_size"], num_experts=num_experts)


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, list) and value else value


_FAMILY_FIELDS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
}
