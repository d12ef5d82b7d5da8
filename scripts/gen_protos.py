"""Regenerates the committed gRPC stubs: every protos/**/*.proto -> runtime/moe_runtime/api/ (`make protos`).

protoc runs with `-I protos`, so protos/moe_runtime/api/v1/x.proto becomes moe_runtime/api/v1/x_pb2.py
and its _pb2_grpc.py imports `from moe_runtime.api.v1 import x_pb2`, which resolves because moe_runtime
is the importable package. Stale stubs are removed first and each package gets an __init__.py.
`--out DIR` writes DIR/moe_runtime/api/... instead (the freshness test generates into a temp dir).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
API = Path("moe_runtime", "api")
INIT = '"""Generated gRPC stubs; regenerate with `make protos`."""\n'
GENERATED = ("*_pb2.py", "*_pb2.pyi", "*_pb2_grpc.py", "__init__.py")


def gen_protos(out: Path) -> list[Path]:
    """Generates the stubs under out/moe_runtime/api; returns the files written, sorted."""
    protos = sorted(p.relative_to(PROTOS).as_posix() for p in PROTOS.rglob("*.proto"))
    if not protos:
        raise SystemExit(f"no .proto files under {PROTOS}")
    out = out.resolve()
    api = out / API
    for pattern in GENERATED:
        for stale in api.rglob(pattern):
            stale.unlink()
    api.mkdir(parents=True, exist_ok=True)
    # `python -m grpc_tools.protoc` adds the bundled google/protobuf/*.proto include path itself.
    cmd = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        "-I",
        str(PROTOS),
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *protos,
    ]
    subprocess.run(cmd, check=True, cwd=PROTOS)
    packages = {api}
    for stub in api.rglob("*_pb2.py"):
        packages.update(d for d in stub.parents if d.is_relative_to(api))
    for package in packages:
        (package / "__init__.py").write_text(INIT)
    return sorted(p for pattern in GENERATED for p in api.rglob(pattern))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "runtime",
        help="directory that receives moe_runtime/api/ (default: runtime/)",
    )
    args = parser.parse_args()
    out = args.out.resolve()
    for path in gen_protos(out):
        print(path.relative_to(out))


if __name__ == "__main__":
    main()
