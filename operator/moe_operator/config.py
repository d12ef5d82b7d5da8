"""Operator configuration: `OperatorConfig`, read once from the environment in `__main__`.

The only place in moe_operator that reads environment variables; the Helm chart sets them (values.yaml
`operator.*`). Everything else receives the built, frozen config. Bad values raise OperatorConfigError
naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_RUNTIME_IMAGE = "ghcr.io/moe-fleet/moe-runtime:0.1.0"
ENV_PREFIX = "MOE_OPERATOR_"


class OperatorConfigError(ValueError):
    """An environment variable with a value the operator cannot use."""


@dataclass(frozen=True)
class OperatorConfig:
    """What the operator process needs; each field is `MOE_OPERATOR_<FIELD>` in the environment.

    namespaces: namespaces to watch (comma-separated; empty = all namespaces, needs the ClusterRole).
    runtime_image: runtime image for MoEDeployments that leave spec.image unset.
    load_poll_seconds: how often the load loop reads each leader's GetExpertLoad (seconds).
    rpc_timeout_seconds: deadline of one ExpertControl call (seconds).
    group_ready_timeout_seconds: a restarted group not ready by then fails the rollout (seconds).
    metrics_port: Prometheus HTTP port of moe_operator_* metrics. health_port: kopf's liveness
    endpoint (`/healthz`). standalone: no kopf peering (one replica). cluster_domain: DNS suffix.
    kubeconfig: a kubeconfig file to use instead of the pod's service account (out-of-cluster runs, the
    demo); `KUBECONFIG` is honoured when MOE_OPERATOR_KUBECONFIG is unset.
    """

    namespaces: tuple[str, ...] = ()
    runtime_image: str = DEFAULT_RUNTIME_IMAGE
    load_poll_seconds: float = 15.0
    rpc_timeout_seconds: float = 10.0
    group_ready_timeout_seconds: float = 1800.0
    metrics_port: int = 9090
    health_port: int = 8080
    standalone: bool = True
    cluster_domain: str = "cluster.local"
    kubeconfig: str = ""

    def __post_init__(self) -> None:
        for name in ("load_poll_seconds", "rpc_timeout_seconds", "group_ready_timeout_seconds"):
            if not getattr(self, name) > 0:
                raise OperatorConfigError(f"{_env(name)} must be > 0, got {getattr(self, name)}")
        for name in ("metrics_port", "health_port"):
            if not 1 <= getattr(self, name) <= 65535:
                raise OperatorConfigError(f"{_env(name)} must be in 1..65535, got {getattr(self, name)}")
        if self.metrics_port == self.health_port:
            raise OperatorConfigError(f"{_env('metrics_port')} and {_env('health_port')} must differ")
        if not self.runtime_image:
            raise OperatorConfigError(f"{_env('runtime_image')} must not be empty")

    @property
    def all_namespaces(self) -> bool:
        return not self.namespaces

    @property
    def liveness_endpoint(self) -> str:
        """kopf's `--liveness` URL; the chart's probes call it."""
        return f"http://0.0.0.0:{self.health_port}/healthz"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if environ is None else environ
        defaults = cls()
        values: dict[str, object] = {}
        for name, default in vars(defaults).items():
            raw = env.get(_env(name))
            if raw is None or raw.strip() == "":
                continue
            values[name] = _parse(name, raw.strip(), default)
        if "kubeconfig" not in values and env.get("KUBECONFIG"):
            values["kubeconfig"] = env["KUBECONFIG"].split(os.pathsep)[0]
        return cls(**values)


def _env(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _parse(name: str, raw: str, default: object) -> object:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1", "yes")
        if isinstance(default, tuple):
            return tuple(sorted({part.strip() for part in raw.split(",") if part.strip()}))
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
    except ValueError as exc:
        raise OperatorConfigError(f"{_env(name)}={raw!r} is not a {type(default).__name__}") from exc
    return raw
