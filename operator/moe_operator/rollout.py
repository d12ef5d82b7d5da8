"""The load loop's actions: read each ready leader's expert load, decide, and roll a new placement out.

InPlace: ApplyPlacement on each group's leader, one group at a time, checking health in between; a
failure re-applies the previous body under a newer version (versions only grow) and reports Degraded.
Rollout: write the new placement; the StatefulSets' template changes and reconcile restarts groups
within maxUnavailable. Kubernetes I/O goes through kube.py, runtime I/O through pods.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

from moe_operator import pods, render
from moe_operator.kube import Kube
from moe_operator.rebalance import Decision, LoadWindow, Policy, decide
from moe_operator.reconcile import GroupState
from moe_operator.spec import DeploymentSpec
from moe_runtime.placement import Placement


@dataclass
class LoopState:
    """Per deployment, in the operator's memory: the load window and when the placement last changed."""

    window: LoadWindow
    last_change: float | None = None
    history: list[dict] = field(default_factory=list)


class RolloutFailed(Exception):
    """A group refused the placement or did not come back healthy; `restore` (the previous body under a
    newer version) was applied to the groups already switched."""

    def __init__(self, message: str, restore: Placement | None = None):
        super().__init__(message)
        self.restore = restore


def policy_of(spec: DeploymentSpec) -> Policy:
    r = spec.rebalancing
    return Policy(threshold=r.imbalance_threshold, window_seconds=r.observation_window_seconds,
                  cooldown_seconds=r.cooldown_seconds, planner=r.planner, redundant_slots=r.redundant_slots)


def admin_address(spec: DeploymentSpec, ip: str) -> str:
    return f"{ip}:{spec.serving.admin_port}"


def observe_load(spec: DeploymentSpec, groups: list[GroupState], state: LoopState, timeout: float) -> int:
    """Add a load snapshot of every ready group's leader to the window; the number read."""
    read = 0
    for g in groups:
        ip = g.leader_ip()
        if ip is None or not g.ready:
            continue
        try:
            state.window.add(str(g.group), pods.expert_load(admin_address(spec, ip), timeout))
            read += 1
        except pods.PodUnreachable:
            continue
    return read


def consider(spec: DeploymentSpec, current: Placement, state: LoopState, now: float) -> Decision:
    return decide(state.window, current, spec.model.num_experts, policy_of(spec), now, state.last_change)


def write_revision(kube: Kube, spec: DeploymentSpec, placement: Placement, *, current: bool) -> None:
    """The immutable `<name>-placement-<version>` ConfigMap, and the stable one too when `current`."""
    stable, versioned = render.render_placement_configmaps(spec, placement)
    kube.apply(versioned)
    if current:
        kube.apply(stable)


def apply_in_place(spec: DeploymentSpec, groups: list[GroupState], new: Placement, previous: Placement,
                   timeout: float) -> int:
    """ApplyPlacement group by group; bytes copied. On a failure, restore `previous` (as version
    new+1) on the groups already switched and raise RolloutFailed."""
    done: list[GroupState] = []
    copied = 0
    try:
        for g in groups:
            ip = g.leader_ip()
            if ip is None:
                raise RolloutFailed(f"group {g.group} has no ready leader")
            _, moved = pods.apply_placement(admin_address(spec, ip), new, timeout)
            done.append(g)
            copied += moved
            if not pods.is_serving(f"{ip}:{spec.serving.grpc_port}", timeout):
                raise RolloutFailed(f"group {g.group} is not serving after the switch")
    except (pods.PodUnreachable, pods.PlacementRejected, RolloutFailed) as exc:
        restore = previous.with_version(new.version + 1)
        for g in done:
            ip = g.leader_ip()
            # A group that refuses even this is broken: reconcile restarts it from the stable ConfigMap.
            with contextlib.suppress(pods.PodUnreachable, pods.PlacementRejected):
                if ip is not None:
                    pods.apply_placement(admin_address(spec, ip), restore, timeout)
        raise RolloutFailed(str(exc), restore) from exc
    return copied


def converge(spec: DeploymentSpec, groups: list[GroupState], desired: Placement, timeout: float) -> list[int]:
    """Bring every ready group whose leader runs an older placement to `desired` (a pinned placement
    that changed, a rollout the operator resumes after a restart); the groups switched."""
    switched = []
    for g in groups:
        ip = g.leader_ip()
        if ip is None or not g.ready:
            continue
        try:
            if pods.placement(admin_address(spec, ip), timeout).version < desired.version:
                pods.apply_placement(admin_address(spec, ip), desired, timeout)
                switched.append(g.group)
        except (pods.PodUnreachable, pods.PlacementRejected):
            continue  # reconcile restarts a broken group from the stable ConfigMap
    return switched


def stuck_rollout(recorded: dict, groups: list[GroupState], now: float, timeout: float) -> int | None:
    """In Rollout mode: the placement version to go back to when the last rollout left some group not
    ready for longer than `timeout` seconds, else None. `recorded` is status.placement."""
    history = recorded.get("history") or []
    started = recorded.get("lastRebalanceTime")
    if not history or history[-1].get("reason") != "Rollout" or not started:
        return None
    if all(g.ready for g in groups):
        return None
    elapsed = now - datetime.strptime(started, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    if elapsed < timeout:
        return None
    return int(history[-2]["version"]) if len(history) > 1 else 0
