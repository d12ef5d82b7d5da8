"""Typed MoEDeployment spec and status: frozen dataclasses parsed from the custom resource's dict.

The one place where camelCase (the CRD) becomes snake_case (Python, RuntimeConfig) and back. Parsing
fills the CRD's schema defaults itself (a test keeps both equal) and raises SpecError with a field path
for specs the schema cannot reject (e.g. more ranks than experts). No I/O, no kubernetes client, no torch.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from moe_operator.config import DEFAULT_RUNTIME_IMAGE
from moe_runtime.placement import Placement, PlacementError, round_robin, slots_per_rank_for

GROUP, VERSION, KIND, PLURAL = "serving.moefleet.dev", "v1alpha1", "MoEDeployment", "moedeployments"
API_VERSION = f"{GROUP}/{VERSION}"
MODEL_MOUNT = "/models"  # the model PVC's mount point in every pod
PLACEMENT_FILE = "/etc/moe/placement/placement.json"
# Names: pods are `<name>-g<group>-<rank>` and the StatefulSet controller labels them with
# `controller-revision-hash=<name>-g<group>-<10 chars>`, a label value (<= 63): 45 leaves room for g255.
MAX_NAME_LENGTH = 45
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

# Preset -> (num_experts, MoE layers). A torch-free mirror of moe_runtime.model.PRESETS (which imports
# torch, so the operator cannot); tests/operator/test_spec.py keeps the two equal, and the CRD's
# model.preset enum lists the same names.
PRESET_SHAPES: dict[str, tuple[int, int]] = {"tiny": (8, 2), "mixtral-8x7b": (8, 32),
                                              "mixtral-8x22b": (8, 56)}


class SpecError(ValueError):
    """A spec that cannot be served; `path` names the field (e.g. spec.expertParallelSize)."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclass(frozen=True)
class PvcSource:
    claim_name: str
    path: str = ""


@dataclass(frozen=True)
class InitSpec:
    image: str
    command: tuple[str, ...]


@dataclass(frozen=True)
class ModelSpec:
    """preset xor pvc; num_experts and num_layers come from the preset table or the spec."""

    num_experts: int
    num_layers: int
    preset: str | None = None
    pvc: PvcSource | None = None
    init: InitSpec | None = None

    @property
    def directory(self) -> str:
        """What RuntimeConfig.model gets: the preset's name or the checkpoint directory in the pod."""
        if self.pvc is None:
            return str(self.preset)
        return f"{MODEL_MOUNT}/{self.pvc.path}" if self.pvc.path else MODEL_MOUNT


@dataclass(frozen=True)
class ResourcesSpec:
    gpus: int = 1
    requests: Mapping[str, int | str] = field(default_factory=dict)  # cpu, memory quantities
    limits: Mapping[str, int | str] = field(default_factory=dict)


@dataclass(frozen=True)
class GatingSpec:
    mode: str = "dynamic"
    capacity_fraction: float = 1.0


@dataclass(frozen=True)
class ExpertBufferingSpec:
    enabled: bool = False
    slots_per_layer: int | None = None
    gpu_memory_bytes: int | None = None
    policy: str = "lifo"
    prefetch: bool = True


@dataclass(frozen=True)
class RebalancingSpec:
    mode: str = "Off"  # Off | InPlace | Rollout
    planner: str = "replicate_pack"
    observation_window_seconds: int = 300
    imbalance_threshold: float = 1.25
    cooldown_seconds: int = 600
    redundant_slots: int = 0
    pinned_placement: Placement | None = None

    @property
    def automatic(self) -> bool:
        """Whether the load loop may plan placements (a pinned placement disables it)."""
        return self.mode != "Off" and self.pinned_placement is None


@dataclass(frozen=True)
class RolloutSpec:
    max_unavailable: int = 1


@dataclass(frozen=True)
class ServingSpec:
    grpc_port: int = 8001
    metrics_port: int = 8002
    admin_port: int = 8003
    max_running_sequences: int = 32
    max_batch_tokens: int = 4096
    max_queue: int = 256
    max_tokens_limit: int = 1024
    max_seq_len: int = 2048
    drain_grace_seconds: int = 30


@dataclass(frozen=True)
class SchedulingSpec:
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    affinity: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class DeploymentSpec:
    """One MoEDeployment: its identity (for names and owner references) and its spec, defaults filled."""

    name: str
    namespace: str
    uid: str
    model: ModelSpec
    image: str = DEFAULT_RUNTIME_IMAGE
    generation: int = 0
    model_name: str | None = None
    image_pull_policy: str = "IfNotPresent"
    replicas: int = 1
    expert_parallel_size: int = 1
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    dtype: str = "float32"
    gating: GatingSpec = field(default_factory=GatingSpec)
    expert_buffering: ExpertBufferingSpec = field(default_factory=ExpertBufferingSpec)
    rebalancing: RebalancingSpec = field(default_factory=RebalancingSpec)
    rollout: RolloutSpec = field(default_factory=RolloutSpec)
    revision_history_limit: int = 5
    serving: ServingSpec = field(default_factory=ServingSpec)
    scheduling: SchedulingSpec = field(default_factory=SchedulingSpec)

    @property
    def slots_per_rank(self) -> int:
        """Physical expert slots per rank: the pinned placement's, else ceil(E / W) + redundantSlots."""
        if self.rebalancing.pinned_placement is not None:
            return self.rebalancing.pinned_placement.slots_per_rank
        return slots_per_rank_for(self.model.num_experts, self.expert_parallel_size,
                                  self.rebalancing.redundant_slots)

    def initial_placement(self) -> Placement:
        """The placement before any load is seen: the pinned one, else round-robin at version 0."""
        if self.rebalancing.pinned_placement is not None:
            return self.rebalancing.pinned_placement
        return round_robin(self.model.num_layers, self.model.num_experts, self.expert_parallel_size,
                           self.slots_per_rank)

    @classmethod
    def from_resource(cls, body: Mapping[str, Any],
                      default_image: str = DEFAULT_RUNTIME_IMAGE) -> DeploymentSpec:
        """Parse a MoEDeployment (as the API server stores it, or without its defaults applied)."""
        meta = body.get("metadata") or {}
        _check_name(meta.get("name", ""))
        spec = _mapping(body.get("spec"), "spec")
        flat = _scalars(cls, spec, "spec", skip={"name", "namespace", "uid", "generation", "image"})
        parsed = cls(
            name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid") or "",
            generation=int(meta.get("generation") or 0),
            model=_model(_mapping(spec.get("model"), "spec.model"), "spec.model"),
            image=_typed(spec.get("image", default_image), str, "spec.image") or default_image,
            resources=_resources(_mapping(spec.get("resources", {}), "spec.resources")),
            gating=_build(GatingSpec, spec.get("gating", {}), "spec.gating"),
            expert_buffering=_build(ExpertBufferingSpec, spec.get("expertBuffering", {}),
                                    "spec.expertBuffering"),
            rebalancing=_rebalancing(_mapping(spec.get("rebalancing", {}), "spec.rebalancing")),
            rollout=_build(RolloutSpec, spec.get("rollout", {}), "spec.rollout"),
            serving=_build(ServingSpec, spec.get("serving", {}), "spec.serving"),
            scheduling=_scheduling(_mapping(spec.get("scheduling", {}), "spec.scheduling")),
            **flat,
        )
        _check_feasible(parsed)
        return parsed


def _check_name(name: str) -> None:
    if not _DNS_LABEL.match(name) or len(name) > MAX_NAME_LENGTH:
        raise SpecError("metadata.name", f"{name!r} must be a DNS label (lowercase letters, digits, '-', "
                                         f"starting with a letter) of at most {MAX_NAME_LENGTH} characters: "
                                         f"it names Services, StatefulSets and pods")


def _check_feasible(spec: DeploymentSpec) -> None:
    """What the schema cannot see: the model's expert count against the ranks and the pinned placement."""
    experts, ranks = spec.model.num_experts, spec.expert_parallel_size
    if ranks > experts:
        raise SpecError("spec.expertParallelSize", f"{ranks} ranks cannot be filled by the model's {experts} "
                                                   f"experts: at most {experts} ranks per group")
    pinned = spec.rebalancing.pinned_placement
    if pinned is None:
        return
    path = "spec.rebalancing.pinnedPlacement"
    if pinned.num_ranks != ranks:
        raise SpecError(f"{path}.numRanks", f"{pinned.num_ranks} must equal expertParallelSize {ranks}")
    try:
        pinned.validate(experts, spec.model.num_layers)
    except PlacementError as exc:
        raise SpecError(path, str(exc)) from exc


def _model(data: Mapping[str, Any], path: str) -> ModelSpec:
    preset, pvc, init = data.get("preset"), data.get("pvc"), data.get("init")
    if (preset is None) == (pvc is None):
        raise SpecError(path, "exactly one of preset or pvc must be set")
    if init is not None and pvc is None:
        raise SpecError(f"{path}.init", "init fills a volume, so it needs pvc")
    source = init_spec = None
    if pvc is not None:
        pvc = _mapping(pvc, f"{path}.pvc")
        source = PvcSource(_typed(pvc.get("claimName"), str, f"{path}.pvc.claimName") or "",
                           (_typed(pvc.get("path"), str, f"{path}.pvc.path") or "").strip("/"))
        if not source.claim_name:
            raise SpecError(f"{path}.pvc.claimName", "required")
    if init is not None:
        init = _mapping(init, f"{path}.init")
        init_spec = InitSpec(str(init.get("image") or ""), tuple(str(c) for c in init.get("command") or ()))
        if not init_spec.image or not init_spec.command:
            raise SpecError(f"{path}.init", "image and command are required")
    return ModelSpec(*_model_shape(data, preset, path), preset, source, init_spec)


def _model_shape(data: Mapping[str, Any], preset: str | None, path: str) -> tuple[int, int]:
    """(num_experts, num_layers): the preset's (the spec may repeat them), else the spec's own."""
    given = {key: _typed(data.get(key), int, f"{path}.{key}") for key in ("numExperts", "numLayers")}
    if preset is None:
        if None in given.values():
            raise SpecError(path, "a pvc model needs numExperts and numLayers")
        return given["numExperts"], given["numLayers"]
    if preset not in PRESET_SHAPES:
        raise SpecError(f"{path}.preset", f"unknown preset {preset!r}; known: {', '.join(PRESET_SHAPES)}")
    known = dict(zip(given, PRESET_SHAPES[preset], strict=True))
    for key, value in given.items():
        if value is not None and value != known[key]:
            raise SpecError(f"{path}.{key}", f"preset {preset} has {known[key]}, not {value}")
    return known["numExperts"], known["numLayers"]


def _resources(data: Mapping[str, Any]) -> ResourcesSpec:
    out: dict[str, Any] = {"gpus": _typed(data.get("gpus", 1), int, "spec.resources.gpus")}
    for key in ("requests", "limits"):
        given = _mapping(data.get(key, {}), f"spec.resources.{key}")
        out[key] = {name: given[name] for name in sorted(given) if name in ("cpu", "memory")}
    return ResourcesSpec(**out)


def _rebalancing(data: Mapping[str, Any]) -> RebalancingSpec:
    path = "spec.rebalancing"
    spec = _build(RebalancingSpec, {k: v for k, v in data.items() if k != "pinnedPlacement"}, path)
    pinned = data.get("pinnedPlacement")
    if pinned is None:
        return spec
    pinned = _mapping(pinned, f"{path}.pinnedPlacement")
    try:  # camelCase (CRD) -> snake_case (placement.json), then Placement's own checks
        placement = Placement.from_dict({_snake(k): v for k, v in pinned.items()})
    except PlacementError as exc:
        raise SpecError(f"{path}.pinnedPlacement", str(exc)) from exc
    return dataclasses.replace(spec, pinned_placement=placement)


def _scheduling(data: Mapping[str, Any]) -> SchedulingSpec:
    """Passed to the pod as given (the schema checks the shapes; tolerations and affinity are PodSpec's)."""
    selector = _mapping(data.get("nodeSelector"), "spec.scheduling.nodeSelector")
    affinity = data.get("affinity")
    return SchedulingSpec(dict(sorted(selector.items())), tuple(data.get("tolerations") or ()),
                          dict(_mapping(affinity, "spec.scheduling.affinity")) if affinity else None)


# -- generic camelCase dict -> dataclass of scalars -----------------------------------------------------


def _build(cls: type, data: Any, path: str) -> Any:
    return cls(**_scalars(cls, _mapping(data, path), path))


def _scalars(cls: type, data: Mapping[str, Any], path: str, skip: frozenset | set = frozenset()) -> dict:
    """The scalar fields of `cls` present (camelCase) in `data`, type-checked; absent ones keep defaults."""
    hints, out = get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.name in skip or camel(f.name) not in data:
            continue
        allowed = getattr(hints[f.name], "__args__", (hints[f.name],))
        if not set(allowed) <= {int, float, str, bool, type(None)}:
            continue  # nested objects have their own parser
        out[f.name] = _typed(data[camel(f.name)], allowed, f"{path}.{camel(f.name)}")
    return out


def _typed(value: Any, allowed: type | tuple, path: str) -> Any:
    kinds = allowed if isinstance(allowed, tuple) else (allowed, type(None))
    if value is None and type(None) in kinds:
        return None
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not any(isinstance(value, t) and not (t is int and isinstance(value, bool)) for t in kinds):
        names = "/".join(t.__name__ for t in kinds if t is not type(None))
        raise SpecError(path, f"must be {names}, got {value!r}")
    return value


def _mapping(value: Any, path: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise SpecError(path, f"must be an object, got {type(value).__name__}")
    return value


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


# -- RuntimeConfig ---------------------------------------------------------------------------------------


def to_runtime_config(spec: DeploymentSpec) -> dict[str, Any]:
    """The RuntimeConfig YAML dict (snake_case, every field) that all ranks of all groups share.

    Rank-independent on purpose: one ConfigMap serves every pod; a pod's rank comes from POD_NAME and
    its admin bind address from the `--admin-bind-address $(POD_IP)` flag, which overrides the file.
    """
    buffering, serving = spec.expert_buffering, spec.serving
    return {
        "model": spec.model.directory,
        "model_name": spec.model_name,
        "device": "cuda" if spec.resources.gpus > 0 else "cpu",
        "dtype": spec.dtype,
        "seed": 0,  # presets: every rank must draw the same random weights
        "gating": {"mode": spec.gating.mode, "capacity_fraction": float(spec.gating.capacity_fraction)},
        # Issue 9's adaptive routing and pruning stay off in the fleet: not in the CRD, and the runtime
        # refuses them under expert parallelism.
        "routing": {"adaptive_top_p": None, "prune_keep": None, "prune_trace": None},
        "expert_buffering": dataclasses.asdict(buffering),
        "placement_file": PLACEMENT_FILE,
        "record_trace": None,
        "serving": {"host": "0.0.0.0", **dataclasses.asdict(serving), "admin_bind_address": "127.0.0.1",
                    "drain_grace_seconds": float(serving.drain_grace_seconds),
                    "switch_interval_ms": 0.5},  # the runtime's default; a process tuning, not a CRD field
    }


# -- status ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    type: str  # Ready | Progressing | Degraded | Rebalancing
    status: str  # "True" | "False" | "Unknown"
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None  # RFC 3339
    observed_generation: int | None = None


@dataclass(frozen=True)
class PlacementRecord:
    version: int
    time: str | None = None
    imbalance: float | None = None
    reason: str = ""


@dataclass(frozen=True)
class PlacementStatus:
    current_version: int | None = None
    target_version: int | None = None
    imbalance: float | None = None
    last_rebalance_time: str | None = None
    history: tuple[PlacementRecord, ...] = ()


@dataclass(frozen=True)
class DeploymentStatus:
    observed_generation: int | None = None
    replicas: int = 0
    ready_replicas: int = 0
    updated_replicas: int = 0
    selector: str = ""
    conditions: tuple[Condition, ...] = ()
    placement: PlacementStatus = field(default_factory=PlacementStatus)

    def condition(self, type_: str) -> Condition | None:
        return next((c for c in self.conditions if c.type == type_), None)

    def to_dict(self) -> dict[str, Any]:
        """camelCase, None omitted: the body of a status patch."""
        return _camel_dict(self)

    @classmethod
    def from_resource(cls, body: Mapping[str, Any]) -> DeploymentStatus:
        return _load(cls, body.get("status") or {})


def _load(cls: type, data: Mapping[str, Any]) -> Any:
    """A (nested) status dataclass from its camelCase dict; keys it does not know (kopf's) are ignored."""
    hints, kwargs = get_type_hints(cls), {}
    for f in dataclasses.fields(cls):
        if camel(f.name) not in data:
            continue
        value, hint = data[camel(f.name)], hints[f.name]
        if dataclasses.is_dataclass(hint):
            value = _load(hint, value or {})
        elif getattr(hint, "__origin__", None) is tuple:
            value = tuple(_load(hint.__args__[0], item) for item in value or ())
        kwargs[f.name] = value
    return cls(**kwargs)


def _camel_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {camel(f.name): _camel_dict(v) for f in dataclasses.fields(obj)
                if (v := getattr(obj, f.name)) is not None}
    if isinstance(obj, tuple):
        return [_camel_dict(v) for v in obj]
    return obj
