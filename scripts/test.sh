#!/usr/bin/env bash
# The test command: set up .venv (and, once per machine, the Python 3.11 transformers
# environment and the SmolLM2 download that the crosscheck tests compare against),
# then run the whole suite on CPU. pytest's exit code 5 (no tests) counts as failure.
#
# With no arguments the suite runs as four pytest processes over consecutive groups of
# test files, one after another: a single process that had compiled some thousands of
# XLA programs crashed once inside XLA's CPU compiler (SIGSEGV, ~250 tests in, not
# reproducible in any subset), and fresh processes keep that state small. The last line
# adds the groups up. Arguments (e.g. `-k mode`, a file) run one pytest as given.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="$(bash "$root/scripts/setup.sh")" || exit 1
MODE_JAX_PYTHON="$py" bash "$root/.ci/prepare_crosscheck.sh" || exit 1
cd "$root"

if [ "$#" -gt 0 ]; then
    "$py" -m pytest -q "$@"
    status=$?
    [ "$status" -eq 5 ] && { echo "test.sh: pytest collected no tests" >&2; exit 1; }
    exit "$status"
fi

groups=4
mapfile -t files < <(ls tests/test_*.py)
reports="$(mktemp -d)"
trap 'rm -rf "$reports"' EXIT
status=0
for ((g = 0; g < groups; g++)); do
    chunk=()
    for ((i = g; i < ${#files[@]}; i += groups)); do chunk+=("${files[$i]}"); done
    echo "test.sh: group $((g + 1))/$groups: ${#chunk[@]} files" >&2
    "$py" -m pytest -q --junitxml="$reports/group$g.xml" "${chunk[@]}"
    s=$?
    if [ "$s" -ne 0 ]; then
        [ "$s" -eq 5 ] && echo "test.sh: group $((g + 1)) collected no tests" >&2
        status=1
    fi
done
# One closing line for the whole suite, from the groups' JUnit reports.
"$py" - "$reports" "$groups" <<'PY' || status=1
import sys, pathlib, xml.etree.ElementTree as ET
root, groups = pathlib.Path(sys.argv[1]), int(sys.argv[2])
tests = failed = skipped = 0
found = sorted(root.glob("group*.xml"))
for path in found:
    for suite in ET.parse(path).getroot().iter("testsuite"):
        tests += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
missing = groups - len(found)    # a group whose process died wrote no report
print(f"total: {tests - failed - skipped} passed, {failed + missing} failed" + (f", {skipped} skipped" if skipped else ""))
sys.exit(1 if failed or missing or tests == 0 else 0)
PY
exit "$status"
