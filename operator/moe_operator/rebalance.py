"""When to re-place experts and where to: pure decisions over load snapshots (no I/O, no clock reads).

Imbalance is the one definition of moe_runtime.placement (per layer max/mean over ranks of the
token-slots in a window, averaged over layers). A new placement is planned when the window's imbalance
stays above the threshold for the whole observation window, the cooldown has passed, the load is not
too thin to trust, and the planner predicts a real improvement.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from moe_operator.pods import LoadSnapshot
from moe_runtime.placement import (
    Placement,
    expert_load_from_slots,
    imbalance,
    plan_placement,
    rank_loads,
    rank_loads_from_slots,
)

MIN_WINDOW_TOKEN_SLOTS = 64  # below this a window is noise, not load
MIN_GAIN = 0.05  # plan only when the predicted imbalance is at least 5% lower


@dataclass(frozen=True)
class Policy:
    threshold: float  # imbalance (max/mean) above which the load is "imbalanced"
    window_seconds: float
    cooldown_seconds: float
    planner: str
    redundant_slots: int = 0


@dataclass(frozen=True)
class Decision:
    imbalance: float | None  # measured over the window (None: not enough data yet)
    placement: Placement | None = None  # the new placement to roll out, if any
    predicted: float | None = None  # planner's predicted imbalance for it
    reason: str = ""


class LoadWindow:
    """Recent snapshots per group; windows never span a restart or a placement change."""

    def __init__(self, keep_seconds: float):
        self.keep_seconds = keep_seconds
        self._snaps: dict[str, deque[LoadSnapshot]] = {}

    def add(self, group: str, snap: LoadSnapshot) -> None:
        snaps = self._snaps.setdefault(group, deque())
        if snaps and (snaps[-1].start_time != snap.start_time
                      or snaps[-1].placement_version != snap.placement_version
                      or snaps[-1].counts.shape != snap.counts.shape):
            snaps.clear()
        snaps.append(snap)
        while len(snaps) > 2 and snap.timestamp - snaps[1].timestamp >= self.keep_seconds:
            snaps.popleft()

    def clear(self) -> None:
        self._snaps.clear()

    def interval_slot_loads(self) -> list[np.ndarray]:
        """Per poll interval, slot counts [L, P] summed over groups (aligned by interval index)."""
        intervals: list[np.ndarray] = []
        for snaps in self._snaps.values():
            for i, (a, b) in enumerate(zip(snaps, list(snaps)[1:])):
                delta = b.counts - a.counts  # [W, L, S]
                slot = delta.transpose(1, 0, 2).reshape(delta.shape[1], -1)
                if i < len(intervals):
                    intervals[i] = intervals[i] + slot
                else:
                    intervals.append(slot)
        return intervals

    def window(self, window_seconds: float) -> tuple[np.ndarray, float, list[float]] | None:
        """(slot counts [L, P] summed over groups, seconds covered, per-interval imbalances), or None when
        no group has `window_seconds` of history yet."""
        total, covered, series = None, 0.0, []
        for snaps in self._snaps.values():
            if len(snaps) < 2 or snaps[-1].timestamp - snaps[0].timestamp < window_seconds:
                continue
            delta = snaps[-1].counts - snaps[0].counts  # [W, L, S]
            slot = delta.transpose(1, 0, 2).reshape(delta.shape[1], -1)  # [L, P] rank-major
            total = slot if total is None else total + slot
            covered = max(covered, snaps[-1].timestamp - snaps[0].timestamp)
            for a, b in zip(snaps, list(snaps)[1:]):
                step = (b.counts - a.counts).sum(axis=2).T  # [L, W]
                if step.sum() >= MIN_WINDOW_TOKEN_SLOTS:
                    series.append(imbalance(step))
        return None if total is None else (total, covered, series)


def decide(window: LoadWindow, current: Placement, num_experts: int, policy: Policy, now: float,
           last_change: float | None) -> Decision:
    """Whether to re-place, and the placement (version current+1) when so."""
    got = window.window(policy.window_seconds)
    if got is None:
        return Decision(None, reason="collecting load")
    slot_load, _, series = got
    if slot_load.sum() < MIN_WINDOW_TOKEN_SLOTS:
        return Decision(None, reason="too little load to judge")
    measured = imbalance(rank_loads_from_slots(current, slot_load))
    if measured <= policy.threshold or (series and min(series) <= policy.threshold):
        return Decision(measured, reason=f"imbalance {measured:.3f} within threshold {policy.threshold}")
    if last_change is not None and now - last_change < policy.cooldown_seconds:
        return Decision(measured, reason="cooling down after the last change")
    expert_load = expert_load_from_slots(current, slot_load, num_experts)  # [L, E]
    slots_per_rank = -(-num_experts // current.num_ranks) + policy.redundant_slots
    corr = coactivation(window, current, num_experts) if policy.planner == "anti_correlation" else None
    new = plan_placement(policy.planner, expert_load, current.num_ranks, slots_per_rank,
                         version=current.version + 1, coactivation=corr)
    predicted = imbalance(rank_loads(new, expert_load))
    if predicted > measured * (1 - MIN_GAIN):
        return Decision(measured, reason=f"planner predicts no real gain ({predicted:.3f} vs {measured:.3f})")
    return Decision(measured, new, predicted, reason=f"imbalance {measured:.3f} > {policy.threshold}")


def coactivation(window: LoadWindow, current: Placement, num_experts: int) -> np.ndarray:
    """[L, E, E] Pearson correlation of per-interval expert loads: the paper's co-activation with each
    poll interval as a batch (the runtime exports counters, not per-token routing)."""
    per_interval = np.stack([expert_load_from_slots(current, s, num_experts)
                             for s in window.interval_slot_loads()])  # [B, L, E]
    centred = per_interval - per_interval.mean(axis=0)
    cov = np.einsum("ble,blf->lef", centred, centred)
    std = np.sqrt(np.einsum("lee->le", cov))
    denom = std[:, :, None] * std[:, None, :]
    corr = np.divide(cov, denom, out=np.zeros_like(cov), where=denom > 0)
    corr[:, np.arange(num_experts), np.arange(num_experts)] = 1.0
    return corr
