"""Router: logits -> softmax -> top-k -> (topk_weights, topk_ids) plus exact per-expert counts.

Owns the Mixtral routing semantics (as transformers' MixtralTopKRouter), its issue-9 variants
(RouteOptions: adaptive top-p, pruned experts, SCMoE's weak routing) and forced routing (a trace replayed,
issue 5); no expert compute (experts.py), no load export (metrics.py). Pure tensor code that never syncs
with the host, so the counts can feed a CUDA-graph-captured step and are read back only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_runtime.errors import ConfigError

# T tokens, E experts, K top-k, H hidden, F ffn


@dataclass(frozen=True)
class Routing:
    topk_weights: torch.Tensor  # [T, K] float32, renormalised over the K chosen when renormalize=True
    topk_ids: torch.Tensor  # [T, K] int64; E marks a dropped slot (adaptive top-p): weight 0, never run
    expert_counts: torch.Tensor  # [E] int32, exact token-slots per expert (dropped ones excluded), on the device


@dataclass(frozen=True)
class RouteOptions:
    """Issue 9's routing variants for one MoE layer; None leaves each off (plain Mixtral top-k).

    adaptive_top_p: token-adaptive routing in the spirit of AdaMoE: per token keep the fewest of its
        top-k experts whose router probability mass reaches p (at least one; 1.0 keeps all k), the
        weights renormalised over the kept ones. The other slots become dropped slots (id E).
    expert_mask: [E] bool on the router's device, expert pruning (DeepSpeed multitask MoE): experts
        marked False get -inf logits before the softmax, so tokens route among the kept ones only.
    weak_rank: SCMoE's weak routing: each token goes to its rank-r expert alone (1 = its top choice),
        with weight 1, so a Routing of K = 1.
    """

    adaptive_top_p: float | None = None
    expert_mask: torch.Tensor | None = None
    weak_rank: int | None = None

    def __post_init__(self) -> None:
        if self.adaptive_top_p is not None and not 0.0 < self.adaptive_top_p <= 1.0:
            raise ConfigError(f"adaptive_top_p must be in (0, 1], got {self.adaptive_top_p}")
        if self.weak_rank is not None and (isinstance(self.weak_rank, bool) or self.weak_rank < 1):
            raise ConfigError(f"weak_rank must be an int >= 1, got {self.weak_rank!r}")
        if self.expert_mask is not None and (self.expert_mask.dim() != 1 or self.expert_mask.dtype != torch.bool):
            raise ConfigError(f"expert_mask must be [experts] bool, got {self.expert_mask.dtype} "
                              f"{tuple(self.expert_mask.shape)}")


def route(
    router_logits: torch.Tensor, top_k: int, *, renormalize: bool = True, options: RouteOptions | None = None
) -> Routing:
    """router logits [T, E] -> softmax in float32 -> top-k -> renormalised weights (Mixtral semantics, as
    HF MixtralTopKRouter). `options` (issue 9) masks pruned experts before the softmax, then either keeps
    one rank-r expert per token (weak routing) or drops a token's low-mass slots (adaptive top-p)."""
    _check_route_inputs(router_logits, top_k)
    num_experts = router_logits.shape[1]
    options = options or _PLAIN
    # Softmax in float32 whatever the logits' dtype: bf16 probabilities tie too often for a stable top-k.
    logits = router_logits.float()  # [T, E]
    if options.expert_mask is not None:
        logits = logits.masked_fill(~options.expert_mask, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [T, E]
    if options.weak_rank is not None:
        return _weak_route(probs, options.weak_rank)
    topk_weights, topk_ids = torch.topk(probs, top_k, dim=-1)  # [T, K], [T, K] in descending order
    if options.adaptive_top_p is not None and options.adaptive_top_p < 1.0:
        topk_weights, topk_ids = _adaptive_drop(topk_weights, topk_ids, options.adaptive_top_p, num_experts)
    if renormalize:
        topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
    return Routing(topk_weights, topk_ids, _count_slots(topk_ids, num_experts))


_PLAIN = RouteOptions()


def _check_route_inputs(router_logits: torch.Tensor, top_k: int) -> None:
    if router_logits.dim() != 2:
        raise ValueError(f"router_logits must be [tokens, experts], got shape {tuple(router_logits.shape)}")
    num_experts = router_logits.shape[1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")


def _adaptive_drop(topk_weights, topk_ids, top_p: float, num_experts: int):
    """Keep slot k while the probability mass of the slots ranked above it is below top_p (slot 0 always):
    the smallest prefix of the top-k that reaches top_p. Dropped slots get weight 0 and id E."""
    mass_before = torch.cumsum(topk_weights, dim=-1)[:, :-1]  # [T, K-1] mass of slots 0..k-1
    mass_before = torch.cat([torch.zeros_like(topk_weights[:, :1]), mass_before], dim=-1)  # [T, K]
    keep = mass_before < top_p  # [T, K], a prefix of each row since topk sorts descending
    return topk_weights * keep, torch.where(keep, topk_ids, num_experts)


def _weak_route(probs: torch.Tensor, rank: int) -> Routing:
    """SCMoE's weak routing: the rank-r expert of each token alone, weight 1. probs [T, E] -> K = 1."""
    num_experts = probs.shape[1]
    if rank > num_experts:
        raise ValueError(f"weak_rank {rank} exceeds num_experts={num_experts}")
    topk_ids = torch.topk(probs, rank, dim=-1).indices[:, rank - 1 :]  # [T, 1]
    return Routing(torch.ones(topk_ids.shape, device=probs.device), topk_ids, _count_slots(topk_ids, num_experts))


def _count_slots(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, K] -> [E] int32 token-slots per expert; dropped slots (id E) land in a spare bin cut off here.

    A scatter-add of ones, not torch.bincount: bincount reads its max on the host (a sync on CUDA, an
    error under graph capture); the scatter has a static shape and stays on the device."""
    flat_ids = topk_ids.reshape(-1)  # [T*K]
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=flat_ids.device)  # [E + 1]
    counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
    return counts[:num_experts]


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
