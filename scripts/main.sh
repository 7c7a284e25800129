#!/usr/bin/env bash
# The main job: set up .venv, fetch SmolLM2-135M, build a small data set (~1 min) and
# reproduce the paper's Table 1 on it (`reproduce --preset cpu`, <= 20 min on 2 cores).
# Re-running resumes where it stopped. Extra arguments go to `mode-jax reproduce`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/setup.sh")"
data="${XDG_CACHE_HOME:-$HOME/.cache}/mode-jax/data-cpu"
"$py" -m mode_jax.cli fetch smollm2-135m
"$py" -m mode_jax.cli data info --dir "$data" >/dev/null 2>&1 || \
    "$py" -m mode_jax.cli data build --out "$data" --math-examples 4000 --max-documents 400
out="$root/runs/table1-cpu"
resume=()
[ -f "$out/config.toml" ] && resume=(--resume)
exec "$py" -m mode_jax.cli reproduce --preset cpu --data-dir "$data" --out "$out" "${resume[@]}" "$@"
