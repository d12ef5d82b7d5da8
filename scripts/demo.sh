#!/usr/bin/env bash
# `make demo`: the whole loop on the CPU (see scripts/demo.py).
set -euo pipefail
py="${1:-.venv/bin/python}"
exec "$py" scripts/demo.py
