#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv with Python 3.12
# and install mode-jax with its test and data extras. Sourced by the other scripts;
# re-installs only when pyproject.toml changed. Prints the venv's python path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MODE_JAX_VENV:-$root/.venv}"

source "$root/scripts/find_python.sh"

stamp="$venv/.mode-jax-installed"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    py="$(find_python 3.12)" || { echo "setup.sh: no working python3.12 found (jax 0.11.2 needs Python 3.12); install it or set PATH" >&2; exit 1; }
    echo "setup.sh: creating $venv with $py" >&2
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --upgrade pip >&2
    "$venv/bin/python" -m pip install -q -e "$root[test,data]" >&2
    echo "$want" > "$stamp"
fi
echo "$venv/bin/python"
