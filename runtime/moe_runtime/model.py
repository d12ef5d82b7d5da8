"""The Mixtral-architecture decoder: RMSNorm, RoPE, GQA attention over a static KV cache, MoE block.

Owns `ModelArgs` (presets and `from_hf_config`), the modules and the per-expert load counters; the
Qwen2-MoE / Qwen3-MoE / OLMoE differences (shared expert, q/k norms, biases) are switches of ModelArgs,
parsed by families.py. Routing and expert math live in gating.py / experts.py; weights are loaded by
weights.py. No I/O here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_runtime.config import GatingConfig
from moe_runtime.errors import ConfigError
from moe_runtime.experts import run_experts
from moe_runtime.families import hf_config_fields
from moe_runtime.gating import ForcedRouting, RouteOptions, forced_route, route

# B batch, S new tokens per sequence, T = B*S tokens, L layers, E experts, K top-k,
# H hidden, F expert ffn, NH query heads, NKV key/value heads, D head dim, V vocab, M cache length


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336  # F, per expert
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    num_experts: int = 8
    top_k: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_seq_len: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # Family switches (families.py reads them from config.json; the defaults are Mixtral's).
    model_type: str = "mixtral"
    norm_topk_prob: bool = True  # renormalise the top-k routing weights to sum to 1 (Mixtral)
    shared_expert_intermediate_size: int = 0  # FS of the gated shared expert on every token; 0: none
    qkv_bias: bool = False  # bias on the q/k/v projections
    o_bias: bool = False  # bias on the output projection
    qk_norm: str | None = None  # RMSNorm of q and k before RoPE: "full" (OLMoE) or "head" (Qwen3-MoE)
    clip_qkv: float | None = None  # clamp q, k, v to [-clip_qkv, clip_qkv] (OLMoE)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        checks = {
            "top_k must be in 1..num_experts": 1 <= self.top_k <= self.num_experts,
            "num_heads must be a multiple of num_kv_heads": self.num_heads % self.num_kv_heads == 0,
            "head_dim must be even (RoPE)": self.head_dim % 2 == 0,
            "qk_norm must be None, 'full' or 'head'": self.qk_norm in (None, "full", "head"),
        }
        for message, ok in checks.items():
            if not ok:
                raise ConfigError(f"invalid model config: {message} ({self})")

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArgs:
        """A transformers `config.json` of a supported family (families.py) as ModelArgs; others fail."""
        return cls(**hf_config_fields(config))

    def with_(self, **changes: Any) -> ModelArgs:
        return replace(self, **changes)

    def expert_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one expert's weights (w1, w3, w2)."""
        return 3 * self.hidden_size * self.intermediate_size * _dtype_size(dtype)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


KV_LEN_ALIGN = 64  # cache positions attended are a multiple of this (Transformer.forward)

PRESETS: dict[str, ModelArgs] = {
    # Tiny: CPU tests and the demo. Vocab covers bytes so text prompts work without a tokenizer.
    "tiny": ModelArgs(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
        num_experts=8, top_k=2, max_seq_len=512, rope_theta=10000.0,
    ),
    "mixtral-8x7b": ModelArgs(),
    "mixtral-8x22b": ModelArgs(
        vocab_size=32768, hidden_size=6144, intermediate_size=16384, num_layers=56, num_heads=48,
        num_kv_heads=8, max_seq_len=65536,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as HF Mixtral does, then scale in the input dtype.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_tables(args: ModelArgs, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_len, D] in float32 (HF's rotate-half layout)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    t = torch.arange(args.max_seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # [M, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [M, D]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, N, D]; cos/sin [B, S, D] gathered at each token's position."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.to(x.dtype)


class KVCache(nn.Module):
    """Static per-layer cache [max_batch, M, NKV, D]: a sequence owns one batch slot for its life."""

    def __init__(self, max_batch: int, max_seq: int, num_kv_heads: int, head_dim: int, dtype, device) -> None:
        super().__init__()
        shape = (max_batch, max_seq, num_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots, input_pos, k, v, kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, S, NKV, D] at (slot, position); return the slots' caches [B, kv_len, NKV, D]."""
        if slots is None:  # the batch is cache rows 0..B-1: views, no gather
            b = k.shape[0]
            rows = torch.arange(b, device=k.device)[:, None]
            self.k[rows, input_pos] = k
            self.v[rows, input_pos] = v
            return self.k[:b, :kv_len], self.v[:b, :kv_len]
        self.k[slots[:, None], input_pos] = k
        self.v[slots[:, None], input_pos] = v
        return self.k[slots, :kv_len], self.v[slots, :kv_len]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        nh, nkv, d, h = args.num_heads, args.num_kv_heads, args.head_dim, args.hidden_size
        self.wq = nn.Linear(h, nh * d, bias=args.qkv_bias)
        self.wk = nn.Linear(h, nkv * d, bias=args.qkv_bias)
        self.wv = nn.Linear(h, nkv * d, bias=args.qkv_bias)
        self.wo = nn.Linear(nh * d, h, bias=args.o_bias)
        # q/k norms: OLMoE's over the whole projection, Qwen3-MoE's over each head (HF's q_norm/k_norm).
        norm_dims = {"full": (nh * d, nkv * d), "head": (d, d)}.get(args.qk_norm)
        self.q_norm = RMSNorm(norm_dims[0], args.rms_norm_eps) if norm_dims else None
        self.k_norm = RMSNorm(norm_dims[1], args.rms_norm_eps) if norm_dims else None
        self.kv_cache: KVCache | None = None

    def forward(self, x, cos, sin, mask, input_pos, slots, kv_len: int) -> torch.Tensor:
        a = self.args
        q, k, v = self._qkv(x)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_cache is None:
            raise RuntimeError("KV cache not set up: call Transformer.setup_cache() first")
        k, v = self.kv_cache.update(slots, input_pos, k, v, kv_len)  # [B, kv_len, NKV, D]
        return self.wo(_grouped_query_attention(q, k, v, mask, 1.0 / math.sqrt(a.head_dim)))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, H] -> q [B, S, NH, D], k/v [B, S, NKV, D], normed and clipped as the family does."""
        b, s, _ = x.shape
        a = self.args
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if a.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, s, a.num_heads, a.head_dim)
        k = k.view(b, s, a.num_kv_heads, a.head_dim)
        v = v.view(b, s, a.num_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if a.clip_qkv is not None:
            q, k, v = (t.clamp(-a.clip_qkv, a.clip_qkv) for t in (q, k, v))
        return q, k, v


def _grouped_query_attention(q, k, v, mask, scale: float) -> torch.Tensor:
    """q [B, S, NH, D], k/v [B, kv_len, NKV, D], mask [B, 1, S, kv_len] -> [B, S, NH*D].

    The G = NH/NKV query heads that share a kv head are folded into the query length, so SDPA sees equal
    head counts. With a mask, enable_gqa leaves only the math backend (torch's sdp_utils.cpp: the
    memory-efficient kernel rejects grouped heads, flash rejects masks), which copies k/v G times and
    scores in float32; folded, the fused memory-efficient kernel runs (issue 8: decode and prefill).
    """
    b, s, nh, d = q.shape
    nkv, kv_len = k.shape[2], k.shape[1]
    g = nh // nkv
    q = q.view(b, s, nkv, g, d).permute(0, 2, 1, 3, 4).reshape(b, nkv, s * g, d)  # row s*G+g, head kv*G+g
    mask = mask[:, :, :, None, :].expand(b, 1, s, g, kv_len).reshape(b, 1, s * g, kv_len)
    y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return y.view(b, nkv, s, g, d).permute(0, 2, 1, 3, 4).reshape(b, s, nh * d)  # [B, S, NH*D]


class SharedExpert(nn.Module):
    """A dense SwiGLU expert every token takes, scaled by sigmoid(gate(x)): Qwen2-MoE's shared expert, the
    residual expert of DeepSpeed-MoE's PR-MoE (Rajbhandari et al. 2022, arXiv:2201.05596)."""

    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.w13 = nn.Linear(hidden, 2 * ffn, bias=False)  # [2FS, H] = cat(gate_proj, up_proj)
        self.w2 = nn.Linear(ffn, hidden, bias=False)  # [H, FS]
        self.gate = nn.Linear(hidden, 1, bias=False)  # [1, H]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., H] -> [..., H]."""
        g, u = self.w13(x).chunk(2, dim=-1)  # [..., FS] each
        return torch.sigmoid(self.gate(x)) * self.w2(F.silu(g) * u)


class MoEBlock(nn.Module):
    """Router + E SwiGLU experts, with per-expert load counters kept on the device.

    Pipeline (owning module of each stage):
    [gate] gating.route -> [top-k] gating.route (or gating.forced_route) -> [fetch experts] expert_cache
    -> [dispatch] experts.run_experts -> [expert FFN] experts.run_experts -> [combine] experts.run_experts
    -> [shared expert] SharedExpert, on every token, added last (Qwen2-MoE; absent in the other families)
    With expert buffering (issue 5) expert_cache.ExpertCache runs fetch, dispatch, FFN and combine itself,
    over its device slots and with the same math.
    """

    def __init__(self, args: ModelArgs, gating: GatingConfig) -> None:
        super().__init__()
        self.args, self.gating = args, gating
        e, f, h = args.num_experts, args.intermediate_size, args.hidden_size
        self.router = nn.Linear(h, e, bias=False)
        self.w13 = nn.Parameter(torch.empty(e, 2 * f, h))  # [E, 2F, H] = cat(w1, w3), nn.Linear layout
        self.w2 = nn.Parameter(torch.empty(e, h, f))  # [E, H, F]
        fs = args.shared_expert_intermediate_size
        self.shared_expert = SharedExpert(h, fs) if fs else None
        # Cumulative token-slots routed to each expert and static-gating drops; read on request only.
        self.register_buffer("expert_load", torch.zeros(e, dtype=torch.int64), persistent=False)
        self.register_buffer("dropped_slots", torch.zeros((), dtype=torch.int64), persistent=False)
        # Expert parallelism (parallel.py) takes over dispatch and combine when set.
        self.parallel = None
        self.layer_index = 0
        # Issue 5: a trace's routing replayed instead of the router's (Transformer.force_routing); the
        # routing observer (trace_recorder.TraceRecorder); the device slots when experts are buffered
        # (expert_cache.enable_expert_buffering: w13/w2 are then empty and the masters live on the host).
        self.forced_routing: ForcedRouting | None = None
        self.observer = None
        self.expert_cache = None
        # Issue 9: adaptive top-p, pruned experts or SCMoE's weak routing (routing_policy.py, contrast.py).
        self.route_options: RouteOptions | None = None

    def forward(self, x: torch.Tensor, token_index: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, H] -> the routed experts' output, plus the gated shared expert's where there is one.

        token_index [T] (flat indices into B*S): only those tokens are routed, counted and computed; the
        others (a batched prefill's padding) get zeros."""
        if token_index is not None:
            flat = x.reshape(-1, x.shape[-1])
            out = self.forward(flat.index_select(0, token_index)[None])[0]  # [T, H]
            return torch.zeros_like(flat).index_copy_(0, token_index, out).view(x.shape)
        out = self._routed(x)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out

    def _routed(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # [T, H]
        if self.parallel is not None:
            return self.parallel.forward(self.layer_index, self, flat).view(shape)
        if self.forced_routing is not None:
            routing = forced_route(self.forced_routing, flat.shape[0], self.args.num_experts)
        else:
            routing = route(self.router(flat), self.args.top_k, renormalize=self.args.norm_topk_prob,
                            options=self.route_options)
        self.expert_load += routing.expert_counts
        if self.observer is not None:
            self.observer.routed(self.layer_index, routing)
        if self.expert_cache is not None:
            return self.expert_cache.forward(flat, routing).view(shape)
        out, dropped = run_experts(
            flat, self.w13, self.w2, routing.topk_weights, routing.topk_ids,
            gating=self.gating.mode, capacity_fraction=self.gating.capacity_fraction,
            expert_counts=routing.expert_counts,
        )
        if dropped is not None:
            self.dropped_slots += dropped
        return out.view(shape)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, gating: GatingConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.moe = MoEBlock(args, gating)

    def forward(self, x, cos, sin, mask, input_pos, slots, kv_len: int, token_index=None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos, slots, kv_len)
        return x + self.moe(self.ffn_norm(x), token_index)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, gating: GatingConfig | None = None) -> None:
        super().__init__()
        self.args = args
        self.gating = gating or GatingConfig()
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(Block(args, self.gating) for _ in range(args.num_layers))
        for i, layer in enumerate(self.layers):
            layer.moe.layer_index = i
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.output = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        self.max_batch, self.max_cache_len = 0, 0
        # Called with each forward's inputs (and each cache setup) before it runs: the expert-parallel
        # leader broadcasts them so that every rank replays the same steps (parallel.Lockstep).
        self.step_hook = None
        self.setup_hook = None
        self.expert_buffering = None  # expert_cache.ExpertBuffering once experts are buffered (issue 5)
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)

    def tie_weights(self) -> None:
        """Share the embedding with the output head when the config says so (again after to_empty,
        which materialises meta parameters one module at a time and so unties them)."""
        if self.args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight

    @property
    def moe_blocks(self) -> list[MoEBlock]:
        return [layer.moe for layer in self.layers]

    def set_gating(self, gating: GatingConfig) -> None:
        self.gating = gating
        for moe in self.moe_blocks:
            moe.gating = gating

    def setup_cache(self, max_batch: int, max_seq: int | None = None) -> None:
        """Allocate the static KV cache for `max_batch` concurrent sequences of up to `max_seq` tokens."""
        max_seq = min(max_seq or self.args.max_seq_len, self.args.max_seq_len)
        if self.setup_hook is not None:
            self.setup_hook(max_batch, max_seq)
        ref = self.output.weight
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch, max_seq, self.args.num_kv_heads, self.args.head_dim, ref.dtype, ref.device
            )
        self.max_batch, self.max_cache_len = max_batch, max_seq
        self.rope_cos, self.rope_sin = rope_tables(self.args, ref.device)

    def reset_counters(self) -> None:
        """Zero the per-expert load and drop counters (buffers are uninitialised after to_empty)."""
        for moe in self.moe_blocks:
            moe.expert_load.zero_()
            moe.dropped_slots.zero_()

    def expert_load(self) -> torch.Tensor:
        """Cumulative token-slots per (layer, expert) [L, E], still on the device."""
        return torch.stack([moe.expert_load for moe in self.moe_blocks])

    def dropped_slots(self) -> torch.Tensor:
        return torch.stack([moe.dropped_slots for moe in self.moe_blocks]).sum()

    def force_routing(self, trace) -> None:
        """Route by a recorded trace (traces.Trace) instead of the routers, so benchmarks of any width run
        real routing (issue 5): MoE layer l replays trace layer l mod the trace's layers, one trace token
        per routed token, wrapping at its end. None gives the routers back."""
        if trace is not None and any(moe.parallel is not None for moe in self.moe_blocks):
            raise ConfigError("forced routing is not supported under expert parallelism")
        device = self.output.weight.device
        for moe in self.moe_blocks:
            moe.forced_routing = None if trace is None else ForcedRouting.from_trace(
                trace, moe.layer_index, self.args.num_experts, self.args.top_k, device)

    def expert_cache_stats(self, settle: bool = True):
        """expert_cache.ExpertCacheStats of the buffered experts, None when every expert is resident."""
        return None if self.expert_buffering is None else self.expert_buffering.stats(settle)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        slots: torch.Tensor | None = None,
        kv_len: int | None = None,
        last_only: bool = False,
        token_index: torch.Tensor | None = None,
        output_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """tokens [B, S] at positions input_pos [B, S] of cache rows `slots` [B] (None: rows 0..B-1).

        kv_len bounds the cache positions attended (callers know it on the host: max position + 1).
        Returns logits [B, S, V] in the model dtype ([B, 1, V], the last position's, with last_only).
        token_index [T]: flat indices (into B*S) of the real tokens, the only ones the experts see (a
        batched prefill's padding is not load); output_index [R]: flat indices of the tokens whose
        logits are returned, as [R, V]. Neither is broadcast to expert-parallel followers: the leader's
        callers leave them unset there.
        """
        if (token_index is not None or output_index is not None) and self.step_hook is not None:
            raise ConfigError("token_index/output_index are not replayed by expert-parallel followers")
        # Attended length rounded up to a multiple of KV_LEN_ALIGN (the mask hides the extra positions):
        # attention backends that build a plan per shape (cuDNN) would otherwise re-plan every step.
        kv_len = min(self.max_cache_len, -(-(kv_len or self.max_cache_len) // KV_LEN_ALIGN) * KV_LEN_ALIGN)
        if self.step_hook is not None:
            self.step_hook(tokens, input_pos, slots, kv_len)
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [B, S, D]
        key_pos = torch.arange(kv_len, device=tokens.device)
        mask = key_pos[None, None, :] <= input_pos[:, :, None]  # [B, S, kv_len] causal by position
        if self.args.sliding_window:
            mask &= key_pos[None, None, :] > input_pos[:, :, None] - self.args.sliding_window
        mask = mask[:, None]  # [B, 1, S, kv_len]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos, slots, kv_len, token_index)
        if output_index is not None:
            x = x.reshape(-1, x.shape[-1]).index_select(0, output_index)  # [R, H]
        elif last_only:  # prefill samples from the last position only: skip the output head elsewhere
            x = x[:, -1:]
        return self.output(self.norm(x))
