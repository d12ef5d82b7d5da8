"""Expert parallelism over W ranks (torch.distributed: NCCL on GPUs, gloo on CPU).

Design (issue 6): attention is replicated (every rank runs the same tokens, broadcast by the leader at
each step, so all ranks step in lockstep on its schedule); each MoE layer shards the tokens across ranks,
routes its shard, sends token-slots to the ranks holding their experts' physical slots with a two-step
all_to_all over variable splits (the paper's dynamic gating under EP), runs the local slots, sends results
back, combines, and all-gathers the shards. A placement maps physical slots to logical experts; a hot
expert's replicas split its tokens by the placement's shares (evenly without them; choose_replicas).
Weights of every expert stay in a host store (pinned on CUDA) from which live re-placement fills spare
buffers, switched at a step boundary. With expert buffering each rank serves its slots from a smaller pool
of device buffers instead (parallel_buffering.py, issue 5). Static gating takes fairseq's path instead:
equal-split all_to_alls of capacity-padded [E, C, H] blocks (parallel_static.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_runtime.config import ExpertBufferingConfig
from moe_runtime.errors import ConfigError
from moe_runtime.experts import run_experts
from moe_runtime.gating import route
from moe_runtime.parallel_buffering import enable_rank_buffering
from moe_runtime.parallel_static import forward_static, primary_slots
from moe_runtime.placement import Placement

# T tokens, K top-k, E experts, H hidden, F ffn, W ranks, S slots per rank, P = W*S physical slots,
# L layers, N token-slots received by this rank, R replicas of an expert (at most)

GOLDEN = (5**0.5 - 1) / 2  # frac(n * GOLDEN), n = 0, 1, ...: the most evenly spread sequence in [0, 1)
SEEN_WRAP = 2**32  # per-expert counters wrap here, so n * GOLDEN keeps 20 fractional bits in float64


@dataclass(frozen=True)
class ParallelConfig:
    """Where this process sits in its expert-parallel group (the operator's env contract)."""

    rank: int
    world_size: int
    init_method: str  # tcp://leader:port, or file:///path for tests
    backend: str = "gloo"

    @classmethod
    def from_env(cls, env: Mapping[str, str], backend: str = "gloo") -> ParallelConfig | None:
        """MOE_LEADER_ADDRESS (host:port of rank 0's rendezvous), MOE_GROUP_SIZE, MOE_WORKER_INDEX (or the
        ordinal suffix of POD_NAME, as in a StatefulSet). None when the group size is unset or 1."""
        size = int(env.get("MOE_GROUP_SIZE", "1") or 1)
        if size <= 1:
            return None
        index = env.get("MOE_WORKER_INDEX")
        if index is None:
            match = re.search(r"-(\d+)$", env.get("POD_NAME", ""))
            if match is None:
                raise ValueError("MOE_WORKER_INDEX unset and POD_NAME has no ordinal suffix")
            index = match.group(1)
        leader = env.get("MOE_LEADER_ADDRESS")
        if not leader:
            raise ValueError("MOE_GROUP_SIZE > 1 needs MOE_LEADER_ADDRESS (host:port)")
        init = leader if "://" in leader else f"tcp://{leader}"
        rank = int(index)
        if not 0 <= rank < size:
            raise ValueError(f"worker index {rank} outside group of {size}")
        return cls(rank, size, init, backend)

    @property
    def is_leader(self) -> bool:
        return self.rank == 0


def init_group(cfg: ParallelConfig, timeout_s: float = 3600.0) -> None:
    """Join the group; blocks until every rank has arrived. A lost peer later fails collectives."""
    dist.init_process_group(cfg.backend, init_method=cfg.init_method, rank=cfg.rank,
                            world_size=cfg.world_size, timeout=timedelta(seconds=timeout_s))


def replica_tables(held: tuple[int, ...], shares, num_experts: int, device) -> tuple[torch.Tensor, ...]:
    """[E, R] physical slots of each expert's replicas (padded by repetition) and [E, R] the upper ends of
    their intervals in [0, 1): cumulative shares, the last replica's (and the padding's) beyond 1."""
    replicas: list[list[int]] = [[] for _ in range(num_experts)]
    for slot, expert in enumerate(held):
        replicas[expert].append(slot)
    width = max(len(r) for r in replicas)
    table = [[r[i % len(r)] for i in range(width)] for r in replicas]
    upper = [[sum(float(shares[s]) for s in r[: i + 1]) if i < len(r) - 1 else 2.0 for i in range(width)]
             for r in replicas]
    return (torch.tensor(table, dtype=torch.long, device=device),
            torch.tensor(upper, dtype=torch.float64, device=device))


def choose_replicas(topk_ids: torch.Tensor, expert_counts: torch.Tensor, seen: torch.Tensor,
                    slots: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The physical slot of each token-slot: the n-th token-slot this rank ever routes to expert e goes to
    the replica whose share interval holds frac(n * GOLDEN), so every replica gets its share of e's
    token-slots to within a few, batch after batch (a Weyl sequence: its count in any interval stays within
    O(log n) of share * n; under 3 for the first 200 000). Only the load moves: replicas hold the same weights. On the device, no host sync.

    topk_ids [Tr, K], expert_counts [E] this shard's token-slots per expert, seen [E] this rank's counters
    (advanced in place), slots / upper [E, R] from replica_tables -> [Tr, K] physical slots.
    """
    ids = topk_ids.reshape(-1)  # [N]
    counts = expert_counts.to(torch.int64)
    order = torch.argsort(ids, stable=True)
    first = torch.cumsum(counts, 0) - counts  # [E] where each expert's token-slots start in `order`
    occurrence = torch.empty_like(ids)
    occurrence[order] = torch.arange(ids.numel(), device=ids.device) - first[ids[order]]
    n = seen[ids] + occurrence  # [N]
    seen.add_(counts).remainder_(SEEN_WRAP)
    point = torch.frac(n.to(torch.float64) * GOLDEN)  # [N] in [0, 1)
    replica = (point[:, None] >= upper[ids]).sum(dim=1)  # [N] intervals wholly below the point
    return slots[ids, replica].view_as(topk_ids)


def _host_store(model, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every expert's weights per layer (w13 [E, 2F, H], w2 [E, H, F]), read-only masters (pinned so
    copies can be async on CUDA)."""
    store = []
    for moe in model.moe_blocks:
        w13, w2 = moe.w13.detach(), moe.w2.detach()
        if device.type == "cuda":
            w13, w2 = w13.cpu().pin_memory(), w2.cpu().pin_memory()
        store.append((w13, w2))
    return store


class ExpertParallel:
    """This rank's expert slots for every MoE layer, the dispatch/combine and live re-placement."""

    def __init__(self, model, placement: Placement, rank: int, world_size: int,
                 buffering: ExpertBufferingConfig | None = None):
        args = model.args
        placement.validate(args.num_experts, args.num_layers)
        if placement.num_ranks != world_size:
            raise ValueError(f"placement has {placement.num_ranks} ranks, the group has {world_size}")
        self.model, self.rank, self.world_size = model, rank, world_size
        device = model.output.weight.device
        self.device = device
        self.copied_bytes = 0
        # Expert buffering (issue 5): this rank's slots live in host masters and load into a fixed pool
        # of device buffers on demand; it then owns the host store (packed rows) and `store` stays None.
        if buffering is not None and buffering.enabled and model.gating.mode == "static":
            raise ConfigError("static gating under expert parallelism does not support expert buffering")
        self.buffering = enable_rank_buffering(model, buffering, placement, rank, device)
        self.store = None if self.buffering is not None else _host_store(model, device)
        self.placement = placement
        self._install(placement, count=False)  # only the slot buffers stay on the device under EP
        for moe in model.moe_blocks:
            moe.parallel = self
        self._zero_load(placement)
        self.replica_seen = torch.zeros(args.num_layers, args.num_experts, dtype=torch.int64, device=device)

    def _install(self, placement: Placement, count: bool = True) -> None:
        """Switch to `placement` at a step boundary. Buffered: the rank's masters are re-pointed and its
        pools forget changed slots, which load on their next miss (nothing is copied here)."""
        copied = 0
        if self.buffering is not None:
            self.buffering.place(placement)
        else:
            copied = self._fill_slots(placement, count)
        self.tables = [replica_tables(held, shares, self.model.args.num_experts, self.device)
                       for held, shares in zip(placement.slots, placement.slot_shares())]
        self.primary = [primary_slots(held, self.model.args.num_experts, self.device) for held in placement.slots]
        self.placement = placement
        self.copied_bytes += copied
        self.last_copied = copied

    def _fill_slots(self, placement: Placement, count: bool) -> int:
        """Fill fresh slot buffers for `placement` from the host store and switch the MoE blocks to them;
        returns the bytes of experts new to this rank. No forward sees a half-copied buffer."""
        s = placement.slots_per_rank
        mine = slice(self.rank * s, (self.rank + 1) * s)
        new13, new2, copied = [], [], 0
        for layer, held in enumerate(placement.slots):
            w13, w2 = self.store[layer]
            local = held[mine]
            old = (self.placement.slots[layer][self.rank * self.placement.slots_per_rank:
                                               (self.rank + 1) * self.placement.slots_per_rank]
                   if count else ())
            b13 = torch.empty((s, *w13.shape[1:]), dtype=w13.dtype, device=self.device)
            b2 = torch.empty((s, *w2.shape[1:]), dtype=w2.dtype, device=self.device)
            for slot, expert in enumerate(local):
                b13[slot].copy_(w13[expert], non_blocking=True)
                b2[slot].copy_(w2[expert], non_blocking=True)
                if count and expert not in old:  # a new expert for this rank: its bytes moved here
                    copied += w13[expert].numel() * w13.element_size() + w2[expert].numel() * w2.element_size()
            new13.append(b13)
            new2.append(b2)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.slot_w13, self.slot_w2 = new13, new2
        for i, moe in enumerate(self.model.moe_blocks):
            moe.w13 = torch.nn.Parameter(new13[i], requires_grad=False)
            moe.w2 = torch.nn.Parameter(new2[i], requires_grad=False)
        return copied

    def apply(self, placement: Placement) -> int:
        """Switch to `placement` (all ranks call this at the same step); bytes copied on this rank (0 when
        buffered: new experts load on demand, counted in the rank's expert-cache stats)."""
        placement.validate(self.model.args.num_experts, self.model.args.num_layers)
        if placement.slots_per_rank != self.placement.slots_per_rank:
            self._zero_load(placement)
        self._install(placement)
        return self.last_copied

    def _zero_load(self, placement: Placement) -> None:
        """slot_load [L, S]: token-slots this rank's slots ran (dynamic gating); static_load [L, P]: token-slots
        this rank's shard routed to each physical slot (static gating, parallel_static.py)."""
        layers, s = self.model.args.num_layers, placement.slots_per_rank
        self.slot_load = torch.zeros(layers, s, dtype=torch.int64, device=self.device)
        self.static_load = torch.zeros(layers, placement.num_ranks * s, dtype=torch.int64, device=self.device)

    def forward(self, layer: int, moe, x: torch.Tensor) -> torch.Tensor:
        """x [T, H], identical on every rank -> MoE output [T, H], identical on every rank."""
        t, w = x.shape[0], self.world_size
        per = -(-t // w)  # shard size; the last shards may be short or empty
        start, end = min(self.rank * per, t), min((self.rank + 1) * per, t)
        if moe.gating.mode == "static":
            out = forward_static(self, layer, moe, x[start:end], per)  # [per, H]
        else:
            out = self._forward_dynamic(layer, moe, x, start, end, per)  # [per, H]
        gathered = [torch.empty_like(out) for _ in range(w)]
        dist.all_gather(gathered, out)
        return torch.cat(gathered)[:t]

    def _forward_dynamic(self, layer: int, moe, x: torch.Tensor, start: int, end: int, per: int) -> torch.Tensor:
        """Dynamic gating over rows start:end of x [T, H] -> this rank's output [per, H]."""
        w, s = self.world_size, self.placement.slots_per_rank
        shard = x[start:end]  # [Tr, H]
        routing = route(moe.router(shard), moe.args.top_k, renormalize=moe.args.norm_topk_prob)
        moe.expert_load += routing.expert_counts
        if self.buffering is not None:
            self.buffering.score(layer, routing.topk_ids, start, end)
        k = routing.topk_ids.shape[1]
        # Replica choice: each replica takes its share of the expert's token-slots, counted per rank.
        phys = choose_replicas(routing.topk_ids, routing.expert_counts, self.replica_seen[layer],
                               *self.tables[layer])  # [Tr, K]
        key = phys.reshape(-1)  # [Tr*K] = dest rank * S + local slot
        order = torch.argsort(key, stable=True)
        send = torch.zeros(w * s, dtype=torch.int64, device=x.device).index_add_(
            0, key, torch.ones_like(key))  # [W*S]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send)  # step 1: how many rows of each local slot each rank sends
        # host sync: all_to_all over variable splits needs the split sizes on the host (EP path only)
        send_rows = send.view(w, s).sum(1).tolist()
        recv_counts = recv.view(w, s)
        recv_rows = recv_counts.sum(1).tolist()
        xs = shard[order // k]  # [Tr*K, H] grouped by destination rank, then local slot
        xr = xs.new_empty((sum(recv_rows), x.shape[1]))
        dist.all_to_all_single(xr, xs, output_split_sizes=recv_rows, input_split_sizes=send_rows)
        local_ids = torch.arange(s, device=x.device).repeat(w).repeat_interleave(recv_counts.reshape(-1))  # [N]
        slot_rows = recv_counts.sum(0)  # [S]
        self.slot_load[layer] += slot_rows
        if self.buffering is not None:
            yr = self.buffering.run(layer, xr, local_ids, slot_rows)  # [N, H]
        else:
            ones = torch.ones((xr.shape[0], 1), dtype=torch.float32, device=x.device)
            yr, _ = run_experts(xr, moe.w13, moe.w2, ones, local_ids[:, None])  # [N, H]
        ys = yr.new_empty((xs.shape[0], x.shape[1]))
        dist.all_to_all_single(ys, yr, output_split_sizes=send_rows, input_split_sizes=recv_rows)
        weights = routing.topk_weights.reshape(-1)[order, None].to(ys.dtype)
        out = torch.zeros((per, x.shape[1]), dtype=x.dtype, device=x.device)
        out.index_add_(0, order // k, ys * weights)
        return out

    def gather_slot_load(self) -> torch.Tensor:
        """[W, L, S] cumulative token-slots per (rank, layer, local slot), on every rank: those each slot ran
        under dynamic gating plus those routed to it (kept or dropped) under static gating."""
        parts = [torch.empty_like(self.slot_load) for _ in range(self.world_size)]
        dist.all_gather(parts, self.slot_load)
        routed = self.static_load.clone()
        dist.all_reduce(routed)  # [L, P] over every rank's shard
        layers, s = routed.shape[0], self.placement.slots_per_rank
        return (torch.stack(parts) + routed.view(layers, self.world_size, s).transpose(0, 1)).cpu()

    def gather_dropped_slots(self) -> int:
        """Static gating's dropped token-slots over every rank's shard and every layer, on every rank."""
        dropped = self.model.dropped_slots().reshape(1).to(torch.int64)
        dist.all_reduce(dropped)
        return int(dropped.item())


OP_FORWARD, OP_APPLY, OP_GATHER_LOAD, OP_NOOP, OP_SHUTDOWN, OP_SETUP, OP_GATHER_DROPPED = 1, 2, 3, 4, 5, 6, 7
_HEADER = 6


class Lockstep:
    """The leader broadcasts each forward's inputs and each control op; followers replay them, so every
    rank issues the same collectives in the same order. Encoded as int64 tensors (no pickling)."""

    def __init__(self, model, ep: ExpertParallel):
        self.model, self.ep = model, ep
        nccl = dist.get_backend() == "nccl"
        self.comm = ep.device if nccl else torch.device("cpu")

    def _bcast(self, values: torch.Tensor | list[int]) -> torch.Tensor:
        t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=torch.int64)
        t = t.to(self.comm, torch.int64)
        dist.broadcast(t, src=0)
        return t

    def _recv(self, n: int) -> torch.Tensor:
        t = torch.empty(n, dtype=torch.int64, device=self.comm)
        dist.broadcast(t, src=0)
        return t

    # ---- leader -------------------------------------------------------------------------------
    def lead(self) -> None:
        """Make this rank the leader: its model broadcasts every cache setup and forward from now on."""
        self.model.setup_hook = self.broadcast_setup
        self.model.step_hook = self.broadcast_forward

    def broadcast_setup(self, max_batch: int, max_seq: int) -> None:
        self._bcast([OP_SETUP, max_batch, max_seq, 0, 0, 0])

    def broadcast_forward(self, tokens, input_pos, slots, kv_len) -> None:
        """The model's step hook on the leader: ship this forward's inputs to the followers."""
        b, s = tokens.shape
        kv_len = kv_len or self.model.max_cache_len
        self._bcast([OP_FORWARD, b, s, kv_len, int(slots is not None), 0])
        parts = [tokens.reshape(-1), input_pos.reshape(-1)] + ([slots.reshape(-1)] if slots is not None else [])
        self._bcast(torch.cat([p.to(self.comm, torch.int64) for p in parts]))

    def apply(self, placement: Placement) -> int:
        """Switch every rank to `placement` at this step boundary; total bytes copied over the group."""
        flat = [e for layer in placement.slots for e in layer]
        has_shares = placement.shares is not None
        self._bcast([OP_APPLY, placement.version, placement.num_ranks, placement.slots_per_rank,
                     placement.num_layers, int(has_shares)])
        self._bcast(flat)
        if has_shares:  # float64 over the wire: the followers' shares are the leader's, bit for bit
            self._bcast_shares(torch.tensor(placement.shares, dtype=torch.float64).reshape(-1))
        return self._apply_local(placement)

    def _bcast_shares(self, shares: torch.Tensor) -> torch.Tensor:
        t = shares.to(self.comm)
        dist.broadcast(t, src=0)
        return t.cpu()

    def _apply_local(self, placement: Placement) -> int:
        copied = torch.tensor([self.ep.apply(placement)], dtype=torch.int64, device=self.comm)
        dist.all_reduce(copied)
        return int(copied.item())

    def gather_load(self) -> torch.Tensor:
        self._bcast([OP_GATHER_LOAD, 0, 0, 0, 0, 0])
        return self.ep.gather_slot_load()

    def gather_dropped(self) -> int:
        self._bcast([OP_GATHER_DROPPED, 0, 0, 0, 0, 0])
        return self.ep.gather_dropped_slots()

    def heartbeat(self) -> None:
        """An idle leader pings the group, so a lost rank is noticed even without traffic."""
        self._bcast([OP_NOOP, 0, 0, 0, 0, 0])

    def shutdown(self) -> None:
        self._bcast([OP_SHUTDOWN, 0, 0, 0, 0, 0])

    # ---- followers ----------------------------------------------------------------------------
    def follow(self) -> None:
        """Replay the leader's steps until it says shutdown; a lost peer raises (the process exits)."""
        while True:
            op, a, b, c, d, e = self._recv(_HEADER).tolist()
            if op == OP_FORWARD:
                self._follow_forward(a, b, c, bool(d))
            elif op == OP_APPLY:
                flat = self._recv(d * b * c).tolist()
                p = c * b
                shares = None
                if e:
                    got = self._bcast_shares(torch.empty(d * p, dtype=torch.float64)).tolist()
                    shares = tuple(tuple(got[i * p:(i + 1) * p]) for i in range(d))
                slots = tuple(tuple(flat[i * p:(i + 1) * p]) for i in range(d))
                self._apply_local(Placement(a, b, c, slots, shares))
            elif op == OP_GATHER_LOAD:
                self.ep.gather_slot_load()
            elif op == OP_GATHER_DROPPED:
                self.ep.gather_dropped_slots()
            elif op == OP_SETUP:
                self.model.setup_cache(a, b)
            elif op == OP_SHUTDOWN:
                return

    @torch.inference_mode()
    def _follow_forward(self, b: int, s: int, kv_len: int, has_slots: bool) -> None:
        n = b * s
        payload = self._recv(2 * n + (b if has_slots else 0)).to(self.ep.device)
        tokens, pos = payload[:n].view(b, s), payload[n:2 * n].view(b, s)
        slots = payload[2 * n:] if has_slots else None
        self.model(tokens, pos, slots, kv_len=kv_len)
