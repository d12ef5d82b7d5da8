"""Expert slicing (DeepSpeed-MoE, issue 9) for more ranks than experts: each expert's FFN is split along F
across the W ranks (tensor parallelism inside an expert) and the partial outputs are summed by an all-reduce.

Installed through each MoEBlock's `parallel` hook: attention and routing stay replicated, so every rank
must run the same steps (SPMD, or parallel.Lockstep's broadcast). No placement and no all-to-all: that is
parallel.py's expert parallelism, which this module neither imports nor changes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_runtime.errors import ConfigError
from moe_runtime.experts import run_experts
from moe_runtime.gating import route

# T tokens, E experts, K top-k, H hidden, F ffn, Fr = this rank's share of F, W ranks


def ffn_slice(ffn: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of `rank`'s share of the F columns: even shares, the first F % W ranks one wider."""
    if not 0 <= rank < world_size or world_size > ffn:
        raise ConfigError(f"cannot slice an FFN of width {ffn} for rank {rank} of {world_size}")
    base, extra = divmod(ffn, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def slice_experts(w13: torch.Tensor, w2: torch.Tensor, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [E, 2F, H] = cat(w1, w3), w2 [E, H, F] -> this rank's w13 [E, 2Fr, H], w2 [E, H, Fr] (copies).

    SwiGLU is elementwise along F and w2 contracts F, so the full output is the sum over ranks of
    w2[:, :, s] @ (silu(w1[s] x) * w3[s] x): exact up to the order of the float additions."""
    ffn = w2.shape[2]
    w13_local = torch.cat([w13[:, start:end], w13[:, ffn + start : ffn + end]], dim=1).contiguous()
    return w13_local, w2[:, :, start:end].contiguous()


class ExpertSlicing:
    """Every MoE layer of `model` sliced for this rank; the full expert weights are released."""

    def __init__(self, model, rank: int, world_size: int, group=None) -> None:
        self.rank, self.world_size, self.group = rank, world_size, group
        self.start, self.end = ffn_slice(model.args.intermediate_size, rank, world_size)
        for moe in model.moe_blocks:
            if moe.parallel is not None or moe.expert_cache is not None or moe.forced_routing is not None:
                raise ConfigError("expert slicing excludes expert parallelism, expert buffering and forced routing")
            w13, w2 = slice_experts(moe.w13.data, moe.w2.data, self.start, self.end)
            moe.w13 = nn.Parameter(w13, requires_grad=False)  # drops the last reference to the full weights
            moe.w2 = nn.Parameter(w2, requires_grad=False)
            moe.parallel = self

    def forward(self, layer: int, moe, x: torch.Tensor) -> torch.Tensor:
        """x [T, H], identical on every rank -> MoE output [T, H], identical on every rank."""
        routing = route(moe.router(x), moe.args.top_k, renormalize=moe.args.norm_topk_prob,
                        options=moe.route_options)
        moe.expert_load += routing.expert_counts
        partial, dropped = run_experts(
            x, moe.w13, moe.w2, routing.topk_weights, routing.topk_ids,
            gating=moe.gating.mode, capacity_fraction=moe.gating.capacity_fraction,
            expert_counts=routing.expert_counts,
        )  # [T, H], this rank's F columns only
        if dropped is not None:
            moe.dropped_slots += dropped
        dist.all_reduce(partial, op=dist.ReduceOp.SUM, group=self.group)
        return partial
