#!/usr/bin/env bash
# The test command: set up .venv, then run the whole suite on CPU.
# pytest's exit code 5 (no tests collected) counts as a failure.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/setup.sh")" || exit 1
cd "$root"
"$py" -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
