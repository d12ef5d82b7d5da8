"""render.py: the objects a MoEDeployment becomes, their shapes, and that they are valid Kubernetes."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from moe_operator import render
from moe_operator.spec import DeploymentSpec
from moe_runtime.placement import Placement, round_robin

ROOT = Path(__file__).resolve().parents[2]
KUBE_VERSION = "1.32"  # grpc probes (1.27), PDB unhealthyPodEvictionPolicy, NetworkPolicy endPort


def load(name: str, **spec_changes) -> DeploymentSpec:
    obj = yaml.safe_load((ROOT / "examples" / name).read_text())
    obj["metadata"].update(namespace="serving", uid="0b7c-uid")
    obj["spec"].update(spec_changes)
    return DeploymentSpec.from_resource(obj)


@pytest.fixture
def tiny() -> DeploymentSpec:
    return load("moedeployment-tiny.yaml")


@pytest.fixture
def mixtral() -> DeploymentSpec:
    return load("moedeployment-mixtral.yaml")


def by_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def container(sts: dict, name: str = "runtime") -> dict:
    pod = sts["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def env(c: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


def test_one_statefulset_per_group_with_a_pod_per_rank(mixtral):
    objects = render.render_all(mixtral, mixtral.initial_placement())
    sets = by_kind(objects, "StatefulSet")
    assert [s["metadata"]["name"] for s in sets] == ["mixtral-g0", "mixtral-g1"]
    for group, sts in enumerate(sets):
        spec = sts["spec"]
        assert spec["replicas"] == 2 and spec["serviceName"] == "mixtral-ranks"
        assert spec["podManagementPolicy"] == "Parallel" and spec["updateStrategy"] == {"type": "OnDelete"}
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"] == labels
        assert labels == {"app.kubernetes.io/name": "moe-runtime", "app.kubernetes.io/instance": "mixtral",
                          "serving.moefleet.dev/deployment": "mixtral",
                          "serving.moefleet.dev/group": str(group)}


def test_pods_get_the_rendezvous_env_contract(mixtral):
    sts = render.render_statefulset(mixtral, mixtral.initial_placement(), 1)
    variables = env(container(sts))
    assert variables["MOE_LEADER_ADDRESS"] == "mixtral-g1-0.mixtral-ranks.serving.svc:29500"
    assert variables["MOE_GROUP_SIZE"] == "2"
    assert variables["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert variables["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert "MOE_WORKER_INDEX" not in variables  # the runtime takes POD_NAME's ordinal
    assert render.rank_of_pod("mixtral-g1-1") == 1 and render.rank_of_pod("mixtral-g1-x") is None


def test_runtime_command_reads_the_mounted_config_and_binds_admin_to_the_pod(tiny):
    c = container(render.render_statefulset(tiny, tiny.initial_placement(), 0))
    assert c["command"] == ["moe-runtime", "serve", "--config", "/etc/moe/runtime.yaml", "--placement",
                            "/etc/moe/placement/placement.json", "--admin-bind-address", "$(POD_IP)"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": 8001, "metrics": 8002, "admin": 8003, "rendezvous": 29500}


def test_probes_are_grpc_health_with_a_long_startup(mixtral):
    c = container(render.render_statefulset(mixtral, mixtral.initial_placement(), 0))
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"] == {"port": 8001}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800
    liveness = c["livenessProbe"]
    assert liveness["periodSeconds"] * liveness["failureThreshold"] > mixtral.serving.drain_grace_seconds


def test_prestop_drains_and_the_grace_period_covers_it(mixtral):
    sts = render.render_statefulset(mixtral, mixtral.initial_placement(), 0)
    hook = container(sts)["lifecycle"]["preStop"]["exec"]["command"]
    assert hook[:2] == ["sh", "-c"] and 'moe-client drain --address "$POD_IP:8003"' in hook[2]
    assert sts["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 120


def test_containers_run_non_root_with_a_read_only_root_and_no_capabilities(mixtral):
    pod = render.render_statefulset(mixtral, mixtral.initial_placement(), 0)["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 10001
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for c in pod["containers"] + pod["initContainers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] and sc["runAsUser"] == 10001 and sc["readOnlyRootFilesystem"]
        assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}


def test_volumes_give_config_placement_model_and_writable_scratch(mixtral):
    pod = render.render_statefulset(mixtral, mixtral.initial_placement(), 0)["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["runtime-config"]["configMap"]["name"] == "mixtral-runtime"
    assert volumes["placement"]["configMap"]["name"] == "mixtral-placement"
    assert volumes["model"]["persistentVolumeClaim"] == {"claimName": "mixtral-8x7b-instruct"}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory"}
    mounts = {m["mountPath"]: m for m in container({"spec": {"template": {"spec": pod}}})["volumeMounts"]}
    assert mounts["/etc/moe/runtime.yaml"]["subPath"] == "runtime.yaml"
    assert mounts["/etc/moe/placement"]["readOnly"] and mounts["/models"]["readOnly"]
    assert {"/tmp", "/home/moe", "/dev/shm"} <= set(mounts)
    init = pod["initContainers"][0]
    model_mounts = {m["mountPath"]: m["readOnly"] for m in init["volumeMounts"] if m["name"] == "model"}
    assert model_mounts == {"/models": False}
    assert env(init)["MOE_MODEL_DIR"] == "/models/Mixtral-8x7B-Instruct-v0.1"


def test_a_preset_needs_no_model_volume_and_no_init(tiny):
    pod = render.render_statefulset(tiny, tiny.initial_placement(), 0)["spec"]["template"]["spec"]
    assert "model" not in {v["name"] for v in pod["volumes"]} and "initContainers" not in pod


def test_gpus_are_requested_only_when_asked(tiny, mixtral):
    gpu = container(render.render_statefulset(mixtral, mixtral.initial_placement(), 0))["resources"]
    assert gpu["requests"]["nvidia.com/gpu"] == gpu["limits"]["nvidia.com/gpu"] == 4
    assert gpu["requests"]["memory"] == "192Gi"
    cpu = container(render.render_statefulset(tiny, tiny.initial_placement(), 0))["resources"]
    assert "nvidia.com/gpu" not in json.dumps(cpu)


def test_scheduling_fields_reach_the_pod(mixtral):
    pod = render.render_statefulset(mixtral, mixtral.initial_placement(), 0)["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_pods_are_annotated_for_prometheus(tiny):
    sts = render.render_statefulset(tiny, tiny.initial_placement(), 0)
    annotations = sts["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8002"


def test_every_object_is_owned_by_the_moedeployment(mixtral):
    for obj in render.render_all(mixtral, mixtral.initial_placement()):
        assert obj["metadata"]["namespace"] == "serving"
        assert obj["metadata"]["labels"]["serving.moefleet.dev/deployment"] == "mixtral"
        assert obj["metadata"]["ownerReferences"] == [{
            "apiVersion": "serving.moefleet.dev/v1alpha1", "kind": "MoEDeployment", "name": "mixtral",
            "uid": "0b7c-uid", "controller": True, "blockOwnerDeletion": True}]


def test_a_pdb_per_group_allows_one_eviction(mixtral):
    pdbs = by_kind(render.render_all(mixtral, mixtral.initial_placement()), "PodDisruptionBudget")
    assert [p["metadata"]["name"] for p in pdbs] == ["mixtral-g0", "mixtral-g1"]
    for group, pdb in enumerate(pdbs):
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"]["serving.moefleet.dev/group"] == str(group)


def test_network_policy_admits_only_the_operator_to_the_admin_port(tiny):
    policy = render.render_network_policy(tiny)
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = policy["spec"]["ingress"]
    admin = [r for r in rules if any(p.get("port") == 8003 and "endPort" not in p for p in r["ports"])]
    assert admin == [{"from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "moe-operator"}}}], "ports": [{"protocol": "TCP", "port": 8003}]}]
    open_rule = next(r for r in rules if "from" not in r)
    assert {p["port"] for p in open_rule["ports"]} == {8001, 8002}
    peers = next(r for r in rules if r.get("from", [{}])[0].get("podSelector", {}).get("matchLabels", {}).get(
        "serving.moefleet.dev/deployment") == "tiny")
    covered = [(p["port"], p["endPort"]) for p in peers["ports"]]
    assert (1, 8002) in covered and (8004, 65535) in covered  # every peer port but admin (29500, NCCL...)


def test_client_service_selects_group_leaders_only(tiny):
    service = render.render_client_service(tiny)
    assert service["metadata"]["name"] == "tiny" and service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["selector"]["serving.moefleet.dev/rank"] == "0"
    assert [p["port"] for p in service["spec"]["ports"]] == [8001, 8002]
    assert render.status_selector(tiny).endswith("serving.moefleet.dev/rank=0")
    assert render.rank_label_patch({"metadata": {"name": "tiny-g0-0"}}) == {
        "metadata": {"labels": {"serving.moefleet.dev/rank": "0"}}}
    assert render.rank_label_patch({"metadata": {"name": "tiny-g0-1",
                                                 "labels": {"serving.moefleet.dev/rank": "1"}}}) is None


def test_headless_service_resolves_ranks_before_they_are_ready(tiny):
    service = render.render_headless_service(tiny)
    assert service["metadata"]["name"] == "tiny-ranks"
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert "serving.moefleet.dev/group" not in service["spec"]["selector"]
    assert service["spec"]["ports"][0]["port"] == 29500


def test_placement_configmaps_hold_the_current_and_an_immutable_copy(tiny):
    placement = tiny.initial_placement().with_version(3)
    current, versioned = render.render_placement_configmaps(tiny, placement)
    assert current["metadata"]["name"] == "tiny-placement" and "immutable" not in current
    assert versioned["metadata"]["name"] == "tiny-placement-3" and versioned["immutable"] is True
    assert Placement.from_json(current["data"]["placement.json"]) == placement
    assert versioned["data"] == current["data"]


def test_runtime_configmap_holds_the_runtime_yaml(tiny):
    cm = render.render_runtime_configmap(tiny)
    assert cm["metadata"]["name"] == "tiny-runtime"
    assert yaml.safe_load(cm["data"]["runtime.yaml"])["serving"]["admin_port"] == 8003


def _template(spec: DeploymentSpec, placement: Placement) -> dict:
    return render.render_statefulset(spec, placement, 0)["spec"]["template"]


def test_rollout_mode_puts_the_placement_digest_in_the_pod_template(mixtral):
    old = mixtral.initial_placement()
    new = Placement(1, old.num_ranks, old.slots_per_rank, tuple(layer[::-1] for layer in old.slots))
    before, after = _template(mixtral, old), _template(mixtral, new)
    assert after["metadata"]["annotations"][render.ANNOTATION_PLACEMENT_DIGEST] == new.digest()
    assert render.template_hash({"metadata": before["metadata"]}) != render.template_hash(
        {"metadata": after["metadata"]})


def test_in_place_mode_leaves_the_pod_template_alone_when_the_placement_changes(tiny):
    old = tiny.initial_placement()
    new = Placement(1, old.num_ranks, old.slots_per_rank, tuple(layer[::-1] for layer in old.slots))
    assert _template(tiny, old) == _template(tiny, new)
    assert render.ANNOTATION_PLACEMENT_DIGEST not in _template(tiny, new)["metadata"]["annotations"]


def test_a_runtime_config_change_changes_the_template_hash(tiny):
    changed = dataclasses.replace(tiny, gating=dataclasses.replace(tiny.gating, mode="static"))
    placement = tiny.initial_placement()
    sts_a = render.render_statefulset(tiny, placement, 0)
    sts_b = render.render_statefulset(changed, placement, 0)
    assert render.template_hash(sts_a) != render.template_hash(sts_b)
    assert render.template_hash(sts_a) == render.template_hash(render.render_statefulset(tiny, placement, 0))


def test_render_is_deterministic_so_a_second_pass_is_a_no_op(mixtral):
    placement = mixtral.initial_placement()
    first = render.render_all(mixtral, placement)
    snapshot = copy.deepcopy(first)
    second = render.render_all(mixtral, Placement.from_json(placement.to_json()))
    assert json.dumps(first, sort_keys=False) == json.dumps(second, sort_keys=False)
    assert first == snapshot  # nothing shared and mutated between objects


def test_zero_replicas_keep_services_and_config_but_no_groups(tiny):
    scaled = dataclasses.replace(tiny, replicas=0)
    kinds = [o["kind"] for o in render.render_all(scaled, scaled.initial_placement())]
    assert "StatefulSet" not in kinds and "PodDisruptionBudget" not in kinds and kinds.count("Service") == 2


def test_obsolete_children_are_removed_groups_and_old_placement_history(mixtral):
    spec = dataclasses.replace(mixtral, replicas=1, revision_history_limit=2)
    placement = round_robin(32, 8, 2, 5, version=9)
    existing = {
        render.STATEFULSET: ["mixtral-g0", "mixtral-g1"], render.PDB: ["mixtral-g0", "mixtral-g1"],
        render.CONFIGMAP: ["mixtral-runtime", "mixtral-placement",
                           *(f"mixtral-placement-{v}" for v in (5, 6, 7, 8, 9))],
    }
    assert render.obsolete(spec, placement, existing) == {
        render.STATEFULSET: ["mixtral-g1"], render.PDB: ["mixtral-g1"],
        render.CONFIGMAP: ["mixtral-placement-5", "mixtral-placement-6"],
    }
    assert render.placement_versions_to_keep(spec, [5, 6, 7, 8, 9, 12], current=9) == [8, 9, 12]
    desired = render.desired_names(spec, placement)
    assert desired[render.CONFIGMAP] == ["mixtral-placement", "mixtral-placement-9", "mixtral-runtime"]


@pytest.mark.parametrize("name", ["moedeployment-tiny.yaml", "moedeployment-mixtral.yaml"])
def test_every_rendered_object_is_valid_kubernetes(name):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    spec = load(name)
    for obj in render.render_all(spec, spec.initial_placement()):
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
