"""`moe-operator`: OperatorConfig from the environment -> handlers on a registry -> kopf.run.

The one entry point of the operator process (the Helm chart's Deployment runs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Iterator

import kopf

from moe_operator.config import OperatorConfig, OperatorConfigError
from moe_operator.handlers import register
from moe_operator.metrics import OperatorMetrics


def build(config: OperatorConfig) -> tuple[kopf.OperatorRegistry, OperatorMetrics]:
    registry, metrics = kopf.OperatorRegistry(), OperatorMetrics()
    register(registry, config, metrics)
    return registry, metrics


@contextlib.contextmanager
def running(config: OperatorConfig, namespaces: list[str]) -> Iterator[OperatorMetrics]:
    """The operator on its own event loop in a background thread (the fleet simulation and the demo)."""
    registry, metrics = build(config)
    stop, ready = threading.Event(), threading.Event()

    def run() -> None:
        asyncio.run(kopf.operator(registry=registry, standalone=True, namespaces=namespaces,
                                  stop_flag=stop, ready_flag=ready))

    thread = threading.Thread(target=run, name="moe-operator", daemon=True)
    thread.start()
    ready.wait(timeout=60)
    try:
        yield metrics
    finally:
        stop.set()
        thread.join(timeout=30)


def main(argv: list[str] | None = None) -> int:
    try:
        config = OperatorConfig.from_env()
    except OperatorConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    registry, metrics = build(config)
    metrics.serve(config.metrics_port)
    kopf.run(registry=registry, standalone=config.standalone, clusterwide=config.all_namespaces,
             namespaces=list(config.namespaces), liveness_endpoint=config.liveness_endpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
