"""Shared fixtures for the operator's tests."""

import os
import subprocess
from collections.abc import Callable, Iterator

import pytest

from moe_operator.emulator import RunningCluster, running_cluster

# --- Kubernetes emulator (moe_operator.emulator) -------------------------------------------------------


@pytest.fixture()
def emulator(tmp_path) -> Iterator[RunningCluster]:
    """An emulated Kubernetes API server with namespaces default and kube-system; `.kubeconfig` for it.

    Stop operators (KopfRunner) inside the test, before this fixture stops the server.
    """
    with running_cluster(tmp_path / 'kubeconfig') as cluster:
        yield cluster


@pytest.fixture()
def kubectl(emulator: RunningCluster, tmp_path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`kubectl(*args, input=None, check=True)` against the emulator, with its own discovery cache."""
    env = {**os.environ, 'KUBECONFIG': str(emulator.kubeconfig), 'KUBECACHEDIR': str(tmp_path / 'kubecache'),
           'HOME': str(tmp_path)}

    def run(*args: str, input: str | None = None, check: bool = True, timeout: float = 20):
        result = subprocess.run(['kubectl', *args], input=input, env=env, capture_output=True, text=True,
                                timeout=timeout)
        if check and result.returncode:
            raise AssertionError(f'kubectl {" ".join(args)} failed ({result.returncode}): {result.stderr}')
        return result
    run.env = env
    return run
