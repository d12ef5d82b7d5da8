"""The operator's only door to the Kubernetes API (kubernetes client, dynamic resources, plain dicts).

Apply is create-or-merge-patch, and a no-op when the live object already holds everything rendered,
so a second reconcile pass sends no writes. API errors surface as `Gone` (404) or `Transient` (the
caller retries); other ApiExceptions propagate. Nothing here decides anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kubernetes
from kubernetes import dynamic
from kubernetes.client.exceptions import ApiException
from kubernetes.dynamic.exceptions import DynamicApiError, NotFoundError

Key = tuple[str, str]  # (apiVersion, kind)
MERGE = "application/merge-patch+json"


class Gone(Exception):
    """The object does not exist (any more)."""


class Transient(Exception):
    """The API server could not answer now (conflict, throttling, 5xx): retry later."""


def _contains(live: Any, want: Any) -> bool:
    """Whether `live` already holds every field of `want` (server-added fields are ignored)."""
    if isinstance(want, Mapping):
        return isinstance(live, Mapping) and all(k in live and _contains(live[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and all(map(_contains, live, want))
    return live == want


def _translate(exc: Exception) -> Exception:
    status = getattr(exc, "status", None)
    if status == 404:
        return Gone(str(exc))
    if status in (409, 429) or (isinstance(status, int) and status >= 500):
        return Transient(f"API server answered {status}: {getattr(exc, 'reason', exc)}")
    return exc


class Kube:
    def __init__(self, kubeconfig: str | None = None):
        if kubeconfig:
            api = kubernetes.config.new_client_from_config(config_file=kubeconfig)
        else:
            kubernetes.config.load_incluster_config()
            api = kubernetes.client.ApiClient()
        self.dynamic = dynamic.DynamicClient(api)
        self._resources: dict[Key, Any] = {}

    def _res(self, key: Key):
        if key not in self._resources:
            self._resources[key] = self.dynamic.resources.get(api_version=key[0], kind=key[1])
        return self._resources[key]

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ApiException, DynamicApiError, NotFoundError) as exc:
            raise _translate(exc) from exc

    def get(self, key: Key, namespace: str, name: str) -> dict[str, Any]:
        return self._call(self._res(key).get, name=name, namespace=namespace).to_dict()

    def list(self, key: Key, namespace: str, selector: Mapping[str, str]) -> list[dict[str, Any]]:
        label_selector = ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
        result = self._call(self._res(key).get, namespace=namespace, label_selector=label_selector)
        return [item.to_dict() for item in result.items]

    def apply(self, obj: Mapping[str, Any]) -> str:
        """Create `obj`, or merge-patch it where the live object differs: 'created' | 'patched' | 'unchanged'.

        Immutable ConfigMaps are never patched (they are history: a new version gets a new name)."""
        key, meta = (obj["apiVersion"], obj["kind"]), obj["metadata"]
        try:
            live = self.get(key, meta["namespace"], meta["name"])
        except Gone:
            self._call(self._res(key).create, body=dict(obj), namespace=meta["namespace"])
            return "created"
        want = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
        if _contains(live, want) or live.get("immutable"):
            return "unchanged"
        self._call(self._res(key).patch, body=want, name=meta["name"], namespace=meta["namespace"],
                   content_type=MERGE)
        return "patched"

    def patch(self, key: Key, namespace: str, name: str, body: Mapping[str, Any]) -> None:
        self._call(self._res(key).patch, body=dict(body), name=name, namespace=namespace, content_type=MERGE)

    def delete(self, key: Key, namespace: str, name: str) -> bool:
        """True if it was deleted now, False if it was already gone."""
        try:
            self._call(self._res(key).delete, name=name, namespace=namespace)
        except Gone:
            return False
        return True


def connection_info(kubeconfig: str | None):
    """kopf's credentials from a kubeconfig file (tests, the demo, out-of-cluster) or the pod's account."""
    import kopf

    conf = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(config_file=kubeconfig, client_configuration=conf)
    else:
        kubernetes.config.load_incluster_config(client_configuration=conf)
    header = conf.get_api_key_with_prefix("BearerToken") or conf.get_api_key_with_prefix("authorization")
    parts = header.split(" ", 1) if header else []
    scheme, token = (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0] if parts else None)
    return kopf.ConnectionInfo(
        server=conf.host, ca_path=conf.ssl_ca_cert, insecure=not conf.verify_ssl, scheme=scheme, token=token,
        certificate_path=conf.cert_file, private_key_path=conf.key_file,
        username=conf.username or None, password=conf.password or None,
    )
