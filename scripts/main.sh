#!/usr/bin/env bash
# The main job: set up .venv, then run MoDE end to end.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/setup.sh")"
exec "$py" -m mode_jax.cli demo "$@"
