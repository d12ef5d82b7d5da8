"""The group leader's control state: readiness, the placement in force and per-slot load counters.

Backs the ExpertControl service (servicers.py maps its exceptions to status codes). Slot counters are
cumulative and monotonic: the engine's per-expert counts are folded into physical slots under the
placement that was in force when they were counted, before any placement switch. No grpc here.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp

from moe_runtime.api.v1 import expert_control_pb2 as ec_pb
from moe_runtime.placement import Placement, PlacementError
from moe_runtime.scheduler import Engine

# L layers, E experts, W ranks, S slots per rank, P = W*S physical slots


class StalePlacement(PlacementError):
    """An older version than the one in force (FAILED_PRECONDITION)."""


class PlacementConflict(PlacementError):
    """The version in force with another body (INVALID_ARGUMENT)."""


class ExpertController:
    """lockstep (parallel.Lockstep, expert-parallel groups only): per-slot counters are gathered from
    the ranks and placements are applied on every rank, both through the engine thread."""

    def __init__(self, engine: Engine, placement: Placement, group_size: int = 1, lockstep=None):
        args = engine.model.args
        placement.validate(args.num_experts, args.num_layers)
        self.engine, self.placement, self.group_size = engine, placement, group_size
        self.lockstep = lockstep
        self.ready = False
        self.start_time = time.time()
        self._lock = threading.Lock()
        self._seen = np.zeros((args.num_layers, args.num_experts), dtype=np.int64)  # [L, E] folded so far
        self._slot_totals = np.zeros((args.num_layers, placement.num_slots), dtype=np.int64)  # [L, P]

    def _fold(self) -> None:
        """Add the expert counts since the last fold to the slots of the current placement.

        An expert with replicas has its tokens split across them by the placement's shares, as the
        dispatcher splits them (rounded up for the first replicas: evenly without shares, the remainder
        to the first ones), so the counters stay integral and monotonic.
        """
        load = self.engine.expert_load().numpy()
        delta, self._seen = load - self._seen, load
        shares = self.placement.slot_shares()  # [L, P]
        for layer, held in enumerate(self.placement.slots):
            for expert, slots in _replicas(held).items():
                total = int(delta[layer, expert])
                upto = np.ceil(np.cumsum(shares[layer, slots]) * total - 1e-9).astype(np.int64)  # cumulative
                upto = np.minimum(upto, total)
                upto[-1] = total
                self._slot_totals[layer, slots] += np.diff(upto, prepend=0)

    def _gathered(self) -> np.ndarray:
        """[L, P] slot counters of every rank (rank-major slots), read between engine steps."""
        load = self.engine.call_soon(self.lockstep.gather_load).result(timeout=60)  # [W, L, S]
        return load.permute(1, 0, 2).reshape(load.shape[1], -1).numpy()

    def expert_load_message(self) -> ec_pb.ExpertLoad:
        with self._lock:
            p = self.placement
            if self.lockstep is not None:
                totals = self._gathered()
            else:
                self._fold()
                totals = self._slot_totals.copy()
        now, start = Timestamp(), Timestamp()
        now.FromNanoseconds(time.time_ns())
        start.FromNanoseconds(int(self.start_time * 1e9))
        msg = ec_pb.ExpertLoad(timestamp=now, start_time=start, placement_version=p.version,
                               num_layers=p.num_layers, num_ranks=p.num_ranks, slots_per_rank=p.slots_per_rank)
        s = p.slots_per_rank
        for rank in range(p.num_ranks):
            msg.ranks.add(rank=rank, slot_counts=totals[:, rank * s:(rank + 1) * s].reshape(-1).tolist())
        return msg

    def slot_totals(self) -> np.ndarray:
        with self._lock:
            if self.lockstep is not None:
                return self._gathered()
            self._fold()
            return self._slot_totals.copy()

    def apply_placement(self, new: Placement) -> tuple[bool, int]:
        """(unchanged, bytes copied). Same version + body: no-op; same version, other body: conflict;
        older: stale. On one rank every expert is resident, so a valid placement moves no weights;
        in a group every rank copies its new experts and all switch at one step boundary."""
        args = self.engine.model.args
        with self._lock:
            cur = self.placement
            if new.version < cur.version:
                raise StalePlacement(f"placement version {new.version} is older than the current {cur.version}")
            if new.version == cur.version:
                if new.same_body(cur):
                    return True, 0
                raise PlacementConflict(f"placement version {new.version} is in force with another body")
            new.validate(args.num_experts, args.num_layers)
            if new.num_ranks != self.group_size:
                raise PlacementError(f"placement has num_ranks {new.num_ranks}, this group has "
                                     f"{self.group_size} rank(s)")
            if self.lockstep is not None:
                copied = self.engine.call_soon(lambda: self.lockstep.apply(new)).result(timeout=600)
                self.placement = new
                return False, copied
            self._fold()  # counts so far belong to the old slots
            if new.num_slots != cur.num_slots:  # other slot shape: counters restart (start_time says so)
                self._slot_totals = np.zeros((args.num_layers, new.num_slots), dtype=np.int64)
                self.start_time = time.time()
            self.placement = new
            return False, 0


def _replicas(held: tuple[int, ...]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for slot, expert in enumerate(held):
        out.setdefault(expert, []).append(slot)
    return out
