"""Expert placement: the versioned Placement (runtime, operator and ConfigMap format), the load metric and
the planners (paper section 5; issue 6). A placement may carry per-slot shares: the fraction of an expert's
token-slots each of its replicas takes (default: equal), which the runtime's dispatch honours.

Torch-free and gRPC-free: the operator imports this module. The packing algorithms live beside it in
`placement_planners`; callers import everything from here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from moe_runtime import placement_planners as planners
from moe_runtime.traces import Trace, load_trace

# L layers, E experts, W ranks, S slots per rank, P = W*S physical slots (slot p on rank p // S), B batches

_KEYS = ("num_ranks", "slots", "slots_per_rank", "version")
_OPTIONAL_KEYS = ("shares",)
SHARE_TOLERANCE = 1e-6  # the shares of one expert's replicas must sum to 1 within this


class PlacementError(ValueError):
    """A placement (or a planner's input) that cannot be served; the message names the problem."""


@dataclass(frozen=True)
class Placement:
    version: int  # monotonic, >= 0
    num_ranks: int
    slots_per_rank: int
    slots: tuple[tuple[int, ...], ...]  # [L][P] logical expert held by each physical slot, rank-major
    # [L][P] fraction of its expert's token-slots each physical slot takes (one expert's replicas sum to 1);
    # None: every expert's replicas split its token-slots equally (what placements without shares mean)
    shares: tuple[tuple[float, ...], ...] | None = None

    def __post_init__(self) -> None:
        for name in ("version", "num_ranks", "slots_per_rank"):
            if isinstance(getattr(self, name), np.integer):
                object.__setattr__(self, name, int(getattr(self, name)))
        object.__setattr__(self, "slots", tuple(tuple(int(e) for e in layer) for layer in self.slots))
        if self.shares is not None:
            object.__setattr__(self, "shares", tuple(tuple(float(f) for f in layer) for layer in self.shares))

    @property
    def num_layers(self) -> int:
        return len(self.slots)

    @property
    def num_slots(self) -> int:
        return self.num_ranks * self.slots_per_rank

    def validate(self, num_experts: int, num_layers: int | None = None) -> None:
        """Raise PlacementError unless every slot holds a known expert and every expert is placed."""
        self._check_structure()
        if num_experts <= 0:
            raise PlacementError(f"num_experts must be positive, got {num_experts}")
        if num_layers is not None and num_layers != self.num_layers:
            raise PlacementError(f"placement has {self.num_layers} layers, the model has {num_layers}")
        if self.num_slots < num_experts:
            raise PlacementError(
                f"capacity exceeded: {num_experts} experts do not fit in {self.num_ranks} ranks x "
                f"{self.slots_per_rank} slots per rank"
            )
        for layer, held in enumerate(self.slots):
            table = np.asarray(held)
            bad = np.flatnonzero(table >= num_experts)
            if bad.size:
                raise PlacementError(
                    f"layer {layer}, slot {bad[0]} (rank {self.rank_of_slot(int(bad[0]))}): unknown expert "
                    f"{table[bad[0]]} (the model has {num_experts} experts)"
                )
            missing = np.setdiff1d(np.arange(num_experts), table)
            if missing.size:
                raise PlacementError(f"layer {layer}: experts {missing.tolist()} are not placed")

    def _check_structure(self) -> None:
        for name in ("version", "num_ranks", "slots_per_rank"):
            value, least = getattr(self, name), 0 if name == "version" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise PlacementError(f"{name} must be an integer >= {least}, got {value!r}")
        if not self.slots:
            raise PlacementError("placement has no layers")
        for layer, held in enumerate(self.slots):
            if len(held) != self.num_slots:
                excess = " (capacity exceeded)" if len(held) > self.num_slots else ""
                raise PlacementError(
                    f"layer {layer} has {len(held)} slots, expected {self.num_slots} "
                    f"({self.num_ranks} ranks x {self.slots_per_rank} slots per rank){excess}"
                )
            if min(held) < 0:
                raise PlacementError(f"layer {layer}: negative expert id {min(held)}")
        if self.shares is not None:
            self._check_shares()

    def _check_shares(self) -> None:
        if len(self.shares) != self.num_layers:
            raise PlacementError(f"shares has {len(self.shares)} layers, slots has {self.num_layers}")
        for layer, (held, share) in enumerate(zip(self.slots, self.shares)):
            if len(share) != len(held):
                raise PlacementError(f"layer {layer} has {len(share)} shares, expected {len(held)} (one per slot)")
            values = np.asarray(share)
            if not np.isfinite(values).all() or (values < 0).any():
                raise PlacementError(f"layer {layer}: shares must be finite and non-negative")
            total = np.bincount(held, weights=values)[np.unique(held)]
            bad = np.flatnonzero(np.abs(total - 1.0) > SHARE_TOLERANCE)
            if bad.size:
                expert = int(np.unique(held)[bad[0]])
                raise PlacementError(f"layer {layer}: the shares of expert {expert}'s replicas sum to "
                                     f"{total[bad[0]]:.9g}, not 1")

    def replicas(self, layer: int) -> dict[int, list[int]]:
        """Logical expert -> the physical slots holding it, in one layer."""
        out: dict[int, list[int]] = {}
        for slot, expert in enumerate(self.slots[layer]):
            out.setdefault(expert, []).append(slot)
        return dict(sorted(out.items()))

    def rank_of_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise PlacementError(f"physical slot {slot} out of range [0, {self.num_slots})")
        return slot // self.slots_per_rank

    def to_array(self) -> np.ndarray:
        return np.asarray(self.slots, dtype=np.int64).reshape(self.num_layers, self.num_slots)  # [L, P]

    def slot_shares(self) -> np.ndarray:
        """[L, P] fraction of its expert's token-slots each slot takes: the shares, or 1 / replicas."""
        if self.shares is not None:
            return np.asarray(self.shares, dtype=np.float64).reshape(self.num_layers, self.num_slots)
        table = self.to_array()
        counts = np.stack([np.bincount(row)[row] for row in table])  # [L, P] replicas of each slot's expert
        return 1.0 / counts

    def digest(self) -> str:
        """Short stable hash of the body (everything but the version); unchanged for placements without shares."""
        body = [self.num_ranks, self.slots_per_rank, self.slots] + ([self.shares] if self.shares is not None else [])
        return hashlib.sha256(json.dumps(body, separators=(",", ":")).encode()).hexdigest()[:16]

    def same_body(self, other: Placement) -> bool:
        return self.with_version(other.version) == other

    def with_version(self, version: int) -> Placement:
        return replace(self, version=version)

    def to_dict(self) -> dict:
        shares = {} if self.shares is None else {"shares": [list(layer) for layer in self.shares]}
        return {
            "num_ranks": self.num_ranks,
            **shares,
            "slots": [list(layer) for layer in self.slots],
            "slots_per_rank": self.slots_per_rank,
            "version": self.version,
        }

    @classmethod
    def from_dict(cls, data: object) -> Placement:
        """Build from parsed JSON; raise PlacementError naming a missing, unknown or mistyped field."""
        if not isinstance(data, dict):
            raise PlacementError(f"placement must be a JSON object, got {type(data).__name__}")
        missing, unknown = set(_KEYS) - data.keys(), data.keys() - set(_KEYS) - set(_OPTIONAL_KEYS)
        if missing or unknown:
            raise PlacementError(f"placement fields: missing {sorted(missing)}, unknown {sorted(unknown)}")
        for name in ("version", "num_ranks", "slots_per_rank"):
            if isinstance(data[name], bool) or not isinstance(data[name], int):
                raise PlacementError(f"{name} must be an integer, got {data[name]!r}")
        layers = data["slots"]
        if not isinstance(layers, list) or not all(isinstance(layer, list) for layer in layers):
            raise PlacementError("slots must be a list of layers, each a list of expert ids")
        if not all(type(e) is int for layer in layers for e in layer):
            raise PlacementError("slots must hold integer expert ids")
        shares = data.get("shares")
        if shares is not None and not (
            isinstance(shares, list) and all(isinstance(layer, list) for layer in shares)
            and all(type(f) in (int, float) for layer in shares for f in layer)
        ):
            raise PlacementError("shares must be a list of layers, each a list of numbers (one per slot)")
        placement = cls(data["version"], data["num_ranks"], data["slots_per_rank"], tuple(map(tuple, layers)),
                        None if shares is None else tuple(map(tuple, shares)))
        placement._check_structure()
        return placement

    def to_json(self) -> str:
        """Stable, human-readable JSON (sorted keys, one layer per line): the ConfigMap's placement.json."""
        layers = ",\n".join(f"    {json.dumps(list(layer))}" for layer in self.slots)
        shares = ",\n".join(f"    {json.dumps(list(layer))}" for layer in self.shares or ())
        shares = f'  "shares": [\n{shares}\n  ],\n' if self.shares is not None else ""
        return (
            f'{{\n  "num_ranks": {self.num_ranks},\n{shares}  "slots": [\n{layers}\n  ],\n'
            f'  "slots_per_rank": {self.slots_per_rank},\n  "version": {self.version}\n}}\n'
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Placement:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlacementError(f"placement is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def to_proto(self):
        """The ExpertControl message (moe_runtime.api.v1.Placement): same fields, same meaning."""
        from moe_runtime.api.v1 import expert_control_pb2 as ec_pb

        shares = self.shares or [()] * self.num_layers
        return ec_pb.Placement(version=self.version, num_ranks=self.num_ranks, slots_per_rank=self.slots_per_rank,
                               layers=[ec_pb.LayerSlots(experts=list(layer), shares=list(share))
                                       for layer, share in zip(self.slots, shares)])

    @classmethod
    def from_proto(cls, msg) -> Placement:
        """From an ExpertControl Placement message; checked as from_dict checks JSON (no layer with shares:
        equal shares, as in messages from before shares existed)."""
        shares = [list(layer.shares) for layer in msg.layers]
        return cls.from_dict({"version": msg.version, "num_ranks": msg.num_ranks,
                              "slots_per_rank": msg.slots_per_rank,
                              "slots": [list(layer.experts) for layer in msg.layers]}
                             | ({"shares": shares} if any(shares) else {}))


def slots_per_rank_for(num_experts: int, num_ranks: int, redundant_slots: int = 0) -> int:
    """ceil(E / W) slots per rank, plus `redundant_slots` extra slots per rank for replicas."""
    if num_experts <= 0 or num_ranks <= 0 or redundant_slots < 0:
        raise PlacementError(
            f"need num_experts > 0, num_ranks > 0, redundant_slots >= 0; got {num_experts}, "
            f"{num_ranks}, {redundant_slots}"
        )
    return math.ceil(num_experts / num_ranks) + redundant_slots


def round_robin(
    num_layers: int, num_experts: int, num_ranks: int, slots_per_rank: int | None = None, version: int = 0
) -> Placement:
    """Default placement: slot p holds expert p mod E (E in blocks per rank; extra slots repeat 0, 1, ...)."""
    if slots_per_rank is None:
        slots_per_rank = slots_per_rank_for(num_experts, num_ranks)
    layer = tuple(p % num_experts for p in range(num_ranks * slots_per_rank))
    placement = Placement(version, num_ranks, slots_per_rank, (layer,) * num_layers)
    placement.validate(num_experts, num_layers)
    return placement


# -- load accounting: the ONE definition (issue 6): per layer max over ranks / mean over ranks ---------


def rank_loads(placement: Placement, expert_load: np.ndarray) -> np.ndarray:
    """[..., L, E] token-slots per expert -> [..., L, W] per rank, each expert split over its replicas by
    the placement's shares (evenly without them), as the runtime's dispatch splits it."""
    load = np.asarray(expert_load, dtype=np.float64)
    if load.ndim < 2 or load.shape[-2] != placement.num_layers:
        raise PlacementError(f"expert_load must be [..., {placement.num_layers}, E], got {load.shape}")
    placement.validate(load.shape[-1], placement.num_layers)
    table = placement.to_array()  # [L, P]
    slot_load = np.take_along_axis(load, np.broadcast_to(table, load.shape[:-1] + table.shape[-1:]), -1)
    slot_load = slot_load * placement.slot_shares()  # [..., L, P]
    return slot_load.reshape(*load.shape[:-1], placement.num_ranks, placement.slots_per_rank).sum(-1)


def rank_loads_from_slots(placement: Placement, slot_load: np.ndarray) -> np.ndarray:
    """[..., L, P] measured token-slots per physical slot (the runtime's counters) -> [..., L, W]."""
    load = np.asarray(slot_load, dtype=np.float64)
    if load.shape[-2:] != (placement.num_layers, placement.num_slots):
        raise PlacementError(f"slot_load must be [..., {placement.num_layers}, {placement.num_slots}]")
    return load.reshape(*load.shape[:-1], placement.num_ranks, placement.slots_per_rank).sum(-1)


def expert_load_from_slots(placement: Placement, slot_load: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, P] measured token-slots per physical slot -> [L, E] per logical expert (replicas summed)."""
    load = np.asarray(slot_load, dtype=np.float64)
    rank_loads_from_slots(placement, load)  # shape check
    placement.validate(num_experts, placement.num_layers)
    out = np.zeros((placement.num_layers, num_experts))
    np.add.at(out, (np.arange(placement.num_layers)[:, None], placement.to_array()), load)
    return out


def layer_imbalance(rank_load: np.ndarray) -> np.ndarray:
    """[..., W] -> [...] max over ranks / mean over ranks; an idle layer counts as balanced (1.0)."""
    load = np.asarray(rank_load, dtype=np.float64)
    mean = load.mean(axis=-1)
    return np.divide(load.max(axis=-1), mean, out=np.ones_like(mean), where=mean > 0)


def imbalance(rank_load: np.ndarray) -> float:
    """[L, W] (or [B, L, W]) -> the mean of layer_imbalance over layers (and batches); 1.0 is perfect."""
    return float(layer_imbalance(rank_load).mean())


def balancedness(rank_load: np.ndarray) -> float:
    return 1.0 / imbalance(rank_load)


def expert_load_from_trace(trace: Trace, *, batch_tokens: int | None = None) -> np.ndarray:
    """Token-slots per (layer, expert): [L, E], or [B, L, E] per full batch of `batch_tokens` tokens."""
    ids = trace.topk_ids  # [N, L, K]
    num_layers, num_experts = trace.num_layers, trace.experts
    if batch_tokens is None:
        batches, tokens = 1, trace.num_tokens
        batch = np.zeros((tokens, 1, 1), dtype=np.int64)
    elif batch_tokens <= 0:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    else:
        batches = trace.num_tokens // batch_tokens  # a partial last batch is dropped
        tokens = batches * batch_tokens
        batch = (np.arange(tokens) // batch_tokens)[:, None, None]
    flat = (batch * num_layers + np.arange(num_layers)[None, :, None]) * num_experts + ids[:tokens]
    counts = np.bincount(flat.ravel(), minlength=batches * num_layers * num_experts)
    counts = counts.astype(np.float64).reshape(batches, num_layers, num_experts)
    return counts[0] if batch_tokens is None else counts


def coactivation(trace: Trace, *, batch_tokens: int = 256) -> np.ndarray:
    """[L, E, E] Pearson correlation over batches of the per-batch expert activation counts (paper S).

    Experts with constant counts correlate 0 with the others; the diagonal is 1.
    """
    counts = expert_load_from_trace(trace, batch_tokens=batch_tokens)  # [B, L, E]
    centred = counts - counts.mean(axis=0)
    cov = np.einsum("ble,blf->lef", centred, centred)  # [L, E, E]
    std = np.sqrt(np.einsum("lee->le", cov))
    denom = std[:, :, None] * std[:, None, :]
    corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
    corr[:, np.arange(trace.experts), np.arange(trace.experts)] = 1.0
    return corr


# -- planners: plan(expert_load [L, E], num_ranks, slots_per_rank, *, version, coactivation, seed) ----


def _checked_load(expert_load: np.ndarray, num_ranks: int, slots_per_rank: int) -> np.ndarray:
    load = np.asarray(expert_load, dtype=np.float64)
    if load.ndim != 2 or 0 in load.shape:
        raise PlacementError(f"expert_load must be a non-empty [layers, experts] array, got {load.shape}")
    if not np.isfinite(load).all() or (load < 0).any():
        raise PlacementError("expert_load must be finite and non-negative")
    if min(num_ranks, slots_per_rank) <= 0 or num_ranks * slots_per_rank < load.shape[1]:
        raise PlacementError(
            f"capacity exceeded: {load.shape[1]} experts do not fit in {num_ranks} ranks x {slots_per_rank} "
            "slots per rank (both must be positive)"
        )
    return load


def _placement(table: np.ndarray, version: int, num_experts: int, shares: np.ndarray | None = None) -> Placement:
    num_layers, num_ranks, slots_per_rank = table.shape
    shares = None if shares is None else shares.reshape(num_layers, -1).tolist()
    placement = Placement(version, num_ranks, slots_per_rank, table.reshape(num_layers, -1).tolist(), shares)
    placement.validate(num_experts, num_layers)
    return placement


def plan_round_robin(
    expert_load: np.ndarray, num_ranks: int, slots_per_rank: int, *, version: int, coactivation=None, seed=0
) -> Placement:
    """The baseline: ignores the load (round_robin as a planner)."""
    load = _checked_load(expert_load, num_ranks, slots_per_rank)
    return round_robin(load.shape[0], load.shape[1], num_ranks, slots_per_rank, version)


def greedy(
    expert_load: np.ndarray, num_ranks: int, slots_per_rank: int, *, version: int, coactivation=None, seed=0
) -> Placement:
    """Paper: experts by mean load, each to the lightest rank with a free slot (LPT, cardinality cap).

    Slots beyond E hold one extra replica of each of the hottest experts in load order (cycling), each
    replica carrying load / replicas, packed the same way; replicate_pack allocates them by load instead.
    """
    load = _checked_load(expert_load, num_ranks, slots_per_rank)
    return _placement(planners.greedy_table(load, num_ranks, slots_per_rank, seed), version, load.shape[1])


def anti_correlation(
    expert_load: np.ndarray, num_ranks: int, slots_per_rank: int, *, version: int, coactivation=None, seed=0
) -> Placement:
    """Paper: greedy where rank n's load for candidate a is sum_m P[m,n](A_m + 0.5 S[a,m]); S is [L, E, E]."""
    load = _checked_load(expert_load, num_ranks, slots_per_rank)
    if coactivation is None:
        raise PlacementError("anti_correlation needs coactivation [L, E, E]: see coactivation()")
    corr = np.asarray(coactivation, dtype=np.float64)
    if corr.shape != (*load.shape, load.shape[1]) or not np.isfinite(corr).all():
        raise PlacementError(f"coactivation must be finite [{load.shape[0]}, E, E], got {corr.shape}")
    table = planners.anti_correlation_table(load, corr, num_ranks, slots_per_rank, seed)
    return _placement(table, version, load.shape[1])


def replicate_pack(
    expert_load: np.ndarray, num_ranks: int, slots_per_rank: int, *, version: int, coactivation=None, seed=0
) -> Placement:
    """Ours: EPLB's replicate-then-pack, improved by swaps and replica-count search where it beats the noise,
    then unequal shares for the replicas that even out what equal splits leave (placement_planners).

    Loads are token-slot counts: a change must lower a rank's maximum by more than 2 sqrt(load) (see
    placement_planners.MIN_GAIN_STANDARD_ERRORS). Never two replicas of one expert on a rank when avoidable.
    Shares move no weights, so they are always re-fit; a plan whose shares all come out equal carries none.
    """
    load = _checked_load(expert_load, num_ranks, slots_per_rank)
    table = planners.replicate_pack_table(load, num_ranks, slots_per_rank, seed)
    return _placement(table, version, load.shape[1], planners.replica_shares(load, table))


PLANNERS: dict[str, Callable[..., Placement]] = {
    "round_robin": plan_round_robin,
    "greedy": greedy,
    "anti_correlation": anti_correlation,
    "replicate_pack": replicate_pack,
}


def plan_placement(
    name: str,
    expert_load: np.ndarray,
    num_ranks: int,
    slots_per_rank: int,
    *,
    version: int,
    coactivation=None,
    seed=0,
) -> Placement:
    """Run the planner called `name` (a key of PLANNERS); ValueError naming the allowed ones otherwise."""
    if name not in PLANNERS:
        raise ValueError(f"unknown planner {name!r}; allowed: {', '.join(PLANNERS)}")
    plan = PLANNERS[name]
    return plan(expert_load, num_ranks, slots_per_rank, version=version, coactivation=coactivation, seed=seed)


# -- `moe-runtime plan TRACE ...` ---------------------------------------------------------------------


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("trace", help="routing trace (.npz, see moe_runtime.traces)")
    parser.add_argument("--ranks", type=int, required=True, help="expert-parallel ranks W")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--slots-per-rank", type=int, help="physical expert slots per rank (default ceil(E/W))")
    size.add_argument("--redundant-slots", type=int, default=0, help="extra slots per rank beyond ceil(E/W)")
    parser.add_argument("--planner", choices=list(PLANNERS), default="replicate_pack")
    parser.add_argument("--window", type=int, help="fit on the last N tokens only (default: all)")
    parser.add_argument("--version", type=int, default=0, help="placement version (monotonic)")
    parser.add_argument("--seed", type=int, default=0, help="tie-break seed")
    parser.add_argument("--batch-tokens", type=int, default=256, help="tokens per batch for coactivation")
    parser.add_argument("--out", help="write placement.json here (default: stdout)")
    return parser


def plan_main(args: argparse.Namespace) -> int:
    """Fit a placement on a trace, print the predicted imbalance vs round-robin, write the JSON."""
    try:
        trace = load_trace(args.trace)
        if args.window is not None:  # the operator's view: only the most recent tokens
            if args.window <= 0:
                raise ValueError(f"--window must be positive, got {args.window}")
            trace = Trace(trace.topk_ids[-args.window :], None, trace.num_experts)
        load = expert_load_from_trace(trace)  # [L, E]
        num_experts = load.shape[1]
        slots = args.slots_per_rank or slots_per_rank_for(num_experts, args.ranks, args.redundant_slots)
        anti = args.planner == "anti_correlation"
        corr = coactivation(trace, batch_tokens=args.batch_tokens) if anti else None
        placement = plan_placement(
            args.planner, load, args.ranks, slots, version=args.version, coactivation=corr, seed=args.seed
        )
        baseline = round_robin(trace.num_layers, num_experts, args.ranks, slots)
    except (OSError, ValueError) as exc:
        print(f"moe-runtime plan: error: {exc}", file=sys.stderr)
        return 2
    ours, base = imbalance(rank_loads(placement, load)), imbalance(rank_loads(baseline, load))
    print(
        f"{args.planner}: {trace.num_tokens} tokens, {trace.num_layers} layers, {num_experts} experts on "
        f"{args.ranks} ranks x {slots} slots; predicted imbalance on these tokens {ours:.3f} "
        f"(balancedness {1 / ours:.3f}) vs round_robin {base:.3f} ({1 / base:.3f}); "
        f"version {placement.version}, digest {placement.digest()}",
        file=sys.stderr,
    )
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(placement.to_json())
    else:
        sys.stdout.write(placement.to_json())
    return 0
