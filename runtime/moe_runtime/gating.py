"""Router: logits -> softmax -> top-k -> (topk_weights, topk_ids) plus exact per-expert counts.

Owns the Mixtral routing semantics (as transformers' MixtralTopKRouter) and forced routing (a recorded
trace's choices replayed instead of the router's, issue 5), nothing else: no expert compute (experts.py),
no load export (metrics.py). Pure tensor code; it never syncs with the host, so the counts can feed a
CUDA-graph-captured step and are read back only when someone asks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.errors import ConfigError

# T tokens, E experts, K top-k, H hidden, F ffn


@dataclass(frozen=True)
class Routing:
    topk_weights: torch.Tensor  # [T, K] float32, renormalised over the K chosen when renormalize=True
    topk_ids: torch.Tensor  # [T, K] int64
    expert_counts: torch.Tensor  # [E] int32, exact token-slots per expert, stays on the device


def route(router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True) -> Routing:
    """router logits [T, E] -> softmax in float32 -> top-k -> renormalised weights (Mixtral semantics, as HF MixtralTopKRouter)."""
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    # Softmax in float32 whatever the logits' dtype: bf16 probabilities tie too often for a stable top-k.
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, K], [T, K]
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    # Exact counts by a scatter-add of ones, not torch.bincount: bincount reads its max on the host (a
    # sync on CUDA, an error under graph capture); the scatter has a static shape and stays on the device.
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    expert_counts = torch.zeros(num_experts, dtype=torch.int32, device=flat_ids.device)  # [E]
    expert_counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    return Routing(topk_weights, topk_ids, expert_counts)


@dataclass(frozen=True)
class ForcedRouting:
    """One layer's routing taken from a trace: token-slot choices replayed in trace order, wrapping at the end.

    The cursor lives on the device and advances by the step's token count inside the step, so replaying
    needs no host sync and a captured CUDA graph advances it too.
    """

    topk_ids: torch.Tensor  # [N, K] int64, trace tokens in decode order
    topk_weights: torch.Tensor  # [N, K] float32
    cursor: torch.Tensor  # [] int64: the trace token the next routed token takes

    @classmethod
    def from_trace(cls, trace, layer: int, num_experts: int, top_k: int, device) -> ForcedRouting:
        """Trace layer `layer mod trace layers` (a model of any depth replays any trace); the trace's
        weights, or 1/k each when it has none. Its ids must fit the model's experts and top_k."""
        if trace.num_tokens == 0 or trace.top_k != top_k or trace.experts > num_experts:
            raise ConfigError(f"cannot force a routing trace of {trace.num_tokens} tokens, top_k={trace.top_k}, "
                              f"{trace.experts} experts onto a model with top_k={top_k}, {num_experts} experts")
        source = layer % trace.num_layers
        ids = torch.as_tensor(trace.topk_ids[:, source], device=device).long()  # [N, K]
        if trace.topk_weights is None:
            weights = torch.full(ids.shape, 1.0 / top_k, device=device)
        else:
            weights = torch.as_tensor(trace.topk_weights[:, source], device=device).float()
        return cls(ids, weights, torch.zeros((), dtype=torch.int64, device=device))


def forced_route(forced: ForcedRouting, num_tokens: int, num_experts: int) -> Routing:
    """The next `num_tokens` tokens of a forced trace as a Routing (the router is not consulted)."""
    steps = torch.arange(num_tokens, device=forced.cursor.device)  # [T]
    rows = (forced.cursor + steps) % forced.topk_ids.shape[0]  # [T] trace tokens, wrapping
    forced.cursor.add_(num_tokens)
    topk_ids = forced.topk_ids[rows]  # [T, K]
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    expert_counts = torch.zeros(num_experts, dtype=torch.int32, device=flat_ids.device)  # [E]
    expert_counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    return Routing(forced.topk_weights[rows], topk_ids, expert_counts)
