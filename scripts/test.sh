#!/usr/bin/env bash
# The test command: set up .venv (and, once per machine, the Python 3.11 transformers
# environment and the SmolLM2 download that the crosscheck tests compare against),
# then run the whole suite on CPU. pytest's exit code 5 (no tests) counts as failure.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/setup.sh")" || exit 1
MODE_JAX_PYTHON="$py" bash "$root/.ci/prepare_crosscheck.sh" || exit 1
cd "$root"
"$py" -m pytest -q "$@"
status=$?
if [ "$status" -eq 5 ]; then
    echo "test.sh: pytest collected no tests" >&2
    exit 1
fi
exit "$status"
