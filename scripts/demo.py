"""`make demo`: the whole moe-fleet loop on one CPU machine.

The in-repo Kubernetes emulator serves the API; the operator reconciles a MoEDeployment into
StatefulSets; the fleet harness plays the StatefulSet controller and kubelet, running real
`moe-runtime serve` processes (two expert-parallel ranks over gloo) on loopback addresses; skewed gRPC
traffic makes one rank the straggler; the operator re-places experts in place and the imbalance falls.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "runtime"), str(ROOT / "operator")]

from moe_operator.__main__ import running  # noqa: E402
from moe_operator.config import OperatorConfig  # noqa: E402
from moe_operator.emulator import running_cluster  # noqa: E402
from moe_operator.emulator.fleet import Fleet  # noqa: E402
from moe_operator.pods import expert_load, placement  # noqa: E402
from moe_runtime.placement import imbalance  # noqa: E402
from moe_runtime.testing import SkewedLoad, heldout_prompts  # noqa: E402

MANIFEST = ROOT / "examples" / "moedeployment-demo.yaml"
MODEL = ROOT / "models" / "tiny-stdlib-moe"
CRD = ROOT / "crds" / "moedeployments.serving.moefleet.dev.yaml"


def banner(text: str) -> None:
    print(f"\n== {text}", flush=True)


def kubectl(env: dict, *args: str, check: bool = True) -> str:
    if shutil.which("kubectl") is None:
        return "(kubectl not installed: skipped)"
    out = subprocess.run(["kubectl", *args], env=env, capture_output=True, text=True, timeout=60)
    if check and out.returncode:
        raise SystemExit(f"kubectl {' '.join(args)} failed: {out.stderr}")
    return (out.stdout + out.stderr).rstrip()


def status(url: str) -> dict:
    path = "/apis/serving.moefleet.dev/v1alpha1/namespaces/default/moedeployments/demo"
    with urllib.request.urlopen(url + path, timeout=10) as resp:
        return json.loads(resp.read()).get("status") or {}


def events(url: str) -> list[dict]:
    """The operator's events about the MoEDeployment, oldest first."""
    with urllib.request.urlopen(url + "/api/v1/namespaces/default/events", timeout=10) as resp:
        items = json.loads(resp.read()).get("items", [])
    mine = [e for e in items if (e.get("involvedObject") or {}).get("kind") == "MoEDeployment"]
    return sorted(mine, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")


def wait(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def window(admin: str, seconds: float) -> float:
    first = expert_load(admin, timeout=30)
    time.sleep(seconds)
    last = expert_load(admin, timeout=30)
    return imbalance((last.counts - first.counts).sum(axis=2).T)


def show_placement(title: str, p) -> None:
    s = p.slots_per_rank
    print(f"{title} (version {p.version}):")
    for layer, held in enumerate(p.slots):
        ranks = "   ".join(f"rank {r}: {list(held[r * s:(r + 1) * s])}" for r in range(p.num_ranks))
        print(f"  layer {layer}: {ranks}")


def loop(work: Path) -> None:
    with running_cluster(work / "kubeconfig") as cluster:
        env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KUBECACHEDIR": str(work / "kubecache")}
        banner(f"Kubernetes API (in-repo emulator) at {cluster.url}; kubectl apply the CRD and a MoEDeployment")
        print(kubectl(env, "apply", "--validate=false", "-f", str(CRD)))
        config = OperatorConfig(kubeconfig=str(cluster.kubeconfig), load_poll_seconds=1.0, rpc_timeout_seconds=15.0)
        fleet = Fleet(cluster.url, "default", work / "fleet", str(ROOT / "runtime"),
                      volumes={"models": str(MODEL.parent)})
        with fleet, running(config, ["default"]):
            print(kubectl(env, "apply", "--validate=false", "-f", str(MANIFEST)))
            wait(lambda: status(cluster.url).get("readyReplicas") == 1, 180, "the serving group")
            banner("the operator rendered a group of two expert-parallel pods (real moe-runtime processes)")
            print(kubectl(env, "get", "moed,statefulsets,pods,services,configmaps", "-o", "wide"))
            ip = fleet.pod_ip("demo-g0-0")
            admin, address = f"{ip}:8003", f"{ip}:8001"
            before = placement(admin)
            show_placement("placement before", before)
            banner("gRPC traffic: held-out Python source; the model's hot experts make one rank the straggler")
            with SkewedLoad(address, heldout_prompts(MODEL, count=6)) as load:
                for _ in range(30):
                    if status(cluster.url).get("placement", {}).get("currentVersion", 0) >= 1:
                        break
                    print(f"  imbalance over the last 2 s: {window(admin, 2.0):.2f} (max/mean token-slots "
                          f"per rank; 1.00 is balanced)", flush=True)
                banner("the operator re-placed experts in place (ApplyPlacement, no restart)")
                for event in events(cluster.url):
                    print(f"  event {event.get('type', '')}/{event.get('reason', '')}: {event.get('message', '')}")
                show_placement("placement after", placement(admin))
                for _ in range(3):
                    print(f"  imbalance over the last 2 s: {window(admin, 2.0):.2f}", flush=True)
            print(f"  requests served: {load.ok}, failed: {load.failed}")
            banner("kubectl get moed")
            print(kubectl(env, "get", "moed", "-o", "wide"))


def main() -> int:
    for title, gating in (("dynamic gating (dropless, exact per-expert counts)", ["--gating", "dynamic"]),
                          ("static gating, capacity f=0.25 (GShard cf 1.0): overflow tokens dropped",
                           ["--gating", "static", "--capacity-fraction", "0.25"])):
        banner(f"moe-runtime generate --model models/tiny-stdlib-moe, {title}")
        print("prompt: 'def fibonacci(n):\\n'; generated:", flush=True)
        subprocess.run([sys.executable, "-m", "moe_runtime", "generate", "--model", str(MODEL), "--prompt",
                        "def fibonacci(n):\n", "--max-new-tokens", "48", *gating], check=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "runtime")})
    keep = os.environ.get("MOE_DEMO_WORKDIR")  # keep pod logs there for a look afterwards
    if keep:
        loop(Path(keep))
        return 0
    with tempfile.TemporaryDirectory(prefix="moe-demo-") as tmp:
        loop(Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
