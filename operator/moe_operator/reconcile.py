"""Desired vs actual for one MoEDeployment: apply what render() wants, delete what it no longer wants,
label ranks, restart broken or stale groups as a whole, and compute the status.

All API traffic goes through `kube.Kube`; object shapes come from `render`; nothing here talks gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from moe_operator import render
from moe_operator.kube import Gone, Kube
from moe_operator.spec import DeploymentSpec, DeploymentStatus
from moe_runtime.placement import Placement, PlacementError

POD = ("v1", "Pod")
CHILD_KINDS = (render.STATEFULSET, render.SERVICE, render.CONFIGMAP, render.PDB, render.NETWORKPOLICY)


@dataclass
class GroupState:
    """What the pods of one serving group look like now."""

    group: int
    pods: list[dict[str, Any]] = field(default_factory=list)
    ranks: int = 1
    want_hash: str | None = None

    @property
    def complete(self) -> bool:
        return len(self.pods) == self.ranks and all(not _deleting(p) for p in self.pods)

    @property
    def ready(self) -> bool:
        return self.complete and all(_pod_ready(p) for p in self.pods)

    @property
    def broken(self) -> bool:
        """A rank died (its container restarted, or the pod failed): the group must restart whole."""
        return any(_restarts(p) > 0 or (p.get("status") or {}).get("phase") == "Failed" for p in self.pods)

    @property
    def stale(self) -> bool:
        """Some pod was made from another pod template than the StatefulSet's (Rollout, spec changes)."""
        return any(render.template_hash(p) != self.want_hash for p in self.pods)

    def leader_ip(self) -> str | None:
        for pod in self.pods:
            if render.rank_of_pod(pod["metadata"]["name"]) == 0 and _pod_ready(pod):
                return (pod.get("status") or {}).get("podIP")
        return None


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _deleting(pod: dict[str, Any]) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def _pod_ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])


def _restarts(pod: dict[str, Any]) -> int:
    return sum(int(c.get("restartCount") or 0) for c in (pod.get("status") or {}).get("containerStatuses") or [])


def current_placement(kube: Kube, spec: DeploymentSpec) -> Placement:
    """The placement in force: the pinned one, else the stable `<name>-placement` ConfigMap's, else the
    initial round-robin (a new deployment)."""
    if spec.rebalancing.pinned_placement is not None:
        return spec.rebalancing.pinned_placement
    return stored_placement(kube, spec) or spec.initial_placement()


def stored_placement(kube: Kube, spec: DeploymentSpec, version: int | None = None) -> Placement | None:
    name = render.placement_configmap_name(spec, version)
    try:
        data = kube.get(render.CONFIGMAP, spec.namespace, name).get("data") or {}
        placement = Placement.from_json(data["placement.json"])
        placement.validate(spec.model.num_experts, spec.model.num_layers)
        return placement
    except (Gone, KeyError, PlacementError):
        return None


def apply_children(kube: Kube, spec: DeploymentSpec, placement: Placement) -> dict[str, int]:
    """Create or repair every rendered child and delete obsolete ones; counts by outcome."""
    counts: dict[str, int] = {}
    for obj in render.render_all(spec, placement):
        outcome = kube.apply(obj)
        counts[outcome] = counts.get(outcome, 0) + 1
    existing = {key: [o["metadata"]["name"] for o in kube.list(key, spec.namespace, render.selector_labels(spec))]
                for key in CHILD_KINDS}
    for key, names in render.obsolete(spec, placement, existing).items():
        for name in names:
            kube.delete(key, spec.namespace, name)
            counts["deleted"] = counts.get("deleted", 0) + 1
    return counts


def delete_children(kube: Kube, spec: DeploymentSpec) -> int:
    """Everything the deployment owns, pods included (no reliance on garbage collection)."""
    deleted = 0
    for key in (*CHILD_KINDS, POD):
        for obj in kube.list(key, spec.namespace, render.selector_labels(spec)):
            deleted += kube.delete(key, spec.namespace, obj["metadata"]["name"])
    return deleted


def observe_groups(kube: Kube, spec: DeploymentSpec) -> list[GroupState]:
    """Pods grouped by serving group, with each StatefulSet's wanted template hash; labels rank pods."""
    groups = {g: GroupState(g, ranks=spec.expert_parallel_size) for g in range(spec.replicas)}
    for sts in kube.list(render.STATEFULSET, spec.namespace, render.selector_labels(spec)):
        group = int(sts["metadata"]["labels"].get(render.LABEL_GROUP, -1))
        if group in groups:
            groups[group].want_hash = render.template_hash(sts)
    for pod in kube.list(POD, spec.namespace, render.selector_labels(spec)):
        group = int(pod["metadata"].get("labels", {}).get(render.LABEL_GROUP, -1))
        if group not in groups:
            continue
        patch = render.rank_label_patch(pod)
        if patch is not None:
            kube.patch(POD, spec.namespace, pod["metadata"]["name"], patch)
        groups[group].pods.append(pod)
    return [groups[g] for g in sorted(groups)]


def restart_group(kube: Kube, spec: DeploymentSpec, group: GroupState) -> None:
    """Delete every pod of the group: its StatefulSet (OnDelete) recreates them together."""
    for pod in group.pods:
        kube.delete(POD, spec.namespace, pod["metadata"]["name"])


def repair_groups(kube: Kube, spec: DeploymentSpec, groups: Iterable[GroupState]) -> list[int]:
    """Restart broken groups now, stale groups that are down anyway, and stale ready groups while at most
    maxUnavailable groups are down."""
    groups = list(groups)
    restarted = [g for g in groups if g.broken]
    down = sum(1 for g in groups if not g.ready)
    for g in groups:
        if not g.stale or g.broken or not g.complete:
            continue
        if not g.ready:  # already down: restarting it onto the current template costs no availability
            restarted.append(g)
        elif down < spec.rollout.max_unavailable:
            restarted.append(g)
            down += 1
    for g in restarted:
        restart_group(kube, spec, g)
    return [g.group for g in restarted]


def condition(type_: str, ok: bool, reason: str, message: str, spec: DeploymentSpec,
              previous: DeploymentStatus) -> dict[str, Any]:
    status = "True" if ok else "False"
    old = previous.condition(type_)
    when = old.last_transition_time if old is not None and old.status == status else now_rfc3339()
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": when, "observedGeneration": spec.generation}


def status_patch(spec: DeploymentSpec, groups: list[GroupState], placement: Placement,
                 previous: DeploymentStatus) -> dict[str, Any]:
    """replicas / readyReplicas / updatedReplicas / selector, Ready and Progressing conditions."""
    ready = sum(g.ready for g in groups)
    updated = sum(1 for g in groups if g.complete and not g.stale)
    all_ready = ready == spec.replicas
    progressing = updated < spec.replicas or not all_ready
    return {
        "observedGeneration": spec.generation, "replicas": spec.replicas, "readyReplicas": ready,
        "updatedReplicas": updated, "selector": render.status_selector(spec),
        "placement": {"currentVersion": placement.version},
        "conditions": [
            condition("Ready", all_ready, "AllGroupsReady" if all_ready else "GroupsNotReady",
                      f"{ready}/{spec.replicas} serving groups ready", spec, previous),
            condition("Progressing", progressing, "RollingOut" if progressing else "Stable",
                      f"{updated}/{spec.replicas} groups on the current template", spec, previous),
        ],
    }
