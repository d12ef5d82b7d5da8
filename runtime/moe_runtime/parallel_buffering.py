"""Expert buffering under expert parallelism (issues 5 and 6): each rank buffers its own physical slots.

Owns, on one rank: the masters of the slots it holds (views of the full host store, every expert packed
as expert_cache builds it, pinned on CUDA), one expert_cache.ExpertCache per MoE layer over those slots
(a fixed pool of device buffers; the same policies, copy stream and counters as one process), prefetch
mapped to local slots, and re-pointing the masters when a placement changes. Dispatch, combine and
replica choice stay parallel.py's; eviction stays cache_policy's.
"""

from __future__ import annotations

import torch

from moe_runtime.config import ExpertBufferingConfig
from moe_runtime.errors import ConfigError
from moe_runtime.expert_cache import (
    ExpertBuffering,
    ExpertCache,
    check_bufferable,
    host_masters,
    predict_experts,
    resolve_slots,
)
from moe_runtime.gating import Routing
from moe_runtime.placement import Placement

# T tokens, K top-k, E experts, H hidden, L layers, S slots per rank, N token-slots received by this rank


class RankBuffering(ExpertBuffering):
    """One rank's buffered slots. The "experts" of each layer's ExpertCache are this rank's local slots
    0..S-1, so hits and misses count distinct local slots per step, on this rank only. Built by
    enable_rank_buffering; reachable as `model.expert_buffering` (stats() as for one process)."""

    def __init__(self, model, store: list[list[torch.Tensor]], device: torch.device, placement: Placement,
                 rank: int) -> None:
        super().__init__(model, [[] for _ in store], device)  # masters [L][S]: views of store rows
        self.store, self.rank = store, rank  # store [L][E] host rows, read-only
        self.held: list[tuple[int, ...]] = [() for _ in store]  # layer -> expert of each local slot
        self.slots_of: list[dict[int, list[int]]] = [{} for _ in store]  # layer -> expert -> local slots
        self._predicted: list[torch.Tensor | None] = [None for _ in store]  # layer -> [T, K] ids
        self.place(placement)

    def place(self, placement: Placement) -> None:
        """Point each local slot's master at the expert `placement` gives it, at a step boundary. Every
        slot whose expert changed is forgotten by its pool (its device copy is stale) and loads on its
        next miss or prefetch; nothing is copied here, and unchanged slots stay resident."""
        s = placement.slots_per_rank
        for layer, held in enumerate(placement.slots):
            local, old = held[self.rank * s : (self.rank + 1) * s], self.held[layer]
            self.masters[layer][:] = [self.store[layer][e] for e in local]  # in place: the cache shares it
            if self.caches:
                for slot in range(max(len(old), len(local))):
                    if slot >= min(len(old), len(local)) or old[slot] != local[slot]:
                        self.caches[layer].policy.forget(slot)
            self.held[layer] = local
            self.slots_of[layer] = {}
            for slot, expert in enumerate(local):
                self.slots_of[layer].setdefault(expert, []).append(slot)

    def run(self, layer: int, xr: torch.Tensor, local_ids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Received token-slots xr [N, H] for local slots local_ids [N] (counts [S] rows per slot) -> their
        expert outputs [N, H], unweighted, in the order received (what run_experts gives parallel.py)."""
        ones = torch.ones((xr.shape[0], 1), dtype=torch.float32, device=xr.device)  # [N, 1]
        return self.caches[layer].forward(xr, Routing(ones, local_ids[:, None], counts))

    def score(self, layer: int, topk_ids: torch.Tensor, start: int, end: int) -> None:
        """Prefetch recall on this rank's token shard [start, end) routed to topk_ids [Tr, K] (logical ids)."""
        predicted, self._predicted[layer] = self._predicted[layer], None
        if predicted is not None:
            self.caches[layer].score(predicted[start:end], topk_ids)

    def _check_slots(self, slots_per_layer: int) -> None:
        k, held = self.model.args.top_k, len(self.masters[0])
        if not min(k, held) <= slots_per_layer <= held:
            raise ConfigError(f"expert_buffering: slots_per_layer={slots_per_layer} must be between "
                              f"top_k={k} and the {held} slots per layer that rank {self.rank} holds")

    def _hook_for(self, layer: int, cache: ExpertCache, block):
        """Predict block `layer`'s experts for every token (attention is replicated, so every rank sees
        them all) and prefetch the local slots holding them: all of an expert's replicas on this rank,
        since parallel.py picks one per token-slot only at dispatch."""
        top_k = self.model.args.top_k

        def hook(module, args) -> None:
            predicted = predict_experts(cache, block, args[0], top_k)  # [T, K]
            slots_of = self.slots_of[layer]
            # Host sync, as for one process; best first: every token's first choice, then its second, ...
            cache.prefetch([s for e in predicted.t().reshape(-1).tolist() for s in slots_of.get(e, ())])
            self._predicted[layer] = predicted

        return hook


def enable_rank_buffering(model, config: ExpertBufferingConfig | None, placement: Placement, rank: int,
                          device: torch.device) -> RankBuffering | None:
    """Move every expert of `model` to the host store and serve `rank`'s slots of `placement` from device
    buffers: `config.slots_per_layer`, or its `gpu_memory_bytes` split over the layers, clamped to the
    rank's slots per layer. None when buffering is off. Fewer slots than top_k is a ConfigError."""
    if config is None or not config.enabled:
        return None
    check_bufferable(model)
    dtype = model.layers[0].moe.w13.dtype
    slots = resolve_slots(config, model.args, dtype, holds=placement.slots_per_rank)
    buffering = RankBuffering(model, host_masters(model, device), device, placement, rank)
    buffering.configure(slots, config.policy, config.prefetch)
    model.expert_buffering = buffering
    return buffering
