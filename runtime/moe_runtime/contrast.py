"""Self-contrast decoding in the spirit of SCMoE (Shi et al. 2024, "Unchosen Experts Can Contribute Too").

The same model under a weak routing (each token's rank-2 expert alone) is the amateur; the normal top-k
routing's next-token log-probabilities are pushed away from the weak ones. Owns the weak model (its own KV
cache, swapped in for each weak forward, so the strong cache is never touched) and the contrast formula.
"""

from __future__ import annotations

import math
import weakref
from contextlib import contextmanager

import torch

from moe_runtime.gating import RouteOptions
from moe_runtime.model import KVCache, Transformer

# B batch, S new tokens per sequence, V vocab

WEAK_RANK = 2  # SCMoE's weak routing for Mixtral-style top-2: the rank-2 expert alone
PLAUSIBILITY = 0.1  # beta: tokens whose strong probability is below beta * the top one's are excluded


def contrast_logits(strong: torch.Tensor, weak: torch.Tensor, alpha, plausibility: float = PLAUSIBILITY):
    """strong, weak [B, V] logits; alpha a float or [B] -> [B, V] float32 scores:
    (1 + alpha) * log p_strong - alpha * log p_weak, and -inf where p_strong < plausibility * max p_strong
    (the adaptive plausibility constraint of contrastive decoding, Li et al. 2023, which SCMoE keeps)."""
    strong_lp = torch.log_softmax(strong.float(), dim=-1)  # [B, V]
    weak_lp = torch.log_softmax(weak.float(), dim=-1)  # [B, V]
    alpha = torch.as_tensor(alpha, dtype=torch.float32, device=strong.device).reshape(-1, 1)  # [B or 1, 1]
    scores = strong_lp + alpha * (strong_lp - weak_lp)  # [B, V]
    floor = strong_lp.max(dim=-1, keepdim=True).values + math.log(plausibility)  # [B, 1]
    return scores.masked_fill(strong_lp < floor, float("-inf"))


def unsupported_reason(model: Transformer) -> str | None:
    """Why the weak pass cannot run on this model, or None. Expert parallelism and its lockstep route
    on their own schedule, and a forced routing would replay the trace instead of the weak routing."""
    if model.step_hook is not None or any(moe.parallel is not None for moe in model.moe_blocks):
        return "contrast decoding is not supported under expert parallelism"
    if any(moe.forced_routing is not None for moe in model.moe_blocks):
        return "contrast decoding is not supported with a forced routing trace"
    return None


class WeakModel:
    """The strong model's modules run with RouteOptions(weak_rank) in every MoE block and a KV cache of
    their own (same rows and positions as the strong cache). Costs a second forward per step and a second
    KV cache. The weak pass's expert work counts in the load counters (it is real work); the routing
    observer does not see it (a trace stays the strong routing's)."""

    def __init__(self, model: Transformer, weak_rank: int = WEAK_RANK) -> None:
        # No reference to the model: it keys the registry below, which must not keep it alive.
        self.weak_rank = weak_rank
        self.caches = [_cache_like(layer.attention.kv_cache) for layer in model.layers]

    def fits(self, model: Transformer) -> bool:
        """Whether the weak caches still mirror the model's (setup_cache may have replaced them)."""
        strong = [layer.attention.kv_cache.k for layer in model.layers]
        return len(strong) == len(self.caches) and all(
            mine.k.shape == k.shape and mine.k.device == k.device for mine, k in zip(self.caches, strong))

    def forward(self, model: Transformer, tokens, input_pos, slots, kv_len: int, last_only: bool = False):
        """Transformer.forward's contract (logits [B, S, V]), under the weak routing, on the weak caches."""
        with self._swapped(model):
            return model(tokens, input_pos, slots, kv_len=kv_len, last_only=last_only)

    @contextmanager
    def _swapped(self, model: Transformer):
        layers = model.layers
        saved = [(layer.attention.kv_cache, layer.moe.route_options, layer.moe.observer) for layer in layers]
        try:
            for layer, cache, (_, options, _) in zip(layers, self.caches, saved, strict=True):
                mask = None if options is None else options.expert_mask  # pruning still applies
                layer.attention.kv_cache = cache
                layer.moe.route_options = RouteOptions(expert_mask=mask, weak_rank=self.weak_rank)
                layer.moe.observer = None
            yield
        finally:
            for layer, (cache, options, observer) in zip(layers, saved, strict=True):
                layer.attention.kv_cache, layer.moe.route_options, layer.moe.observer = cache, options, observer


_WEAK: weakref.WeakKeyDictionary[Transformer, WeakModel] = weakref.WeakKeyDictionary()


def weak_model(model: Transformer) -> WeakModel:
    """The model's weak twin, allocated on first use and again whenever the model's KV cache changed shape."""
    if any(layer.attention.kv_cache is None for layer in model.layers):
        raise RuntimeError("KV cache not set up: call Transformer.setup_cache() first")
    weak = _WEAK.get(model)
    if weak is None or not weak.fits(model):
        weak = _WEAK[model] = WeakModel(model)
    return weak


def _cache_like(cache: KVCache) -> KVCache:
    batch, length, heads, dim = cache.k.shape
    return KVCache(batch, length, heads, dim, cache.k.dtype, cache.k.device)
