"""Prometheus metrics of the operator (moe_operator_*), on their own registry and HTTP port.

Labels are bounded: handler ids, deployment names (one per MoEDeployment), rollout modes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.reconciles = Counter("moe_operator_reconciles", "Reconcile passes.", ["handler"], registry=r)
        self.errors = Counter("moe_operator_errors", "Handler errors, by kind.", ["kind"], registry=r)
        self.rebalances = Counter("moe_operator_rebalances", "Placement changes rolled out.",
                                  ["deployment", "mode"], registry=r)
        self.group_restarts = Counter("moe_operator_group_restarts", "Serving groups restarted whole.",
                                      ["deployment"], registry=r)
        self.imbalance = Gauge("moe_operator_imbalance", "Measured expert-load imbalance (max/mean over ranks).",
                               ["deployment"], registry=r)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
