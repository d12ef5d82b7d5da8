"""Static (capacity-factor) gating under expert parallelism: fairseq's MoE layer over W ranks, the paper's
multi-GPU baseline (issue 10), as the static branch of parallel.ExpertParallel.forward.

Owns a rank's plan of its shard ([E, C, H] one-hot dispatch, as experts.experts_static), the two all_to_alls
with equal splits (no host sync, no variable splits: that is the baseline's point), its slots' FFN on
[S, W*C, H] and the combine. It neither shards tokens nor gathers them (parallel.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_runtime.errors import ConfigError
from moe_runtime.experts import _silu_mul, _static_plan, static_capacity
from moe_runtime.gating import route

# Tr tokens in this rank's shard, T_pad = ceil(T / W) the padded shard size, E experts, H hidden,
# C capacity per expert per rank, W ranks, S slots per rank, P = W*S physical slots.
#
# Semantics (fairseq moe_layer.py + top2gate.py): every worker pads its tokens to one length (the padding is
# masked out of the gate) and takes C = ceil(f * T_pad) per expert from it, so C is the same on every rank and
# a rank's drops depend only on its own shard. At W=1 this is experts.experts_static exactly; with W>1 it is
# experts_static applied to each shard with capacity_tokens=T_pad, not to the whole batch.
#
# Replicas: fairseq has none. An expert with several physical slots sends all its token-slots to its first
# (lowest) slot; the others receive zero rows. So a placement with replicas is accepted (the operator's
# planners and round_robin with redundant slots make them) and gives the same math, its replicas idle.


def primary_slots(held: tuple[int, ...], num_experts: int, device) -> torch.Tensor:
    """[E] the first physical slot holding each expert (held: the logical expert of each of the P slots)."""
    first: dict[int, int] = {}
    for slot, expert in enumerate(held):
        first.setdefault(expert, slot)
    return torch.tensor([first[e] for e in range(num_experts)], dtype=torch.long, device=device)


def forward_static(ep, layer: int, moe, shard: torch.Tensor, padded: int) -> torch.Tensor:
    """shard [Tr, H] (Tr <= padded) -> this rank's MoE output [padded, H], rows past Tr zero.

    Counts as the single-process static path does: moe.expert_load the routed token-slots, moe.dropped_slots
    the capacity drops of this shard; ep.static_load the routed token-slots per primary slot (demand, what
    the planners balance)."""
    if ep.buffering is not None:
        raise ConfigError("static gating under expert parallelism does not support expert buffering")
    w, s, h = ep.world_size, ep.placement.slots_per_rank, shard.shape[1]
    routing = route(moe.router(shard), moe.args.top_k, renormalize=moe.args.norm_topk_prob)
    moe.expert_load += routing.expert_counts
    primary = ep.primary[layer]  # [E]
    ep.static_load[layer].index_add_(0, primary, routing.expert_counts.to(torch.int64))
    capacity = static_capacity(moe.gating.capacity_fraction, padded)  # C, the same on every rank
    combine, dispatch, dropped = _static_plan(routing.topk_weights, routing.topk_ids, moe.args.num_experts,
                                              capacity)  # [Tr, E, C]
    moe.dropped_slots += dropped
    dispatched = torch.einsum("tec,th->ech", dispatch.to(shard.dtype), shard)  # [E, C, H]
    send = shard.new_zeros((w * s, capacity, h)).index_copy_(0, primary, dispatched)  # [P, C, H]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send)  # equal splits: chunk j of dim 0 = rank j's S slots -> [W src, S, C, H]
    xr = recv.view(w, s, capacity, h).transpose(0, 1).reshape(s, w * capacity, h)  # [S, W*C, H]
    w13, w2 = moe.w13.to(shard.dtype), moe.w2.to(shard.dtype)
    y = torch.bmm(_silu_mul(torch.bmm(xr, w13.transpose(1, 2))), w2.transpose(1, 2))  # [S, W*C, H]
    ys = y.view(s, w, capacity, h).transpose(0, 1).contiguous()  # [W dst, S, C, H]
    back = torch.empty_like(ys)
    dist.all_to_all_single(back, ys)  # [W owners, S, C, H] = [P, C, H] in rank-major slot order
    y_e = back.view(w * s, capacity, h)[primary]  # [E, C, H]
    out = shard.new_zeros((padded, h))
    out[: shard.shape[0]] = torch.einsum("tec,ech->th", combine.to(shard.dtype), y_e)  # [Tr, H]
    return out
