"""Runtime configuration: frozen dataclasses built once in `__main__` and passed down.

`RuntimeConfig` is the YAML file `moe-runtime serve --config FILE` reads and the operator renders
(camelCase CRD fields map 1:1 to these snake_case names). Unknown keys and bad values raise
ConfigError naming the field. No environment reads here or anywhere below `__main__`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from moe_runtime.errors import ConfigError

GATING_MODES = ("dynamic", "static")
BUFFERING_POLICIES = ("lifo", "lru", "lfu", "fifo")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class GatingConfig:
    """How tokens reach experts.

    mode: "dynamic" (dropless, exact per-expert counts; the paper's contribution) or "static"
        (the fairseq/GShard capacity baseline).
    capacity_fraction: static only, dimensionless; per-expert capacity C = ceil(f * T) token-slots
        for T tokens in the batch (the paper's "capacity factor": 0.05 for its LM, 1.0 for MT; for
        E=8, top-2, f = 0.25 equals GShard's capacity factor 1.0).
    """

    mode: str = "dynamic"
    capacity_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.mode not in GATING_MODES:
            raise ConfigError(f"gating.mode must be one of {', '.join(GATING_MODES)}, got {self.mode!r}")
        if not self.capacity_fraction > 0:
            raise ConfigError(f"gating.capacity_fraction must be > 0, got {self.capacity_fraction}")


@dataclass(frozen=True)
class RoutingConfig:
    """Issue 9's routing techniques, each off by default (README "Seed techniques").

    adaptive_top_p: token-adaptive routing (AdaMoE spirit), dimensionless in (0, 1]: per token keep the
        fewest of its top-k experts whose router probability mass reaches it (None or 1.0: plain top-k).
    prune_keep: expert pruning (DeepSpeed multitask MoE), a count: route only among the prune_keep
        experts per layer that `prune_trace` (a routing trace .npz) uses most. None: every expert.
    """

    adaptive_top_p: float | None = None
    prune_keep: int | None = None
    prune_trace: str | None = None

    def __post_init__(self) -> None:
        if self.adaptive_top_p is not None and not 0.0 < self.adaptive_top_p <= 1.0:
            raise ConfigError(f"routing.adaptive_top_p must be in (0, 1], got {self.adaptive_top_p}")
        if self.prune_keep is not None and self.prune_keep < 1:
            raise ConfigError(f"routing.prune_keep must be >= 1, got {self.prune_keep}")
        if (self.prune_keep is None) != (self.prune_trace is None):
            raise ConfigError("routing: prune_keep and prune_trace go together (set both or neither)")

    @property
    def enabled(self) -> bool:
        return self.adaptive_top_p is not None or self.prune_keep is not None


@dataclass(frozen=True)
class ExpertBufferingConfig:
    """Only hot experts on the GPU, the rest in pinned host memory (buffering issue).

    enabled: off by default. slots_per_layer: device expert slots per MoE layer (count), or
    gpu_memory_bytes: one budget in bytes split across layers (set at most one). policy: eviction,
    one of lifo (the paper's), lru, lfu, fifo. prefetch: predict layer l+1's experts from layer l.
    Under expert parallelism both sizes are per rank, over the physical slots that rank holds (at most
    its slots per rank are kept), and each rank buffers and counts its own slots.
    """

    enabled: bool = False
    slots_per_layer: int | None = None
    gpu_memory_bytes: int | None = None
    policy: str = "lifo"
    prefetch: bool = True

    def __post_init__(self) -> None:
        if self.slots_per_layer is not None and self.gpu_memory_bytes is not None:
            raise ConfigError("expert_buffering: set slots_per_layer or gpu_memory_bytes, not both")
        if self.slots_per_layer is not None and self.slots_per_layer < 1:
            raise ConfigError(f"expert_buffering.slots_per_layer must be >= 1, got {self.slots_per_layer}")
        if self.gpu_memory_bytes is not None and self.gpu_memory_bytes < 1:
            raise ConfigError(f"expert_buffering.gpu_memory_bytes must be >= 1, got {self.gpu_memory_bytes}")
        if self.policy not in BUFFERING_POLICIES:
            raise ConfigError(f"expert_buffering.policy must be one of {', '.join(BUFFERING_POLICIES)}, "
                              f"got {self.policy!r}")
        if self.enabled and self.slots_per_layer is None and self.gpu_memory_bytes is None:
            raise ConfigError("expert_buffering.enabled needs slots_per_layer or gpu_memory_bytes")


@dataclass(frozen=True)
class ServingConfig:
    """The server's ports, limits and shutdown behaviour (defaults as Triton's ports).

    host: gRPC bind address. grpc_port (8001), metrics_port (8002, Prometheus HTTP), admin_port (8003,
    ExpertControl). admin_bind_address: 127.0.0.1 keeps the admin service off the pod network unless
    asked (the operator sets the pod IP). max_running_sequences: decode batch size limit (count).
    max_batch_tokens: tokens one engine step may process, prefill included (count). max_queue: waiting
    requests before RESOURCE_EXHAUSTED (count). max_tokens_limit: largest max_tokens a request may ask
    (count). max_seq_len: KV cache length per sequence, prompt + generated (tokens).
    drain_grace_seconds: SIGTERM/Drain waits this long for in-flight requests (seconds).
    switch_interval_ms: the server process's interpreter switch interval (sys.setswitchinterval;
    milliseconds): the engine thread gets the interpreter lock back this soon after a device wait while
    the gRPC thread streams tokens (Python's default, 5 ms, leaves the device idle between steps).
    """

    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    admin_port: int = 8003
    admin_bind_address: str = "127.0.0.1"
    max_running_sequences: int = 32
    max_batch_tokens: int = 4096
    max_queue: int = 256
    max_tokens_limit: int = 1024
    max_seq_len: int = 2048
    drain_grace_seconds: float = 30.0
    switch_interval_ms: float = 0.5

    def __post_init__(self) -> None:
        for name in ("grpc_port", "metrics_port", "admin_port"):
            port = getattr(self, name)
            if not 0 <= port <= 65535:
                raise ConfigError(f"serving.{name} must be in 0..65535, got {port}")
        for name in ("max_running_sequences", "max_batch_tokens", "max_queue", "max_tokens_limit",
                     "max_seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"serving.{name} must be >= 1, got {getattr(self, name)}")
        if self.drain_grace_seconds < 0:
            raise ConfigError(f"serving.drain_grace_seconds must be >= 0, got {self.drain_grace_seconds}")
        if not self.switch_interval_ms > 0:
            raise ConfigError(f"serving.switch_interval_ms must be > 0, got {self.switch_interval_ms}")


@dataclass(frozen=True)
class RuntimeConfig:
    """Everything `moe-runtime serve` needs.

    model: checkpoint directory or preset name. model_name: the name clients use (default: the
    directory's base name or the preset's name). device: cpu | cuda | cuda:N. dtype: float32 |
    bfloat16 | float16. placement_file: initial expert placement JSON (default round-robin).
    record_trace: write the routing trace (.npz) here on shutdown. seed: random-init seed for presets.
    routing: issue 9's adaptive top-p and expert pruning (RoutingConfig), off by default.
    """

    model: str = "tiny"
    model_name: str | None = None
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0
    gating: GatingConfig = field(default_factory=GatingConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    expert_buffering: ExpertBufferingConfig = field(default_factory=ExpertBufferingConfig)
    placement_file: str | None = None
    record_trace: str | None = None
    serving: ServingConfig = field(default_factory=ServingConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.record_trace and (self.routing.adaptive_top_p or 1.0) < 1.0:
            raise ConfigError("record_trace with routing.adaptive_top_p < 1 is not supported (dropped slots)")

    @property
    def served_model_name(self) -> str:
        return self.model_name or Path(self.model.rstrip("/")).name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RuntimeConfig:
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> RuntimeConfig:
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"{path}: cannot read runtime config: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: runtime config must be a mapping")
        return cls.from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> RuntimeConfig:
        return dataclasses.replace(self, **changes)


def _build(cls: type, data: Any, prefix: str) -> Any:
    """A (nested) config dataclass from a mapping, rejecting unknown keys with their dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config field {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _check_scalar(value, hint, f"{prefix}{key}")
    return cls(**kwargs)


def _check_scalar(value: Any, hint: Any, path: str) -> Any:
    allowed = getattr(hint, "__args__", (hint,))
    if value is None and type(None) in allowed:
        return None
    if float in allowed and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not any(isinstance(value, t) and not (t is int and isinstance(value, bool))
               for t in allowed if t is not type(None)):
        names = "/".join(t.__name__ for t in allowed)
        raise ConfigError(f"config field {path} must be {names}, got {value!r}")
    return value
