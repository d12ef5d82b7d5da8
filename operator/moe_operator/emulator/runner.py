"""Serve a Cluster on a loopback port: in a background thread (tests) or in the foreground (the demo).

Owns the event loop and aiohttp server around the emulator, the seeded namespaces and the kubeconfig.
Stopping ends open watch streams first, so shutdown never waits on a client that keeps watching.
"""

import asyncio
import contextlib
import pathlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp.web
import yaml

from moe_operator.emulator.cluster import Cluster

SEED_NAMESPACES = ('default', 'kube-system')


def write_kubeconfig(path: str | pathlib.Path, url: str, namespace: str = 'default') -> pathlib.Path:
    """A kubeconfig for the emulator: plain HTTP, a user without credentials."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({
        'apiVersion': 'v1', 'kind': 'Config', 'current-context': 'emulator', 'preferences': {},
        'clusters': [{'name': 'emulator', 'cluster': {'server': url}}],
        'users': [{'name': 'emulator', 'user': {}}],
        'contexts': [{'name': 'emulator',
                      'context': {'cluster': 'emulator', 'user': 'emulator', 'namespace': namespace}}],
    }, sort_keys=False))
    return path


async def serve(port: int, stopping: asyncio.Event, started: Callable[[Cluster, int], None],
                **cluster_options: Any) -> None:
    """Serve a new Cluster on 127.0.0.1:port (0: any) until `stopping` is set."""
    cluster = Cluster(**cluster_options)
    async with cluster:  # kmock's handler must be entered to answer errors as Status objects
        server = aiohttp.web.Server(cluster, handler_cancellation=True, access_log=None)
        runner = aiohttp.web.ServerRunner(server, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = aiohttp.web.TCPSite(runner, '127.0.0.1', port)
            await site.start()
            for name in SEED_NAMESPACES:  # kopf -n NS serves only namespaces that exist
                await cluster.create_object('v1/namespaces', {'metadata': {'name': name}})
            started(cluster, runner.addresses[0][1])
            await stopping.wait()
        finally:
            await cluster.close_streams()
            await runner.cleanup()


class RunningCluster:
    """A Cluster served from a background thread with its own event loop.

    `.url`, `.port`, `.kubeconfig` (a path), `.cluster` (the Cluster, for assertions: read it from the
    test thread only while nothing writes, or through `.call()`), `.stop()`; also a context manager.
    """

    def __init__(self, kubeconfig_path: str | pathlib.Path | None = None, port: int = 0,
                 **cluster_options: Any) -> None:
        self._tmpdir = None if kubeconfig_path else tempfile.mkdtemp(prefix='kube-emulator-')
        self.kubeconfig = pathlib.Path(kubeconfig_path or pathlib.Path(self._tmpdir) / 'kubeconfig')
        self.port, self.url, self.cluster = port, '', None
        self._options = cluster_options
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name='kube-emulator', daemon=True)

    def start(self, timeout: float = 30) -> 'RunningCluster':
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            self.stop()
            raise RuntimeError(f'the Kubernetes emulator did not start: {self._error!r}')
        return self

    def stop(self, timeout: float = 10) -> None:
        """Close the watch streams, stop the server and the thread; idempotent."""
        if self._loop is not None and self._stopping is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop may have just closed
                self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)

    def call(self, fn: Callable[[Cluster], Any], timeout: float = 10) -> Any:
        """Run `fn(cluster)` (a function or a coroutine function) in the server's loop; return its result."""
        async def run() -> Any:
            result = fn(self.cluster)
            return await result if asyncio.iscoroutine(result) else result
        assert self._loop is not None, 'the emulator is not running'
        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout)

    def __enter__(self) -> 'RunningCluster':
        return self if self._thread.is_alive() else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _main(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as e:
            self._error = e
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()

        def started(cluster: Cluster, port: int) -> None:
            self.cluster, self.port, self.url = cluster, port, f'http://127.0.0.1:{port}'
            write_kubeconfig(self.kubeconfig, self.url)
            self._ready.set()
        await serve(self.port, self._stopping, started, **self._options)


@contextlib.contextmanager
def running_cluster(kubeconfig_path: str | pathlib.Path | None = None, port: int = 0,
                    **cluster_options: Any) -> Iterator[RunningCluster]:
    """Start an emulated cluster (namespaces default and kube-system) and stop it on exit."""
    handle = RunningCluster(kubeconfig_path, port, **cluster_options).start()
    try:
        yield handle
    finally:
        handle.stop()
