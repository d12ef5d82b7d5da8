"""Plays the StatefulSet controller and the kubelet for the emulator, with real runtime processes.

Pods are made only from StatefulSets the operator rendered (OnDelete: a deleted pod is recreated).
Each pod gets its own loopback address 127.0.0.N as status.podIP and runs a real `moe-runtime serve`
with the container's command, env and mounted ConfigMaps. What a real cluster's network provides is
emulated, and only that: DNS names (the rendezvous address) resolve to pod IPs, the runtime binds its
pod IP (a pod's own network namespace), and each group's rendezvous port is distinct (one host). A
process that exits is restarted (restartPolicy Always, restartCount++); readiness comes from gRPC health.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_DNS = re.compile(r"^(?P<pod>[a-z0-9-]+)\.(?P<svc>[a-z0-9-]+)\.(?P<ns>[a-z0-9-]+)\.svc(\.[a-z.]+)?:(?P<port>\d+)$")


@dataclass
class _Pod:
    name: str
    namespace: str
    ip: str
    group: int
    workdir: Path
    process: subprocess.Popen | None = None
    restarts: int = 0
    ready: bool = False
    log: Any = None
    spec: dict = field(default_factory=dict)


@dataclass
class Fleet:
    """`with Fleet(api_url, namespace, workdir, runtime_root) as fleet:` runs the controllers in a thread."""

    api_url: str
    namespace: str
    workdir: Path
    runtime_path: str  # PYTHONPATH entry holding moe_runtime
    volumes: dict[str, str] = field(default_factory=dict)  # PVC claimName -> local directory
    # Pods whose template this returns True for never start (a bad node, an image that will not run):
    # they stay Pending and never become ready, as a rollout's broken group would.
    refuse: Any = None
    period: float = 0.25
    _pods: dict[str, _Pod] = field(default_factory=dict)
    _next_ip: int = 2
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    # ---- REST ------------------------------------------------------------------------------------
    def _req(self, method: str, path: str, body: Any = None, content_type: str = "application/json"):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.api_url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise

    def _pods_path(self, name: str = "") -> str:
        return f"/api/v1/namespaces/{self.namespace}/pods" + (f"/{name}" if name else "")

    def _patch_status(self, name: str, status: dict) -> None:
        self._req("PATCH", self._pods_path(name) + "/status", {"status": status}, "application/merge-patch+json")

    # ---- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> Fleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="fleet", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for pod in list(self._pods.values()):
            self._kill(pod)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # the API may be briefly unavailable; keep playing the controllers
                print(f"fleet: {exc!r}", file=sys.stderr)
            self._stop.wait(self.period)

    def sync(self) -> None:
        sets = (self._req("GET", f"/apis/apps/v1/namespaces/{self.namespace}/statefulsets") or {}).get("items", [])
        live = {p["metadata"]["name"]: p for p in (self._req("GET", self._pods_path()) or {}).get("items", [])}
        wanted = {}
        for sts in sets:
            for ordinal in range(sts["spec"].get("replicas", 1)):
                wanted[f"{sts['metadata']['name']}-{ordinal}"] = sts
        for name, pod in list(self._pods.items()):  # deleted by the operator, or no longer wanted
            if name not in live or name not in wanted or live[name]["metadata"].get("deletionTimestamp"):
                self._kill(pod)
                del self._pods[name]
                if name in live:
                    self._req("DELETE", self._pods_path(name))
                live.pop(name, None)
        for name, sts in wanted.items():
            if name not in live:
                self._create(name, sts)
        for pod in list(self._pods.values()):
            self._kubelet(pod)

    # ---- StatefulSet controller -------------------------------------------------------------------
    def _create(self, name: str, sts: dict) -> None:
        template = sts["spec"]["template"]
        meta = {"name": name, "namespace": self.namespace, "labels": dict(template["metadata"].get("labels", {})),
                "annotations": dict(template["metadata"].get("annotations", {}))}
        self._req("POST", self._pods_path(), {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
                                              "spec": template["spec"]})
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        group = int(meta["labels"].get("serving.moefleet.dev/group", 0))
        pod = _Pod(name, self.namespace, ip, group, self.workdir / f"{name}-{self._next_ip}")
        self._pods[name] = pod
        self._patch_status(name, {"phase": "Pending", "podIP": ip, "podIPs": [{"ip": ip}]})
        if self.refuse is not None and self.refuse(template):
            return
        self._start(pod, template["spec"])

    # ---- kubelet ------------------------------------------------------------------------------------
    def _start(self, pod: _Pod, spec: dict) -> None:
        container = spec["containers"][0]
        env = self._env(pod, container)
        args = [_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in container["command"]]
        args = self._mount(pod, spec, container, args)
        if args[:2] == ["moe-runtime", "serve"]:
            args = [sys.executable, "-m", "moe_runtime", "serve", *args[2:], "--host", pod.ip]
        pod.workdir.mkdir(parents=True, exist_ok=True)
        pod.log = open(pod.workdir / "log.txt", "a")  # noqa: SIM115 (closed in _kill)
        proc_env = {**os.environ, **env, "PYTHONPATH": self.runtime_path, "GLOO_SOCKET_IFNAME": "lo"}
        pod.process = subprocess.Popen(args, stdout=pod.log, stderr=subprocess.STDOUT, env=proc_env,
                                       cwd=pod.workdir, start_new_session=True)
        pod.spec = spec
        self._patch_status(pod.name, {"phase": "Running", "podIP": pod.ip, "containerStatuses": [
            {"name": container["name"], "restartCount": pod.restarts, "ready": False, "started": True}]})

    def _env(self, pod: _Pod, container: dict) -> dict[str, str]:
        fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace, "status.podIP": pod.ip}
        env = {}
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
            env[item["name"]] = fields.get(ref, "") if ref else _VAR.sub(
                lambda m: env.get(m.group(1), m.group(0)), item.get("value", ""))
        if "MOE_LEADER_ADDRESS" in env:
            env["MOE_LEADER_ADDRESS"] = self._resolve(env["MOE_LEADER_ADDRESS"], pod.group)
        env.pop("HOME", None)  # the container's home is an emptyDir; here the pod's workdir stands in
        for key in ("XDG_CACHE_HOME", "TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "CUDA_CACHE_PATH"):
            env.pop(key, None)
        return env

    def _resolve(self, address: str, group: int) -> str:
        """DNS: `<pod>.<svc>.<ns>.svc:port` -> the pod's IP; one port per group since all share a host."""
        m = _DNS.match(address)
        if m is None:
            return address
        target = self._pods.get(m.group("pod"))
        ip = target.ip if target is not None else "127.0.0.1"
        return f"{ip}:{int(m.group('port')) + group}"

    def _mount(self, pod: _Pod, spec: dict, container: dict, args: list[str]) -> list[str]:
        """Volumes on the host: ConfigMaps written under the pod's workdir, PVCs mapped to local folders.
        Mount paths in the command and in the mounted files (runtime.yaml names the model path) are
        rewritten to those places, as the container's mount namespace would present them."""
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mounts: dict[str, Path] = {}
        files: list[tuple[Path, str]] = []
        for mount in container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})
            local = pod.workdir / "mounts" / mount["name"]
            if "configMap" in volume:
                cm = self._req("GET", f"/api/v1/namespaces/{self.namespace}/configmaps/{volume['configMap']['name']}")
                files += [(local / key, text) for key, text in ((cm or {}).get("data") or {}).items()]
                mounts[mount["mountPath"]] = local / mount["subPath"] if mount.get("subPath") else local
            elif "persistentVolumeClaim" in volume:
                mounts[mount["mountPath"]] = Path(self.volumes.get(volume["persistentVolumeClaim"]["claimName"], local))
        for path, text in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(_rewrite_paths(text, mounts))
        return [_rewrite_paths(a, mounts) for a in args]

    def _kubelet(self, pod: _Pod) -> None:
        if pod.process is None:
            return
        if pod.process.poll() is not None:  # the container exited: restart it, as restartPolicy Always does
            pod.restarts += 1
            pod.ready = False
            pod.log.close()
            self._start(pod, pod.spec)
            return
        probe = pod.spec["containers"][0].get("readinessProbe", {}).get("grpc", {})
        ready = _serving(f"{pod.ip}:{probe.get('port', 8001)}")
        if ready != pod.ready:
            pod.ready = ready
            self._patch_status(pod.name, {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                                          "containerStatuses": [{"name": "runtime", "restartCount": pod.restarts,
                                                                 "ready": ready, "started": True}]})

    def _kill(self, pod: _Pod, grace: float = 10.0) -> None:
        proc = pod.process
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if pod.log is not None:
            pod.log.close()
        pod.process = None

    def pod_ip(self, name: str) -> str | None:
        pod = self._pods.get(name)
        return pod.ip if pod is not None else None

    def kill_process(self, name: str) -> None:
        """Crash a pod's runtime (SIGKILL), as a failing container would."""
        pod = self._pods[name]
        if pod.process is not None:
            os.killpg(pod.process.pid, signal.SIGKILL)


def _rewrite_paths(text: str, mounts: dict[str, Path]) -> str:
    for target in sorted(mounts, key=len, reverse=True):  # the longest mount path wins (/etc/moe/placement)
        text = re.sub(re.escape(target) + r"(?=/|\b|$)", str(mounts[target]), text)
    return text


def _serving(address: str) -> bool:
    try:
        with grpc.insecure_channel(address) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=1.0).status
        return status == health_pb2.HealthCheckResponse.SERVING
    except grpc.RpcError:
        return False
