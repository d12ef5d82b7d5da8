"""Issue 9's per-model routing policy: token-adaptive top-p (AdaMoE spirit) and expert pruning for a
workload (DeepSpeed multitask MoE), installed as every MoE block's gating.RouteOptions.

Owns choosing the kept experts from a routing trace and the memory that pruning makes free; the routing
math is gating.route's. It refuses expert parallelism (parallel.py routes by itself) and never loads weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from moe_runtime.config import RoutingConfig
from moe_runtime.errors import ConfigError
from moe_runtime.gating import RouteOptions
from moe_runtime.traces import Trace, load_trace

# N tokens, L layers, E experts, K top-k


@dataclass(frozen=True)
class PruningReport:
    """What pruning kept and the bytes of expert weights it leaves unused (in the weights' dtype).

    The weights stay allocated (the [E, ...] layout is shared by every path); with expert buffering
    (issue 5) pruned experts are never copied to the device, so `--expert-buffering-slots N` holds only them.
    """

    kept: np.ndarray  # [L, E] bool
    pruned_bytes: int
    expert_bytes: int  # every expert of every layer

    def to_dict(self) -> dict:
        return {"kept": [np.flatnonzero(row).tolist() for row in self.kept],
                "pruned_bytes": self.pruned_bytes, "expert_bytes": self.expert_bytes}


def kept_experts(trace: Trace, keep: int, num_layers: int, num_experts: int) -> np.ndarray:
    """[L, E] bool: per layer the `keep` experts with the most token-slots in `trace` (ties: lower id)."""
    if trace.num_layers != num_layers or trace.experts > num_experts:
        raise ConfigError(f"pruning trace has {trace.num_layers} layers and {trace.experts} experts; "
                          f"the model has {num_layers} layers and {num_experts} experts")
    if not 1 <= keep <= num_experts:
        raise ConfigError(f"routing.prune_keep must be in 1..{num_experts}, got {keep}")
    counts = np.stack([np.bincount(trace.topk_ids[:, layer].ravel(), minlength=num_experts)
                       for layer in range(num_layers)])  # [L, E]
    best = np.argsort(-counts, axis=1, kind="stable")[:, :keep]  # [L, keep]
    kept = np.zeros((num_layers, num_experts), dtype=bool)
    np.put_along_axis(kept, best, True, axis=1)
    return kept


def apply_routing_policy(model, config: RoutingConfig, trace: Trace | None = None) -> PruningReport | None:
    """Set every MoE block's route_options from `config` (None options when everything is off).

    trace: the pruning trace already loaded (else config.prune_trace is read). Returns the pruning
    report, or None without pruning."""
    blocks = model.moe_blocks
    if not config.enabled:
        for moe in blocks:
            moe.route_options = None
        return None
    if any(moe.parallel is not None for moe in blocks):
        raise ConfigError("routing.adaptive_top_p and routing.prune_keep are not supported under expert parallelism")
    args, report = model.args, None
    if config.prune_keep is not None:
        if config.prune_keep < args.top_k:
            raise ConfigError(f"routing.prune_keep={config.prune_keep} is below top_k={args.top_k}")
        kept = kept_experts(trace or _load(config.prune_trace), config.prune_keep, args.num_layers, args.num_experts)
        one = args.expert_bytes(blocks[0].w13.dtype)
        report = PruningReport(kept, int((~kept).sum()) * one, kept.size * one)
    for moe in blocks:
        device = moe.router.weight.device
        mask = None if report is None else torch.as_tensor(report.kept[moe.layer_index], device=device)
        moe.route_options = RouteOptions(adaptive_top_p=config.adaptive_top_p, expert_mask=mask)
    return report


def _load(path: str | None) -> Trace:
    try:
        return load_trace(path)
    except ValueError as exc:
        raise ConfigError(f"routing.prune_trace: {exc}") from exc
