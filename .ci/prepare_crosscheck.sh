#!/usr/bin/env bash
# Prepare what tests/test_crosscheck_transformers.py needs, once per machine:
#   1. a Python 3.11 virtual environment with torch + transformers (tests/crosscheck/requirements.txt)
#      at $MODE_JAX_PY311_VENV (default .venv311 in the repo root); reused while the
#      requirements file is unchanged;
#   2. the pretrained backbone in the mode-jax cache (`mode-jax fetch smollm2-135m`).
# The main environment's python is $MODE_JAX_PYTHON, or the one scripts/setup.sh makes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MODE_JAX_PY311_VENV:-$root/.venv311}"
req="$root/tests/crosscheck/requirements.txt"
stamp="$venv/.mode-jax-crosscheck-requirements"
want="$(sha256sum "$req" | cut -d' ' -f1)"

source "$root/scripts/find_python.sh"

start=$SECONDS
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    py311="$(find_python 3.11)" || { echo "prepare_crosscheck.sh: no working python3.11 found (the torch CPU wheel needs 3.11)" >&2; exit 1; }
    echo "prepare_crosscheck.sh: creating $venv with $py311" >&2
    rm -f "$stamp"
    "$py311" -m venv "$venv"
    "$venv/bin/python" -m pip install -q -r "$req" >&2
    echo "$want" > "$stamp"
    echo "prepare_crosscheck.sh: $venv ready in $((SECONDS - start)) s" >&2
fi

py="${MODE_JAX_PYTHON:-$(bash "$root/scripts/setup.sh")}"
"$py" -m mode_jax.cli fetch smollm2-135m --quiet >&2
echo "prepare_crosscheck.sh: done in $((SECONDS - start)) s" >&2
