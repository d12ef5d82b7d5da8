#!/usr/bin/env bash
# The README's test command (`make test`) ends here: the CPU test suite. pytest's exit code 5
# ("no tests collected") is a failure, as is any failed test.
set -uo pipefail
py="${1:-.venv/bin/python}"
"$py" -m pytest -q -m "not gpu and not slow" "${@:2}"
rc=$?
if [ "$rc" -eq 5 ]; then echo "no tests collected: failing" >&2; exit 1; fi
exit "$rc"
