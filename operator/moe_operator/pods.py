"""The operator's only door to the runtime pods: gRPC health and the ExpertControl admin service.

Each call opens a short-lived channel to `podIP:port` with a deadline; transport failures surface as
`PodUnreachable` (transient for the caller). Returns plain numpy/Placement values, never protos.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_runtime.api.v1 import expert_control_pb2 as ec_pb
from moe_runtime.api.v1 import expert_control_pb2_grpc as ec_grpc
from moe_runtime.placement import Placement

# W ranks, L layers, S slots per rank


class PodUnreachable(Exception):
    """The pod did not answer (yet): retry later."""


class PlacementRejected(Exception):
    """The runtime refused a placement (bad, stale or conflicting): do not retry the same one."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code


@dataclass(frozen=True)
class LoadSnapshot:
    """Cumulative per-slot counters of one group, read at `timestamp` (seconds since the epoch)."""

    timestamp: float
    start_time: float
    placement_version: int
    counts: np.ndarray  # [W, L, S] token-slots, cumulative since start_time

    def rank_totals(self) -> np.ndarray:
        """[L, W] token-slots per layer and rank."""
        return self.counts.sum(axis=2).T


def _call(address: str, fn, timeout: float):
    with grpc.insecure_channel(address) as channel:
        try:
            return fn(channel, timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                        grpc.StatusCode.CANCELLED):
                raise PodUnreachable(f"{address}: {code.name}: {exc.details()}") from exc
            raise PlacementRejected(code, exc.details() or "") from exc


def is_serving(address: str, timeout: float = 2.0) -> bool:
    """grpc.health.v1 Check of the overall server: SERVING or not (unreachable counts as not)."""
    def check(channel, t):
        req = health_pb2.HealthCheckRequest(service="")
        return health_pb2_grpc.HealthStub(channel).Check(req, timeout=t).status
    try:
        return _call(address, check, timeout) == health_pb2.HealthCheckResponse.SERVING
    except (PodUnreachable, PlacementRejected):
        return False


def expert_load(admin_address: str, timeout: float = 5.0) -> LoadSnapshot:
    msg = _call(admin_address, lambda ch, t: ec_grpc.ExpertControlStub(ch).GetExpertLoad(
        ec_pb.GetExpertLoadRequest(), timeout=t), timeout)
    counts = np.array([list(r.slot_counts) for r in sorted(msg.ranks, key=lambda r: r.rank)], dtype=np.int64)
    counts = counts.reshape(msg.num_ranks, msg.num_layers, msg.slots_per_rank)
    return LoadSnapshot(msg.timestamp.ToNanoseconds() / 1e9, msg.start_time.ToNanoseconds() / 1e9,
                        msg.placement_version, counts)


def placement(admin_address: str, timeout: float = 5.0) -> Placement:
    msg = _call(admin_address, lambda ch, t: ec_grpc.ExpertControlStub(ch).GetPlacement(
        ec_pb.GetPlacementRequest(), timeout=t), timeout)
    return Placement.from_proto(msg)


def apply_placement(admin_address: str, new: Placement, timeout: float = 120.0) -> tuple[bool, int]:
    """(unchanged, bytes copied). Raises PlacementRejected for a refused placement."""
    req = ec_pb.ApplyPlacementRequest(placement=new.to_proto())
    resp = _call(admin_address, lambda ch, t: ec_grpc.ExpertControlStub(ch).ApplyPlacement(req, timeout=t),
                 timeout)
    return resp.unchanged, resp.copied_bytes
