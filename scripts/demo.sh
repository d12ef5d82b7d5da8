#!/usr/bin/env bash
# `make demo`: the main job on an embedded default (tiny model, CPU). Grows with the project: today it
# generates from the tiny preset with dynamic gating and with the static capacity baseline.
set -euo pipefail
py="${1:-.venv/bin/python}"
bin="$(dirname "$py")"
prompt='def fibonacci(n):'
echo "== moe-runtime generate: tiny preset, dynamic gating (dropless, exact per-expert counts)"
"$bin/moe-runtime" generate --model tiny --prompt "$prompt" --max-new-tokens 24 --gating dynamic --json
echo
echo "== moe-runtime generate: tiny preset, static gating (fairseq/GShard capacity, f=0.25 drops tokens)"
"$bin/moe-runtime" generate --model tiny --prompt "$prompt" --max-new-tokens 24 --gating static \
  --capacity-fraction 0.25 --json
echo
echo "== static gating with ample capacity (f=2.0) generates the dynamic tokens"
"$bin/moe-runtime" generate --model tiny --prompt "$prompt" --max-new-tokens 24 --gating static \
  --capacity-fraction 2.0 --json
