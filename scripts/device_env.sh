#!/usr/bin/env bash
# Source on a machine where mode-jax cannot be pip-installed (e.g. an offline GPU box
# whose python already has jax): lays the package out under /tmp/mode_jax_pkg with the
# same import names as an install (mode_jax.ref, .fast, .kernels) and puts it on PYTHONPATH.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
pkg=/tmp/mode_jax_pkg
rm -rf "$pkg" && mkdir -p "$pkg"
cp -r "$root/mode_jax" "$pkg/mode_jax"
for sub in ref fast kernels; do cp -r "$root/$sub" "$pkg/mode_jax/$sub"; done
export PYTHONPATH="$pkg:$root${PYTHONPATH:+:$PYTHONPATH}"
