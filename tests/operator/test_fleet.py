"""Fleet simulation: emulator + operator + real runtime processes (1 group x 2 gloo ranks, loopback).

Held-out text through gRPC, routed by the trained demo model's hot experts, makes one rank the
straggler; the operator sees it in GetExpertLoad, plans, applies the new placement in place, and the measured balance moves to what the planner predicted,
with no request failing meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from moe_operator.__main__ import running
from moe_operator.config import OperatorConfig
from moe_operator.emulator import running_cluster
from moe_operator.emulator.fleet import Fleet
from moe_operator.pods import PodUnreachable, expert_load, placement
from moe_runtime.placement import Placement, expert_load_from_slots, imbalance, rank_loads, round_robin
from moe_runtime.testing import SkewedLoad, heldout_prompts

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "moedeployments.serving.moefleet.dev.yaml"
MANIFEST = ROOT / "examples" / "moedeployment-demo.yaml"  # what `make demo` runs
MODEL = ROOT / "models" / "tiny-stdlib-moe"
CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
MOEDS = "/apis/serving.moefleet.dev/v1alpha1/namespaces/default/moedeployments"


def _send(method: str, url: str, path: str, body: dict, content_type: str) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method=method,
                                 headers={"Content-Type": content_type})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _post(url: str, path: str, body: dict) -> dict:
    return _send("POST", url, path, body, "application/json")


def _patch(url: str, path: str, body: dict) -> dict:
    return _send("PATCH", url, path, body, "application/merge-patch+json")


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def _cluster_and_fleet(tmp_path, **fleet_options):
    """The emulator with the CRD applied, and the fleet harness running real runtime pods over it."""
    with running_cluster(tmp_path / "kubeconfig") as cluster:
        _post(cluster.url, CRDS, yaml.safe_load(CRD.read_text()))
        fleet_options.setdefault("volumes", {"models": str(MODEL.parent)})
        with Fleet(cluster.url, "default", tmp_path / "fleet", str(ROOT / "runtime"), **fleet_options) as fleet:
            yield cluster, fleet


def _operator_config(cluster, **overrides) -> OperatorConfig:
    return OperatorConfig(kubeconfig=str(cluster.kubeconfig), load_poll_seconds=1.0, rpc_timeout_seconds=15.0,
                          **overrides)


def _status(cluster, name: str) -> dict:
    return _get(cluster.url, f"{MOEDS}/{name}").get("status") or {}


def _deploy_and_wait_ready(cluster, deployment: dict) -> None:
    _post(cluster.url, MOEDS, deployment)
    name = deployment["metadata"]["name"]
    _wait(lambda: _status(cluster, name).get("readyReplicas") == 1, 120, "group ready")


def _events(cluster) -> set[str]:
    return {e.get("reason") for e in _get(cluster.url, "/api/v1/namespaces/default/events").get("items", [])}


def _rollout_manifest() -> dict:
    deployment = yaml.safe_load(MANIFEST.read_text())
    deployment["spec"]["rebalancing"]["mode"] = "Rollout"
    return deployment


def _window_imbalance(admin: str, seconds: float) -> tuple[float, np.ndarray, object]:
    first = expert_load(admin, timeout=30)
    time.sleep(seconds)
    last = expert_load(admin, timeout=30)
    assert first.placement_version == last.placement_version
    delta = (last.counts - first.counts)  # [W, L, S]
    slots = delta.transpose(1, 0, 2).reshape(delta.shape[1], -1)  # [L, P]
    return imbalance(delta.sum(axis=2).T), slots, last.placement_version


def _serving_placement(admin: str, version: int):
    """The leader's placement once it is at least `version`; None while it restarts or is older."""
    try:
        live = placement(admin, timeout=5)
    except PodUnreachable:
        return None
    return live if live.version >= version else None


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _new_revision(cluster, fleet, name: str = "demo") -> None:
    """Drive the demo model's skewed load until the operator records placement revision 1 or later."""
    with SkewedLoad(f"{fleet.pod_ip(f'{name}-g0-0')}:8001", heldout_prompts(MODEL, count=6)):
        _wait(lambda: _status(cluster, name).get("placement", {}).get("currentVersion", 0) >= 1, 120,
              "a new placement revision")


@pytest.mark.timeout(240)
def test_operator_rebalances_a_skewed_group_in_place_and_then_follows_a_pinned_placement(tmp_path):
    prompts = heldout_prompts(MODEL, count=6)  # real text: the trained model's hot experts skew the ranks
    with _cluster_and_fleet(tmp_path) as (cluster, fleet), running(_operator_config(cluster), ["default"]):
        _deploy_and_wait_ready(cluster, yaml.safe_load(MANIFEST.read_text()))
        leader_ip = fleet.pod_ip("demo-g0-0")
        admin, grpc_address = f"{leader_ip}:8003", f"{leader_ip}:8001"
        before = placement(admin)
        with SkewedLoad(grpc_address, prompts) as load:
            skewed, slot_load, _ = _window_imbalance(admin, 4.0)
            status = _wait(lambda: (s := _status(cluster, "demo")).get("placement", {}).get(
                "currentVersion", 0) >= 1 and s, 90, "a new placement")
            after_placement = placement(admin)
            balanced, _, version = _window_imbalance(admin, 4.0)
            pinned = after_placement.with_version(after_placement.version + 5)
            pinned_spec = {"version": pinned.version, "numRanks": 2, "slotsPerRank": pinned.slots_per_rank,
                           "slots": [list(reversed(layer)) for layer in pinned.slots]}
            _patch(cluster.url, f"{MOEDS}/demo", {"spec": {"rebalancing": {"pinnedPlacement": pinned_spec}}})
            live = _wait(lambda: (p := placement(admin)).version == pinned.version and p, 60, "the pinned placement")
        events = _events(cluster)
    expert = expert_load_from_slots(before, slot_load, 8)
    predicted = imbalance(rank_loads(after_placement, expert))
    assert load.failed == 0, load.errors[:3]
    assert skewed > 1.15 and version == after_placement.version >= 1  # over the manifest's threshold
    assert balanced < skewed and balanced == pytest.approx(predicted, abs=0.1)
    assert status["placement"]["history"][-1]["version"] == after_placement.version
    assert {"Rebalancing", "PlacementApplied"} <= events
    assert [list(layer) for layer in live.slots] == pinned_spec["slots"]  # a pinned placement applies live


@pytest.mark.timeout(240)
def test_a_dead_rank_restarts_its_whole_group(tmp_path):
    deployment = yaml.safe_load((ROOT / "examples" / "moedeployment-tiny.yaml").read_text())
    deployment["spec"]["rebalancing"] = {"mode": "Off"}
    with _cluster_and_fleet(tmp_path) as (cluster, fleet), running(_operator_config(cluster), ["default"]):
        _deploy_and_wait_ready(cluster, deployment)
        pods = "/api/v1/namespaces/default/pods"
        uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in _get(cluster.url, pods)["items"]}
        fleet.kill_process("tiny-g0-1")  # a follower rank crashes; its leader loses the peer too

        def recreated() -> bool:
            now = {p["metadata"]["name"]: p["metadata"]["uid"] for p in _get(cluster.url, pods)["items"]}
            return set(now) == set(uids) and all(now[n] != uids[n] for n in uids)

        _wait(recreated, 90, "both pods of the group to be recreated")
        _wait(lambda: _status(cluster, "tiny").get("readyReplicas") == 1, 120, "the group to serve again")
        events = _events(cluster)
    assert "GroupRestarted" in events


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_rollout_mode_restarts_groups_onto_the_new_placement(tmp_path):
    """Rollout: the new placement goes into the pod template; groups restart within maxUnavailable and
    load it from the placement ConfigMap."""
    with _cluster_and_fleet(tmp_path) as (cluster, fleet), running(_operator_config(cluster), ["default"]):
        _deploy_and_wait_ready(cluster, _rollout_manifest())
        _new_revision(cluster, fleet)
        # The group restarts (new pods) and its leader loads the new revision from the ConfigMap.
        live = _wait(lambda: (ip := fleet.pod_ip("demo-g0-0")) and _serving_placement(f"{ip}:8003", 1), 180,
                     "the restarted leader on the new placement")
    assert live.version >= 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_rollout_whose_groups_never_get_ready_is_rolled_back(tmp_path):
    """Rollout mode, and pods of the new template never start: after groupReadyTimeoutSeconds the operator
    restores the previous placement body (as a newer version), marks Degraded, and the group serves."""
    initial = round_robin(4, 8, 2).digest()

    def refuse(template: dict) -> bool:
        return template["metadata"]["annotations"].get("serving.moefleet.dev/placement-digest") != initial

    with _cluster_and_fleet(tmp_path, refuse=refuse) as (cluster, fleet), \
            running(_operator_config(cluster, group_ready_timeout_seconds=5.0), ["default"]):
        _deploy_and_wait_ready(cluster, _rollout_manifest())
        _new_revision(cluster, fleet)
        status = _wait(lambda: (s := _status(cluster, "demo")).get("placement", {}).get(
            "history", [{}])[-1].get("reason") == "Rollback" and s, 120, "the rollback")
        live = _wait(lambda: (ip := fleet.pod_ip("demo-g0-0")) and _serving_placement(f"{ip}:8003", 2), 120,
                     "the group serving the restored placement")
        events = _events(cluster)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "RolloutFailed"
    assert live.digest() == initial and live.version == status["placement"]["currentVersion"] == 2
    assert "RolloutFailed" in events


@pytest.mark.timeout(240)
def test_an_operator_restarted_mid_rollout_finishes_it(tmp_path):
    """The operator died after writing placement revision 1 and recording it as the target, before any
    group switched: the next operator applies it in place and makes it current."""
    deployment = yaml.safe_load(MANIFEST.read_text())
    deployment["spec"]["rebalancing"]["imbalanceThreshold"] = 50.0  # no change of its own
    with _cluster_and_fleet(tmp_path) as (cluster, fleet):
        config = _operator_config(cluster)
        with running(config, ["default"]):
            _deploy_and_wait_ready(cluster, deployment)
        initial = round_robin(4, 8, 2)
        target = Placement(1, 2, 4, tuple(tuple(reversed(layer)) for layer in initial.slots))
        _post(cluster.url, "/api/v1/namespaces/default/configmaps", {
            "apiVersion": "v1", "kind": "ConfigMap", "immutable": True,
            "metadata": {"name": "demo-placement-1", "labels": {"serving.moefleet.dev/deployment": "demo"}},
            "data": {"placement.json": target.to_json()}})
        _patch(cluster.url, f"{MOEDS}/demo/status", {"status": {"placement": {"targetVersion": 1, "currentVersion": 0}}})
        with running(config, ["default"]):
            live = _wait(lambda: _serving_placement(f"{fleet.pod_ip('demo-g0-0')}:8003", 1), 60,
                         "the leader on the target placement")
            status = _wait(lambda: (s := _status(cluster, "demo")).get("placement", {}).get(
                "currentVersion") == 1 and s, 60, "the rollout recorded as done")
    assert live.same_body(target)
    assert status["placement"]["targetVersion"] == 1
