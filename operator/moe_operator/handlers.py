"""Every kopf handler of the operator, registered on a registry by `register(registry, config)`.

Handlers are thin: parse the spec, call reconcile/rollout, patch status, post events. Errors are triaged:
an invalid spec becomes a Degraded condition and an event (never a retry loop); API or pod trouble is a
kopf.TemporaryError with a delay; a vanished object is ignored.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from moe_operator import kube as kube_io
from moe_operator import reconcile, rollout
from moe_operator.config import OperatorConfig
from moe_operator.metrics import OperatorMetrics
from moe_operator.rebalance import LoadWindow
from moe_operator.spec import GROUP, PLURAL, VERSION, DeploymentSpec, DeploymentStatus, SpecError
from moe_runtime.placement import Placement

HISTORY = 10  # placement records kept in status


class Operator:
    """What the handlers share: config, the API door, metrics, per-deployment loop state."""

    def __init__(self, config: OperatorConfig, metrics: OperatorMetrics):
        self.config, self.metrics = config, metrics
        self._kube: kube_io.Kube | None = None
        self.loops: dict[str, rollout.LoopState] = {}

    @property
    def kube(self) -> kube_io.Kube:
        if self._kube is None:
            self._kube = kube_io.Kube(self.config.kubeconfig or None)
        return self._kube

    def parse(self, body, patch, logger) -> DeploymentSpec | None:
        """The typed spec, or None after recording why it cannot be served (status + event)."""
        try:
            return DeploymentSpec.from_resource(body, default_image=self.config.runtime_image)
        except SpecError as exc:
            self.metrics.errors.labels("invalid_spec").inc()
            previous = DeploymentStatus.from_resource(body)
            generation = int(body.get("metadata", {}).get("generation") or 0)
            patch.status["observedGeneration"] = generation
            patch.status["conditions"] = [_degraded("InvalidSpec", str(exc), generation, previous)]
            kopf.warn(body, reason="InvalidSpec", message=str(exc))
            logger.warning("invalid spec: %s", exc)
            return None

    def loop_state(self, spec: DeploymentSpec) -> rollout.LoopState:
        key = spec.uid or f"{spec.namespace}/{spec.name}"
        if key not in self.loops:
            window = max(spec.rebalancing.observation_window_seconds * 2, 60)
            self.loops[key] = rollout.LoopState(LoadWindow(window))
        return self.loops[key]


def _degraded(reason: str, message: str, generation: int, previous: DeploymentStatus) -> dict[str, Any]:
    old = previous.condition("Degraded")
    when = old.last_transition_time if old is not None and old.status == "True" else reconcile.now_rfc3339()
    return {"type": "Degraded", "status": "True", "reason": reason, "message": message,
            "lastTransitionTime": when, "observedGeneration": generation}


def _transient(op: Operator, exc: Exception) -> kopf.TemporaryError:
    op.metrics.errors.labels("transient").inc()
    return kopf.TemporaryError(str(exc), delay=max(1.0, op.config.load_poll_seconds))


def reconcile_deployment(op: Operator, body, patch, logger):
    """Apply the rendered children and patch the status; (spec, groups), or None for an invalid spec."""
    spec = op.parse(body, patch, logger)
    if spec is None:
        return None
    op.metrics.reconciles.labels("reconcile").inc()
    try:
        placement = reconcile.current_placement(op.kube, spec)
        counts = reconcile.apply_children(op.kube, spec, placement)
        groups = reconcile.observe_groups(op.kube, spec)
    except (kube_io.Transient, kube_io.Gone) as exc:
        raise _transient(op, exc) from exc
    if counts.get("created") or counts.get("patched") or counts.get("deleted"):
        kopf.info(body, reason="Reconciled", message=", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    previous = DeploymentStatus.from_resource(body)
    patch.status.update(reconcile.status_patch(spec, groups, placement, previous))
    patch.status["conditions"] = [*patch.status["conditions"], _healthy(spec, previous)]
    return spec, groups


def _healthy(spec: DeploymentSpec, previous: DeploymentStatus) -> dict[str, Any]:
    old = previous.condition("Degraded")
    if old is not None and old.status == "True" and old.reason == "RolloutFailed":
        return {"type": old.type, "status": old.status, "reason": old.reason, "message": old.message,
                "lastTransitionTime": old.last_transition_time, "observedGeneration": spec.generation}
    return reconcile.condition("Degraded", False, "AsExpected", "spec accepted", spec, previous)


def tick(op: Operator, body, patch, logger) -> None:
    """The periodic pass: repair drift, restart broken or stale groups, watch load, re-place experts."""
    done = reconcile_deployment(op, body, patch, logger)
    if done is None:
        return
    spec, groups = done
    try:
        restarted = reconcile.repair_groups(op.kube, spec, groups)
    except (kube_io.Transient, kube_io.Gone) as exc:
        raise _transient(op, exc) from exc
    for g in restarted:
        op.metrics.group_restarts.labels(spec.name).inc()
        kopf.warn(body, reason="GroupRestarted", message=f"serving group {g} restarted as a whole")
    if spec.rebalancing.mode == "Rollout":
        roll_back_if_stuck(op, spec, groups, body, patch)
    if restarted or not groups or not all(g.ready for g in groups):
        return
    if spec.rebalancing.mode != "Rollout":  # Rollout changes placements by restarting groups instead
        converge(op, spec, groups, body, patch)
    if spec.rebalancing.automatic:
        rebalance(op, spec, groups, body, patch, logger)


def roll_back_if_stuck(op: Operator, spec: DeploymentSpec, groups, body, patch) -> None:
    """A Rollout whose restarted groups do not become ready within groupReadyTimeoutSeconds goes back to
    the previous placement body (under a newer version: versions only grow) and sets Degraded."""
    recorded = (body.get("status") or {}).get("placement") or {}
    back_to = rollout.stuck_rollout(recorded, groups, time.time(), op.config.group_ready_timeout_seconds)
    previous = None if back_to is None else reconcile.stored_placement(op.kube, spec, back_to)
    if previous is None:
        return
    current = reconcile.current_placement(op.kube, spec)
    restore = previous.with_version(current.version + 1)
    rollout.write_revision(op.kube, spec, restore, current=True)
    reconcile.apply_children(op.kube, spec, restore)  # the template goes back: groups restart onto it
    op.metrics.errors.labels("rollout").inc()
    message = (f"placement v{current.version} left groups unready for {op.config.group_ready_timeout_seconds:g} s: "
               f"rolled back to the body of v{back_to} as v{restore.version}")
    previous_status = DeploymentStatus.from_resource(body)
    patch.status["conditions"] = [c for c in patch.status.get("conditions", []) if c["type"] != "Degraded"]
    patch.status["conditions"].append(_degraded("RolloutFailed", message, spec.generation, previous_status))
    kopf.warn(body, reason="RolloutFailed", message=message)
    _record(op, spec, restore, "Rollback", body, patch)


def converge(op: Operator, spec: DeploymentSpec, groups, body, patch) -> None:
    """Leaders follow the stable placement (pinned changes apply live); a rollout interrupted by an
    operator restart (targetVersion > currentVersion) is finished."""
    recorded = (body.get("status") or {}).get("placement") or {}
    target_version, current_version = recorded.get("targetVersion"), recorded.get("currentVersion")
    target = None
    if target_version is not None and current_version is not None and target_version > current_version:
        target = reconcile.stored_placement(op.kube, spec, target_version)
    desired = target or reconcile.current_placement(op.kube, spec)
    switched = rollout.converge(spec, groups, desired, op.config.rpc_timeout_seconds * 6)
    if switched:
        kopf.info(body, reason="PlacementApplied", message=f"v{desired.version} applied in place to group(s) "
                                                           f"{switched}")
    if target is not None:
        rollout.write_revision(op.kube, spec, target, current=True)
        _record(op, spec, target, "InPlace", body, patch)


def rebalance(op: Operator, spec: DeploymentSpec, groups, body, patch, logger) -> None:
    state = op.loop_state(spec)
    current = reconcile.current_placement(op.kube, spec)
    rollout.observe_load(spec, groups, state, op.config.rpc_timeout_seconds)
    now = time.time()
    decision = rollout.consider(spec, current, state, now)
    if decision.imbalance is not None:
        op.metrics.imbalance.labels(spec.name).set(decision.imbalance)
        patch.status.setdefault("placement", {})["imbalance"] = round(decision.imbalance, 4)
    if decision.placement is None:
        return
    new = decision.placement
    kopf.info(body, reason="Rebalancing", message=f"{decision.reason}: placement v{new.version} predicted "
                                                  f"imbalance {decision.predicted:.3f}")
    rollout.write_revision(op.kube, spec, new, current=spec.rebalancing.mode == "Rollout")
    patch.status.setdefault("placement", {})["targetVersion"] = new.version
    if spec.rebalancing.mode == "InPlace":
        _roll_in_place(op, spec, groups, new, current, body, patch)
    else:
        reconcile.apply_children(op.kube, spec, new)  # new template hash: groups restart within maxUnavailable
        _record(op, spec, new, "Rollout", body, patch)
    state.last_change, state.window = now, LoadWindow(state.window.keep_seconds)


def _roll_in_place(op: Operator, spec, groups, new: Placement, current: Placement, body, patch) -> None:
    try:
        copied = rollout.apply_in_place(spec, groups, new, current, op.config.rpc_timeout_seconds * 6)
    except rollout.RolloutFailed as exc:
        op.metrics.errors.labels("rollout").inc()
        if exc.restore is not None:
            rollout.write_revision(op.kube, spec, exc.restore, current=True)
            patch.status["placement"].update(currentVersion=exc.restore.version, targetVersion=exc.restore.version)
        previous = DeploymentStatus.from_resource(body)
        patch.status["conditions"] = [c for c in patch.status.get("conditions", []) if c["type"] != "Degraded"]
        patch.status["conditions"].append(_degraded("RolloutFailed", str(exc), spec.generation, previous))
        kopf.warn(body, reason="RolloutFailed", message=f"placement v{new.version} rolled back: {exc}")
        return
    rollout.write_revision(op.kube, spec, new, current=True)
    kopf.info(body, reason="PlacementApplied", message=f"v{new.version} applied in place to "
                                                       f"{len(groups)} group(s), {copied} bytes copied")
    _record(op, spec, new, "InPlace", body, patch)


def _record(op: Operator, spec: DeploymentSpec, new: Placement, mode: str, body, patch) -> None:
    op.metrics.rebalances.labels(spec.name, mode).inc()
    when = reconcile.now_rfc3339()
    history = list((body.get("status") or {}).get("placement", {}).get("history") or [])
    record = {"version": new.version, "time": when, "reason": mode}
    imbalance = patch.status.get("placement", {}).get("imbalance")
    if imbalance is not None:  # the schema wants a number or nothing
        record["imbalance"] = imbalance
    history.append(record)
    placement = patch.status.setdefault("placement", {})
    placement.update(currentVersion=new.version, targetVersion=new.version, lastRebalanceTime=when,
                     history=history[-HISTORY:])


def cleanup(op: Operator, body, logger) -> None:
    try:
        spec = DeploymentSpec.from_resource(body, default_image=op.config.runtime_image)
    except SpecError:
        return  # nothing was ever rendered for it
    try:
        deleted = reconcile.delete_children(op.kube, spec)
    except kube_io.Transient as exc:
        raise _transient(op, exc) from exc
    op.loops.pop(spec.uid or f"{spec.namespace}/{spec.name}", None)
    logger.info("deleted %d children of %s", deleted, spec.name)


def register(registry: kopf.OperatorRegistry, config: OperatorConfig, metrics: OperatorMetrics) -> Operator:
    op = Operator(config, metrics)
    resource = dict(group=GROUP, version=VERSION, plural=PLURAL, registry=registry)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = f"{GROUP}/cleanup"
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 60
        settings.networking.request_timeout = 30

    @kopf.on.login(registry=registry)
    def login(**_: Any):
        return kube_io.connection_info(config.kubeconfig or None)

    @kopf.on.resume(**resource, id="reconcile-on-resume")
    @kopf.on.create(**resource, id="reconcile")
    @kopf.on.update(**resource, id="reconcile-on-update", field="spec")
    def on_change(body, patch, logger, **_: Any) -> None:
        reconcile_deployment(op, body, patch, logger)

    @kopf.timer(**resource, id="observe", interval=config.load_poll_seconds, idle=None)
    def on_timer(body, patch, logger, **_: Any) -> None:
        tick(op, body, patch, logger)

    @kopf.on.delete(**resource, id="cleanup")
    def on_delete(body, logger, **_: Any) -> None:
        cleanup(op, body, logger)

    return op
