"""Render a MoEDeployment into the Kubernetes objects that serve it: pure functions, dicts in and out.

Owns names, labels, the pod contract (rendezvous env, probes, Drain on preStop, security) and the
deterministic order of `render_all`, so a second reconcile pass with the same input is a no-op. Makes
no API calls and reads no clock: the reconciler (reconcile.py, through kube.py) applies what this returns.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from moe_operator.spec import API_VERSION, KIND, PLACEMENT_FILE, DeploymentSpec, to_runtime_config
from moe_runtime.placement import Placement

# torch.distributed's conventional MASTER_PORT: rank 0 of each group serves the rendezvous store here;
# MOE_LEADER_ADDRESS points at it through the headless Service (issue 6).
RENDEZVOUS_PORT = 29500
RUNTIME_CONFIG_FILE = "/etc/moe/runtime.yaml"
RUN_AS = 10001  # the images' numeric non-root user and group
DRAIN_MARGIN_SECONDS = 15  # grace beyond drainGraceSeconds: the preStop RPC, process exit, NCCL teardown
STARTUP_BUDGET_SECONDS = 1800  # weight loads of large checkpoints from network volumes are slow
HOME = "/home/moe"

LABEL_NAME, LABEL_INSTANCE = "app.kubernetes.io/name", "app.kubernetes.io/instance"
LABEL_DEPLOYMENT = "serving.moefleet.dev/deployment"
LABEL_GROUP = "serving.moefleet.dev/group"
# Leaders (rank 0) are what the client Service and status.selector pick. StatefulSets cannot label pods by
# ordinal and `apps.kubernetes.io/pod-index` exists only from Kubernetes 1.28 (not in the emulator, which
# says 1.26), so the operator labels every pod with its rank, parsed from the pod name (`rank_label_patch`).
# A pod is unlabelled only until the next pod event is handled, long before its weights load and it turns
# ready, and only ready pods receive traffic.
LABEL_RANK = "serving.moefleet.dev/rank"
LABEL_PLACEMENT_VERSION = "serving.moefleet.dev/placement-version"  # on the immutable history ConfigMaps
OPERATOR_POD_LABELS = {LABEL_NAME: "moe-operator"}  # the chart's operator pods (admin port access)
ANNOTATION_TEMPLATE_HASH = "serving.moefleet.dev/template-hash"
ANNOTATION_CONFIG_HASH = "serving.moefleet.dev/config-hash"
ANNOTATION_PLACEMENT_DIGEST = "serving.moefleet.dev/placement-digest"
ANNOTATION_PLACEMENT_VERSION = "serving.moefleet.dev/placement-version"

Key = tuple[str, str]  # (apiVersion, kind)
STATEFULSET, SERVICE, CONFIGMAP = ("apps/v1", "StatefulSet"), ("v1", "Service"), ("v1", "ConfigMap")
PDB, NETWORKPOLICY = ("policy/v1", "PodDisruptionBudget"), ("networking.k8s.io/v1", "NetworkPolicy")


# -- names ---------------------------------------------------------------------------------------------


def group_name(spec: DeploymentSpec, group: int) -> str:
    """StatefulSet and PodDisruptionBudget of a serving group; its pods are `<this>-<rank>`."""
    return f"{spec.name}-g{group}"


def headless_service_name(spec: DeploymentSpec) -> str:
    return f"{spec.name}-ranks"


def runtime_configmap_name(spec: DeploymentSpec) -> str:
    return f"{spec.name}-runtime"


def placement_configmap_name(spec: DeploymentSpec, version: int | None = None) -> str:
    """`<name>-placement` (current, mounted) or `<name>-placement-<version>` (immutable history)."""
    return f"{spec.name}-placement" if version is None else f"{spec.name}-placement-{version}"


def network_policy_name(spec: DeploymentSpec) -> str:
    return f"{spec.name}-runtime"


def leader_address(spec: DeploymentSpec, group: int) -> str:
    """MOE_LEADER_ADDRESS: rank 0's stable DNS name through the headless Service, and the rendezvous port."""
    return f"{group_name(spec, group)}-0.{headless_service_name(spec)}.{spec.namespace}.svc:{RENDEZVOUS_PORT}"


def rank_of_pod(pod_name: str) -> int | None:
    """The StatefulSet ordinal at the end of a pod's name (the runtime derives MOE_WORKER_INDEX so too)."""
    _, _, ordinal = pod_name.rpartition("-")
    return int(ordinal) if ordinal.isdigit() else None


def rank_label_patch(pod: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that labels a pod with its rank, or None when the label is already right."""
    meta = pod.get("metadata") or {}
    rank = rank_of_pod(meta.get("name", ""))
    if rank is None or (meta.get("labels") or {}).get(LABEL_RANK) == str(rank):
        return None
    return {"metadata": {"labels": {LABEL_RANK: str(rank)}}}


def selector_labels(spec: DeploymentSpec, group: int | None = None) -> dict[str, str]:
    labels = {LABEL_NAME: "moe-runtime", LABEL_INSTANCE: spec.name, LABEL_DEPLOYMENT: spec.name}
    if group is not None:
        labels[LABEL_GROUP] = str(group)
    return labels


def status_selector(spec: DeploymentSpec) -> str:
    """status.selector (the scale subresource's): group leaders, one pod per serving group, like LWS."""
    labels = {**selector_labels(spec), LABEL_RANK: "0"}
    return ",".join(f"{key}={value}" for key, value in sorted(labels.items()))


def template_hash(obj: Mapping[str, Any]) -> str | None:
    """The template hash a pod was made from, or a StatefulSet wants (its pod template's annotation)."""
    if obj.get("kind") == "StatefulSet":
        obj = obj["spec"]["template"]
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_TEMPLATE_HASH)


# -- the desired set -----------------------------------------------------------------------------------


def render_all(spec: DeploymentSpec, placement: Placement) -> list[dict[str, Any]]:
    """Every object of the deployment, in a stable order: config, Services, policy, then group by group."""
    objects = [render_runtime_configmap(spec), *render_placement_configmaps(spec, placement),
               render_headless_service(spec), render_client_service(spec), render_network_policy(spec)]
    for group in range(spec.replicas):
        objects += [render_statefulset(spec, placement, group), render_pdb(spec, group)]
    return objects


def desired_names(spec: DeploymentSpec, placement: Placement) -> dict[Key, list[str]]:
    """(apiVersion, kind) -> sorted names that render_all makes (history ConfigMaps: see obsolete())."""
    names: dict[Key, list[str]] = {}
    for obj in render_all(spec, placement):
        names.setdefault((obj["apiVersion"], obj["kind"]), []).append(obj["metadata"]["name"])
    return {key: sorted(value) for key, value in names.items()}


def placement_versions_to_keep(spec: DeploymentSpec, versions: Iterable[int], current: int) -> list[int]:
    """The current version and the newest revisionHistoryLimit others (rollback targets), ascending."""
    others = sorted({v for v in versions if v != current}, reverse=True)[: spec.revision_history_limit]
    return sorted([*others, current])


def obsolete(spec: DeploymentSpec, placement: Placement,
             existing: Mapping[Key, Iterable[str]]) -> dict[Key, list[str]]:
    """Of the children that exist (names labelled with this deployment), those to delete.

    Removed groups' StatefulSets and PDBs, stray objects, and placement history ConfigMaps beyond
    revisionHistoryLimit. Deleting them is the reconciler's job (no garbage collection is relied on).
    """
    desired, prefix = desired_names(spec, placement), placement_configmap_name(spec) + "-"
    history = {int(n[len(prefix):]): n for n in existing.get(CONFIGMAP, ())
               if n.startswith(prefix) and n[len(prefix):].isdigit()}
    keep = {history[v] for v in placement_versions_to_keep(spec, history, placement.version) if v in history}
    out = {}
    for key, names in existing.items():
        stale = sorted(n for n in names if n not in desired.get(key, ()) and n not in keep)
        if stale:
            out[key] = stale
    return out


# -- config --------------------------------------------------------------------------------------------


def render_runtime_configmap(spec: DeploymentSpec) -> dict[str, Any]:
    text = runtime_yaml(spec)
    return _object(spec, CONFIGMAP, runtime_configmap_name(spec), {"data": {"runtime.yaml": text}},
                   annotations={ANNOTATION_CONFIG_HASH: _digest(text)})


def runtime_yaml(spec: DeploymentSpec) -> str:
    return yaml.safe_dump(to_runtime_config(spec), sort_keys=True, default_flow_style=False)


def render_placement_configmaps(spec: DeploymentSpec, placement: Placement) -> list[dict[str, Any]]:
    """The current placement (mounted by every pod) and its immutable copy for history and rollback."""
    data = {"placement.json": placement.to_json()}
    notes = {ANNOTATION_PLACEMENT_VERSION: str(placement.version),
             ANNOTATION_PLACEMENT_DIGEST: placement.digest()}
    current = _object(spec, CONFIGMAP, placement_configmap_name(spec), {"data": data}, annotations=notes)
    versioned = _object(spec, CONFIGMAP, placement_configmap_name(spec, placement.version),
                        {"data": dict(data), "immutable": True}, annotations=notes,
                        labels={LABEL_PLACEMENT_VERSION: str(placement.version)})
    return [current, versioned]


# -- network -------------------------------------------------------------------------------------------


def render_headless_service(spec: DeploymentSpec) -> dict[str, Any]:
    """DNS for every rank, ready or not (rendezvous happens before readiness), as LeaderWorkerSet does."""
    body = {"spec": {"clusterIP": "None", "publishNotReadyAddresses": True, "selector": selector_labels(spec),
                     "ports": [_port("rendezvous", RENDEZVOUS_PORT)]}}
    return _object(spec, SERVICE, headless_service_name(spec), body)


def render_client_service(spec: DeploymentSpec) -> dict[str, Any]:
    """`<name>`: group leaders only (rank 0 serves the client API).

    A ClusterIP balances connections, not requests: one gRPC channel stays on one group. Spread load with
    several channels, a gRPC-aware proxy, or client-side round_robin over the leaders' addresses.
    """
    serving = spec.serving
    ports = [_port("grpc", serving.grpc_port, "kubernetes.io/h2c"),
             _port("metrics", serving.metrics_port, "http")]
    selector = {**selector_labels(spec), LABEL_RANK: "0"}
    body = {"spec": {"type": "ClusterIP", "selector": selector, "ports": ports}}
    return _object(spec, SERVICE, spec.name, body)


def render_network_policy(spec: DeploymentSpec) -> dict[str, Any]:
    """Ingress: gRPC and metrics from anywhere; peers on every port but admin (rendezvous, NCCL/gloo use
    ephemeral ports); the admin port (ExpertControl: placement, Drain) only from the operator's pods."""
    admin = spec.serving.admin_port
    ranges = [(lo, hi) for lo, hi in ((1, admin - 1), (admin + 1, 65535)) if lo <= hi]
    peer_ports = [{"protocol": "TCP", "port": lo, "endPort": hi} for lo, hi in ranges]
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)}}
    ingress = [
        {"ports": [{"protocol": "TCP", "port": spec.serving.grpc_port},
                   {"protocol": "TCP", "port": spec.serving.metrics_port}]},
        {"from": [{"podSelector": {"matchLabels": selector_labels(spec)}}], "ports": peer_ports},
        {"from": [operator], "ports": [{"protocol": "TCP", "port": admin}]},
    ]
    body = {"spec": {"podSelector": {"matchLabels": selector_labels(spec)}, "policyTypes": ["Ingress"],
                     "ingress": ingress}}
    return _object(spec, NETWORKPOLICY, network_policy_name(spec), body)


# -- groups --------------------------------------------------------------------------------------------


def render_pdb(spec: DeploymentSpec, group: int) -> dict[str, Any]:
    """One voluntary eviction per group at a time. A group is down when any rank is, so the budget's unit
    is the group; maxUnavailable 0 would block node drains for good. Not-ready pods may always go."""
    body = {"spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(spec, group)},
                     "unhealthyPodEvictionPolicy": "AlwaysAllow"}}
    return _object(spec, PDB, group_name(spec, group), body, labels={LABEL_GROUP: str(group)})


def render_statefulset(spec: DeploymentSpec, placement: Placement, group: int) -> dict[str, Any]:
    """One serving group: one pod per rank, started together (Parallel); the operator restarts a group as a
    whole (OnDelete), comparing pods' template-hash annotation with this StatefulSet's."""
    template = _pod_template(spec, placement, group)
    body = {"spec": {
        "replicas": spec.expert_parallel_size, "serviceName": headless_service_name(spec),
        "selector": {"matchLabels": selector_labels(spec, group)}, "podManagementPolicy": "Parallel",
        "updateStrategy": {"type": "OnDelete"}, "revisionHistoryLimit": spec.revision_history_limit,
        "template": template,
    }}
    return _object(spec, STATEFULSET, group_name(spec, group), body, labels={LABEL_GROUP: str(group)})


def _pod_template(spec: DeploymentSpec, placement: Placement, group: int) -> dict[str, Any]:
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(spec.serving.metrics_port),
                   "prometheus.io/path": "/metrics", "kubectl.kubernetes.io/default-container": "runtime",
                   ANNOTATION_CONFIG_HASH: _digest(runtime_yaml(spec))}
    if spec.rebalancing.mode != "InPlace":  # InPlace switches live: drift repair must not restart pods
        annotations[ANNOTATION_PLACEMENT_DIGEST] = placement.digest()
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,  # the runtime never calls the API
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS,
                            "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
        "terminationGracePeriodSeconds": spec.serving.drain_grace_seconds + DRAIN_MARGIN_SECONDS,
        "containers": [_runtime_container(spec, group)],
        "volumes": _volumes(spec),
    }
    if spec.model.init is not None:
        pod["initContainers"] = [_init_container(spec)]
    scheduling = spec.scheduling
    for key, value in (("nodeSelector", dict(scheduling.node_selector)),
                       ("tolerations", [dict(t) for t in scheduling.tolerations]),
                       ("affinity", scheduling.affinity and dict(scheduling.affinity))):
        if value:
            pod[key] = copy.deepcopy(value)
    template = {"metadata": {"labels": selector_labels(spec, group), "annotations": annotations}, "spec": pod}
    annotations[ANNOTATION_TEMPLATE_HASH] = _digest(json.dumps(template, sort_keys=True))
    return template


def _runtime_container(spec: DeploymentSpec, group: int) -> dict[str, Any]:
    serving = spec.serving
    grace = serving.drain_grace_seconds + DRAIN_MARGIN_SECONDS
    drain = f'moe-client drain --address "$POD_IP:{serving.admin_port}" || true'  # exec hooks get no $(VAR)
    return {
        "name": "runtime", "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
        "command": ["moe-runtime", "serve", "--config", RUNTIME_CONFIG_FILE, "--placement", PLACEMENT_FILE,
                    "--admin-bind-address", "$(POD_IP)"],
        "env": _env(spec, group),
        "ports": [_container_port(name, port) for name, port in (
            ("grpc", serving.grpc_port), ("metrics", serving.metrics_port), ("admin", serving.admin_port),
            ("rendezvous", RENDEZVOUS_PORT))],
        "resources": _resources(spec, gpus=True),
        # Every rank answers grpc.health.v1 on the gRPC port: SERVING once weights are loaded and warm.
        "startupProbe": {**_grpc(serving.grpc_port), "periodSeconds": 10, "timeoutSeconds": 5,
                         "failureThreshold": STARTUP_BUDGET_SECONDS // 10},
        "readinessProbe": {**_grpc(serving.grpc_port), "periodSeconds": 5, "timeoutSeconds": 3,
                           "failureThreshold": 2},
        # A draining runtime reports NOT_SERVING: liveness waits out a whole drain before restarting it.
        "livenessProbe": {**_grpc(serving.grpc_port), "periodSeconds": 10, "timeoutSeconds": 5,
                          "failureThreshold": max(3, math.ceil(grace / 10) + 1)},
        "lifecycle": {"preStop": {"exec": {"command": ["sh", "-c", drain]}}},
        "securityContext": _container_security(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": _mounts(spec, init=False),
    }


def _env(spec: DeploymentSpec, group: int) -> list[dict[str, Any]]:
    """The rendezvous contract (issue 6), shaped like LeaderWorkerSet's LWS_*; MOE_WORKER_INDEX is left
    unset: the runtime takes the ordinal at the end of POD_NAME. Caches go to the writable home emptyDir."""
    cache = f"{HOME}/.cache"
    return [
        {"name": "POD_NAME", **_field_ref("metadata.name")},
        {"name": "POD_NAMESPACE", **_field_ref("metadata.namespace")},
        {"name": "POD_IP", **_field_ref("status.podIP")},
        {"name": "MOE_LEADER_ADDRESS", "value": leader_address(spec, group)},
        {"name": "MOE_GROUP_SIZE", "value": str(spec.expert_parallel_size)},
        {"name": "HOME", "value": HOME},
        {"name": "XDG_CACHE_HOME", "value": cache},
        {"name": "TRITON_CACHE_DIR", "value": f"{cache}/triton"},
        {"name": "TORCHINDUCTOR_CACHE_DIR", "value": f"{cache}/torchinductor"},
        {"name": "CUDA_CACHE_PATH", "value": f"{cache}/nv"},
    ]


def _init_container(spec: DeploymentSpec) -> dict[str, Any]:
    """Fills the model volume (read-write here only); it runs in every pod, so it must be idempotent."""
    init = spec.model.init
    assert init is not None
    return {
        "name": "model-init", "image": init.image, "imagePullPolicy": spec.image_pull_policy,
        "command": list(init.command),
        "env": [{"name": "MOE_MODEL_DIR", "value": spec.model.directory}, {"name": "HOME", "value": HOME}],
        "resources": _resources(spec, gpus=False),
        "securityContext": _container_security(),
        "volumeMounts": _mounts(spec, init=True),
    }


def _volumes(spec: DeploymentSpec) -> list[dict[str, Any]]:
    volumes = [
        {"name": "runtime-config", "configMap": {"name": runtime_configmap_name(spec)}},
        {"name": "placement", "configMap": {"name": placement_configmap_name(spec)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "home", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},  # NCCL's shared memory; counts against memory
    ]
    if spec.model.pvc is not None:
        volumes.append({"name": "model", "persistentVolumeClaim": {"claimName": spec.model.pvc.claim_name}})
    return volumes


def _mounts(spec: DeploymentSpec, init: bool) -> list[dict[str, Any]]:
    # runtime.yaml is a subPath mount: a volume nested inside a read-only ConfigMap volume cannot get its
    # mount point created. The placement directory is a whole mount, so a restarted container sees updates.
    mounts = [] if init else [
        {"name": "runtime-config", "mountPath": RUNTIME_CONFIG_FILE, "subPath": "runtime.yaml",
         "readOnly": True},
        {"name": "placement", "mountPath": PLACEMENT_FILE.rsplit("/", 1)[0], "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    mounts += [{"name": "tmp", "mountPath": "/tmp"}, {"name": "home", "mountPath": HOME}]
    if spec.model.pvc is not None:
        mounts.append({"name": "model", "mountPath": "/models", "readOnly": not init})
    return mounts


def _resources(spec: DeploymentSpec, gpus: bool) -> dict[str, Any]:
    requests, limits = dict(spec.resources.requests), dict(spec.resources.limits)
    if gpus and spec.resources.gpus > 0:  # extended resources: requests must equal limits
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = spec.resources.gpus
    return {key: value for key, value in (("requests", requests), ("limits", limits)) if value}


def _container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"}}


# -- small pieces --------------------------------------------------------------------------------------


def _object(spec: DeploymentSpec, key: Key, name: str, body: dict[str, Any], *,
            labels: Mapping[str, str] | None = None,
            annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    """apiVersion, kind, metadata (labels, owner reference to the MoEDeployment) and the body."""
    meta: dict[str, Any] = {
        "name": name, "namespace": spec.namespace,
        "labels": {**selector_labels(spec), "app.kubernetes.io/managed-by": "moe-operator", **(labels or {})},
        "ownerReferences": [{"apiVersion": API_VERSION, "kind": KIND, "name": spec.name, "uid": spec.uid,
                             "controller": True, "blockOwnerDeletion": True}],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": key[0], "kind": key[1], "metadata": meta, **body}


def _port(name: str, port: int, app_protocol: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
    if app_protocol:
        out["appProtocol"] = app_protocol
    return out


def _container_port(name: str, port: int) -> dict[str, Any]:
    return {"name": name, "containerPort": port, "protocol": "TCP"}


def _grpc(port: int) -> dict[str, Any]:
    return {"grpc": {"port": port}}


def _field_ref(path: str) -> dict[str, Any]:
    return {"valueFrom": {"fieldRef": {"fieldPath": path}}}


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
