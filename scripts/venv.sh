#!/usr/bin/env bash
# Creates (or refreshes) the project venv from the pinned CI requirements, then installs the project
# itself in editable mode so the console scripts (moe-runtime, moe-client, moe-operator) exist.
set -euo pipefail
venv="${1:-.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r requirements-ci.txt
"$venv/bin/python" -m pip install -q --no-deps -e .
