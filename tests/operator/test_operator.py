"""The operator against the emulated API server, driven with kubectl as a user would (no runtime pods)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from moe_operator.__main__ import running
from moe_operator.config import OperatorConfig

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "moedeployments.serving.moefleet.dev.yaml"
EXAMPLE = ROOT / "examples" / "moedeployment-tiny.yaml"


def _wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _json(kubectl, *args) -> dict:
    return json.loads(kubectl(*args, "-o", "json").stdout)


def _names(kubectl, kind: str) -> set[str]:
    return {o["metadata"]["name"] for o in _json(kubectl, "get", kind, "-l",
                                                 "serving.moefleet.dev/deployment=tiny")["items"]}


@pytest.fixture
def operator(emulator, kubectl):
    kubectl("apply", "--validate=false", "-f", str(CRD))
    config = OperatorConfig(kubeconfig=str(emulator.kubeconfig), load_poll_seconds=1.0)
    with running(config, ["default"]) as metrics:
        yield metrics


def test_apply_scale_update_and_delete_a_moedeployment(operator, kubectl):
    kubectl("apply", "--validate=false", "-f", str(EXAMPLE))
    _wait(lambda: _names(kubectl, "statefulsets") == {"tiny-g0"}, 30, "the StatefulSet")
    sts = _json(kubectl, "get", "statefulset", "tiny-g0")
    assert sts["spec"]["podManagementPolicy"] == "Parallel" and sts["spec"]["updateStrategy"]["type"] == "OnDelete"
    assert sts["metadata"]["ownerReferences"][0]["kind"] == "MoEDeployment"
    assert _names(kubectl, "services") == {"tiny", "tiny-ranks"}
    assert {"tiny-runtime", "tiny-placement", "tiny-placement-0"} <= _names(kubectl, "configmaps")
    assert _names(kubectl, "poddisruptionbudgets") == {"tiny-g0"}
    assert len(_names(kubectl, "networkpolicies")) == 1
    table = kubectl("get", "moed", "tiny").stdout
    assert table.split()[:5] == ["NAME", "READY", "REPLICAS", "PLACEMENT", "IMBALANCE"]

    kubectl("scale", "moed/tiny", "--replicas", "2")
    _wait(lambda: _names(kubectl, "statefulsets") == {"tiny-g0", "tiny-g1"}, 30, "a second group")

    kubectl("patch", "moed", "tiny", "--type=merge", "-p", '{"spec": {"serving": {"maxQueue": 7}}}')
    _wait(lambda: "max_queue: 7" in _json(kubectl, "get", "configmap", "tiny-runtime")["data"]["runtime.yaml"],
          30, "the runtime config to follow the spec")

    kubectl("delete", "statefulset", "tiny-g1")  # drift: the operator repairs it
    _wait(lambda: "tiny-g1" in _names(kubectl, "statefulsets"), 30, "drift repair")

    kubectl("delete", "moed", "tiny", "--timeout=60s")
    for kind in ("statefulsets", "services", "configmaps", "poddisruptionbudgets", "networkpolicies"):
        assert _names(kubectl, kind) == set(), kind
    assert "tiny" not in kubectl("get", "moed", check=False).stdout


def test_a_second_reconcile_pass_writes_nothing(operator, kubectl, emulator):
    kubectl("apply", "--validate=false", "-f", str(EXAMPLE))
    _wait(lambda: _json(kubectl, "get", "moed", "tiny").get("status", {}).get("replicas") == 1, 30, "status")
    time.sleep(2.5)  # a few timer passes
    before = {o["metadata"]["name"]: o["metadata"]["resourceVersion"]
              for kind in ("statefulsets", "configmaps", "services")
              for o in _json(kubectl, "get", kind)["items"]}
    time.sleep(2.5)
    after = {o["metadata"]["name"]: o["metadata"]["resourceVersion"]
             for kind in ("statefulsets", "configmaps", "services")
             for o in _json(kubectl, "get", kind)["items"]}
    assert before == after


def test_invalid_moedeployments_are_rejected_like_the_api_server_does(operator, kubectl, tmp_path):
    bad = yaml.safe_load(EXAMPLE.read_text())
    bad["spec"]["replicas"] = -1
    bad["spec"]["gating"] = {"mode": "sometimes"}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(bad))
    result = kubectl("apply", "--validate=false", "-f", str(path), check=False)
    assert result.returncode != 0
    assert 'The MoEDeployment "tiny" is invalid' in result.stderr
    assert "spec.replicas" in result.stderr and "spec.gating.mode" in result.stderr


def test_an_impossible_spec_ends_as_a_degraded_condition(operator, kubectl, tmp_path):
    impossible = yaml.safe_load(EXAMPLE.read_text())
    impossible["spec"]["expertParallelSize"] = 16  # the tiny preset has 8 experts
    path = tmp_path / "impossible.yaml"
    path.write_text(yaml.safe_dump(impossible))
    kubectl("apply", "--validate=false", "-f", str(path))
    conditions = _wait(lambda: _json(kubectl, "get", "moed", "tiny").get("status", {}).get("conditions"), 30,
                       "a status condition")
    degraded = next(c for c in conditions if c["type"] == "Degraded")
    assert degraded["status"] == "True" and degraded["reason"] == "InvalidSpec"
    assert "expertParallelSize" in degraded["message"]
    assert _names(kubectl, "statefulsets") == set()
