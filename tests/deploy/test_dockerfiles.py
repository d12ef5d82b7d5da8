"""Static checks of the two Dockerfiles (no Docker here): base images, users, ports, no torch in the
operator image. README says how to build them."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from moe_runtime.config import ServingConfig

ROOT = Path(__file__).resolve().parents[2]
OPERATOR, RUNTIME = ROOT / "operator" / "Dockerfile", ROOT / "runtime" / "Dockerfile"
TORCH_PACKAGES = ("torch", "transformers", "safetensors", "triton", "nvidia-")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", text, re.M)]


def last(path: Path, name: str) -> str:
    return [args for op, args in instructions(path) if op == name][-1]


def base_image(path: Path) -> str:
    image = last(path, "FROM").split()[0]
    args = dict(a.split("=", 1) for op, a in instructions(path) if op == "ARG" and "=" in a)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], image)


@pytest.mark.parametrize("path", [OPERATOR, RUNTIME], ids=["operator", "runtime"])
def test_image_runs_as_a_numeric_non_root_user(path):
    user = last(path, "USER")
    assert re.fullmatch(r"\d+(:\d+)?", user), user
    assert all(int(part) != 0 for part in user.split(":"))


def test_operator_image_never_installs_torch():
    runs = " ".join(args for op, args in instructions(OPERATOR) if op == "RUN").lower()
    assert not any(pkg in runs for pkg in TORCH_PACKAGES) and "[runtime]" not in runs
    assert re.search(r"pip install --no-deps \.", runs)  # the package without its extras' resolver
    requirements = (ROOT / "requirements-operator.txt").read_text().lower()
    assert not any(re.search(rf"^{re.escape(pkg)}", requirements, re.M) for pkg in TORCH_PACKAGES)
    assert base_image(OPERATOR).startswith("python:3.11-slim")


def test_runtime_image_is_based_on_a_cuda_pytorch_image():
    assert re.fullmatch(r"pytorch/pytorch:2\.\d+(\.\d+)?-cuda12\.\d+-cudnn9-runtime", base_image(RUNTIME))
    requirements = (ROOT / "requirements-runtime.txt").read_text()
    assert not re.search(r"^torch\b", requirements, re.M)  # the base image's CUDA torch stays
    assert re.search(r"pip install --no-deps \.", last(RUNTIME, "RUN"))


def test_runtime_image_exposes_the_runtime_ports():
    exposed = {int(p.split("/")[0]) for p in last(RUNTIME, "EXPOSE").split()}
    defaults = ServingConfig()
    assert exposed == {8001, 8002, 8003, 29500}
    assert {defaults.grpc_port, defaults.metrics_port, defaults.admin_port} <= exposed


@pytest.mark.parametrize(("path", "script"), [(OPERATOR, "moe-operator"), (RUNTIME, "moe-runtime")],
                         ids=["operator", "runtime"])
def test_entrypoint_is_the_console_script(path, script):
    assert last(path, "ENTRYPOINT") == f'["{script}"]'
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert script in scripts
