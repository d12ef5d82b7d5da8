"""rebalance.decide: when the operator re-places experts, from load snapshots alone."""

from __future__ import annotations

import numpy as np

from moe_operator.pods import LoadSnapshot
from moe_operator.rebalance import LoadWindow, Policy, decide
from moe_runtime.placement import round_robin

POLICY = Policy(threshold=1.2, window_seconds=10, cooldown_seconds=30, planner="greedy")
CURRENT = round_robin(num_layers=2, num_experts=8, num_ranks=2)  # rank 0: experts 0-3, rank 1: 4-7


def _snapshots(per_step_expert_load: np.ndarray, steps: int, start: float = 0.0, dt: float = 2.0):
    """Cumulative per-slot snapshots of a round-robin group fed the same expert load each interval."""
    counts = np.zeros((2, 2, 4), dtype=np.int64)  # [W, L, S]
    out = []
    for i in range(steps + 1):
        out.append(LoadSnapshot(start + i * dt, 0.0, CURRENT.version, counts.copy()))
        counts += per_step_expert_load.reshape(2, 2, 4).transpose(1, 0, 2)  # [L, E] -> [W, L, S]
    return out


def _window(snaps) -> LoadWindow:
    w = LoadWindow(keep_seconds=10)
    for s in snaps:
        w.add("g0", s)
    return w


SKEWED = np.array([[400, 300, 200, 100, 10, 10, 10, 10]] * 2)  # the hot experts all sit on rank 0


def test_persistent_imbalance_yields_a_better_placement():
    d = decide(_window(_snapshots(SKEWED, 6)), CURRENT, 8, POLICY, now=12.0, last_change=None)
    assert d.placement is not None and d.placement.version == CURRENT.version + 1
    assert d.imbalance > 1.8 and d.predicted < 1.1


def test_balanced_load_changes_nothing():
    d = decide(_window(_snapshots(np.full((2, 8), 50), 6)), CURRENT, 8, POLICY, now=12.0, last_change=None)
    assert d.placement is None and abs(d.imbalance - 1.0) < 1e-9


def test_no_decision_before_the_observation_window_is_covered():
    d = decide(_window(_snapshots(SKEWED, 3)), CURRENT, 8, POLICY, now=6.0, last_change=None)
    assert d.placement is None and d.imbalance is None


def test_cooldown_blocks_a_second_change():
    d = decide(_window(_snapshots(SKEWED, 6)), CURRENT, 8, POLICY, now=12.0, last_change=0.0)
    assert d.placement is None and "cooling down" in d.reason


def test_a_window_never_spans_a_placement_change():
    snaps = _snapshots(SKEWED, 6)
    w = _window(snaps[:5])
    moved = LoadSnapshot(snaps[5].timestamp, 0.0, CURRENT.version + 1, snaps[5].counts)
    w.add("g0", moved)
    d = decide(w, CURRENT.with_version(1), 8, POLICY, now=12.0, last_change=None)
    assert d.imbalance is None


def test_anti_correlation_plans_from_interval_coactivation():
    policy = Policy(threshold=1.2, window_seconds=10, cooldown_seconds=30, planner="anti_correlation")
    d = decide(_window(_snapshots(SKEWED, 6)), CURRENT, 8, policy, now=12.0, last_change=None)
    assert d.placement is not None and d.predicted < d.imbalance


def _group(ready: bool):
    from moe_operator.reconcile import GroupState

    pod = {"metadata": {"name": "d-g0-0"}, "status": {"phase": "Running", "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}}
    return GroupState(0, [pod], ranks=1)


def test_a_rollout_that_leaves_a_group_unready_past_the_timeout_goes_back_to_the_previous_version():
    from moe_operator.rollout import stuck_rollout

    recorded = {"lastRebalanceTime": "2026-01-01T00:00:00Z",
                "history": [{"version": 3, "reason": "InPlace"}, {"version": 4, "reason": "Rollout"}]}
    start = 1767225600.0  # 2026-01-01T00:00:00Z
    assert stuck_rollout(recorded, [_group(False)], start + 100, timeout=60) == 3
    assert stuck_rollout(recorded, [_group(False)], start + 30, timeout=60) is None  # still within time
    assert stuck_rollout(recorded, [_group(True)], start + 100, timeout=60) is None  # it went fine
    first = {"lastRebalanceTime": recorded["lastRebalanceTime"], "history": [{"version": 1, "reason": "Rollout"}]}
    assert stuck_rollout(first, [_group(False)], start + 100, timeout=60) == 0  # back to the initial v0
    rolled = {**recorded, "history": [*recorded["history"], {"version": 5, "reason": "Rollback"}]}
    assert stuck_rollout(rolled, [_group(False)], start + 100, timeout=60) is None  # never twice
