"""Fleet simulation: emulator + operator + real runtime processes (1 group x 2 gloo ranks, loopback).

Skewed load through gRPC makes one rank the straggler; the operator sees it in GetExpertLoad, plans,
applies the new placement in place, and the measured balance moves to what the planner predicted,
with no request failing meanwhile.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import yaml

from moe_operator.__main__ import running
from moe_operator.config import OperatorConfig
from moe_operator.emulator import running_cluster
from moe_operator.emulator.fleet import Fleet
from moe_operator.pods import expert_load, placement
from moe_runtime.api.v1 import generation_pb2 as gen
from moe_runtime.api.v1 import generation_pb2_grpc as gen_grpc
from moe_runtime.placement import expert_load_from_slots, imbalance, rank_loads, round_robin
from moe_runtime.weights import load_model

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "moedeployments.serving.moefleet.dev.yaml"


def _post(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def _get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=10) as resp:
        return json.loads(resp.read())


def hot_tokens(ranks: int = 2, count: int = 6) -> list[int]:
    """Tokens whose repeated prompts route every layer's top-k to rank 0 under round-robin placement."""
    model = load_model("tiny")
    args = model.args
    rank0 = set(round_robin(args.num_layers, args.num_experts, ranks).slots[0][: -(-args.num_experts // ranks)])
    found = []
    for token in range(args.vocab_size):
        model.reset_counters()
        with torch.no_grad():
            model(torch.tensor([[token] * 8]), torch.arange(8)[None], kv_len=8)
        used = [set(np.nonzero(row)[0].tolist()) for row in model.expert_load().numpy()]
        if all(u <= rank0 for u in used):
            found.append(token)
        if len(found) == count:
            return found
    raise AssertionError("no hot tokens in the tiny preset")


def _deployment() -> dict:
    return {"apiVersion": "serving.moefleet.dev/v1alpha1", "kind": "MoEDeployment",
            "metadata": {"name": "demo", "namespace": "default"},
            "spec": {"model": {"preset": "tiny"}, "replicas": 1, "expertParallelSize": 2,
                     "resources": {"gpus": 0},
                     "rebalancing": {"mode": "InPlace", "planner": "greedy", "observationWindowSeconds": 10,
                                     "imbalanceThreshold": 1.2, "cooldownSeconds": 600},
                     "serving": {"drainGraceSeconds": 5}}}


class _Load:
    """Skewed traffic from a few client threads; counts every request that did not succeed."""

    def __init__(self, address: str, tokens: list[int]):
        self.address, self.tokens = address, tokens
        self.ok = self.failed = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(3)]

    def _run(self, i: int) -> None:
        with grpc.insecure_channel(self.address) as ch:
            stub = gen_grpc.GenerationStub(ch)
            n = 0
            while not self._stop.is_set():
                token = self.tokens[(i + n) % len(self.tokens)]
                n += 1
                req = gen.GenerateRequest(prompt_ids=gen.TokenIds(ids=[token] * 16), max_tokens=1, ignore_eos=True)
                try:
                    stub.GenerateUnary(req, timeout=30)
                    self.ok += 1
                except grpc.RpcError as exc:
                    self.failed += 1
                    self.errors.append(f"{exc.code().name}: {exc.details()}")

    def __enter__(self):
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def _window_imbalance(admin: str, seconds: float) -> tuple[float, np.ndarray, object]:
    first = expert_load(admin)
    time.sleep(seconds)
    last = expert_load(admin)
    assert first.placement_version == last.placement_version
    delta = (last.counts - first.counts)  # [W, L, S]
    slots = delta.transpose(1, 0, 2).reshape(delta.shape[1], -1)  # [L, P]
    return imbalance(delta.sum(axis=2).T), slots, last.placement_version


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(240)
def test_operator_rebalances_a_skewed_group_in_place_without_failing_requests(tmp_path):
    tokens = hot_tokens()
    with running_cluster(tmp_path / "kubeconfig") as cluster:
        _post(cluster.url, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", yaml.safe_load(CRD.read_text()))
        config = OperatorConfig(kubeconfig=str(cluster.kubeconfig), load_poll_seconds=1.0, rpc_timeout_seconds=5.0)
        fleet = Fleet(cluster.url, "default", tmp_path / "fleet", str(ROOT / "runtime"))
        with fleet, running(config, ["default"]):
            _post(cluster.url, "/apis/serving.moefleet.dev/v1alpha1/namespaces/default/moedeployments", _deployment())
            path = "/apis/serving.moefleet.dev/v1alpha1/namespaces/default/moedeployments/demo"
            _wait(lambda: (_get(cluster.url, path).get("status") or {}).get("readyReplicas") == 1, 120, "group ready")
            leader_ip = fleet.pod_ip("demo-g0-0")
            admin, grpc_address = f"{leader_ip}:8003", f"{leader_ip}:8001"
            before = placement(admin)
            with _Load(grpc_address, tokens) as load:
                skewed, slot_load, _ = _window_imbalance(admin, 4.0)
                status = _wait(lambda: (s := _get(cluster.url, path).get("status") or {}).get(
                    "placement", {}).get("currentVersion", 0) >= 1 and s, 90, "a new placement")
                after_placement = placement(admin)
                balanced, _, version = _window_imbalance(admin, 4.0)
            events = _get(cluster.url, "/api/v1/namespaces/default/events").get("items", [])
    expert = expert_load_from_slots(before, slot_load, 8)
    predicted = imbalance(rank_loads(after_placement, expert))
    assert load.failed == 0, load.errors[:3]
    assert skewed > 1.5 and version == after_placement.version >= 1
    assert balanced < skewed and balanced == pytest.approx(predicted, abs=0.15)
    assert status["placement"]["history"][-1]["version"] == after_placement.version
    assert {"Rebalancing", "PlacementApplied"} <= {e.get("reason") for e in events}
