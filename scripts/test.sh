#!/usr/bin/env bash
# The test command: set up .venv (and, once per machine, the Python 3.11 transformers
# environment and the SmolLM2 download that the crosscheck tests compare against),
# then run the whole suite on CPU. pytest's exit code 5 (no tests) counts as failure.
#
# With no arguments every test file runs in its own pytest process, two at a time
# (MODE_JAX_TEST_JOBS; the suite is mostly single-threaded XLA compiles, so two cores
# run two files at once). One process per file because a process that has compiled some
# thousands of XLA programs can crash inside XLA's CPU compiler (SIGSEGV in
# backend_compile_and_load): it happened ~250 tests into one process and, repeatably,
# ~170 tests into a group of 15 files, in a test that passes in any smaller company.
# A file whose process dies by a signal runs once more (its log says so); a second
# death, like any failing test, fails the suite. Each file prints one line (its log in
# full when it fails); the last line adds them up. Arguments (e.g. `-k mode`, a file)
# run one pytest as given.
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

reports="$(mktemp -d)"
trap 'rm -rf "$reports"' EXIT
export py reports
run_file() {
    local f="$1" name s start
    name="$(basename "$f" .py)"
    start=$SECONDS
    "$py" -m pytest -q -p no:cacheprovider --junitxml="$reports/$name.xml" "$f" >"$reports/$name.log" 2>&1
    s=$?
    if [ "$s" -ge 128 ]; then
        echo "test.sh: $f died by signal $((s - 128)); running it again in a fresh process" >>"$reports/$name.log"
        rm -f "$reports/$name.xml"
        "$py" -m pytest -q -p no:cacheprovider --junitxml="$reports/$name.xml" "$f" >>"$reports/$name.log" 2>&1
        s=$?
    fi
    {
        flock 9 2>/dev/null
        echo "test.sh: $f: $(tail -n 1 "$reports/$name.log") [exit $s, $((SECONDS - start)) s]"
        [ "$s" -ne 0 ] && cat "$reports/$name.log"
    } 9>>"$reports/.print-lock"
    return 0
}
export -f run_file
ls tests/test_*.py >"$reports/files"
xargs -P "${MODE_JAX_TEST_JOBS:-2}" -I{} bash -c 'run_file "$1"' _ {} <"$reports/files"

# One closing line for the whole suite, from the files' JUnit reports.
"$py" - "$reports" <<'PY'
import sys, pathlib, xml.etree.ElementTree as ET
root = pathlib.Path(sys.argv[1])
files = [pathlib.Path(f).stem for f in (root / "files").read_text().split()]
tests = failed = skipped = 0
missing = []        # a file whose process died (or collected nothing) wrote no usable report
for name in files:
    path = root / f"{name}.xml"
    if not path.is_file():
        missing.append(name)
        continue
    n = 0
    for suite in ET.parse(path).getroot().iter("testsuite"):
        n += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    tests += n
    if n == 0:
        missing.append(name)
if missing:
    print(f"test.sh: no results from {', '.join(missing)}", file=sys.stderr)
print(f"total: {tests - failed - skipped} passed, {failed + len(missing)} failed"
      + (f", {skipped} skipped" if skipped else "") + f" ({len(files)} files)")
sys.exit(1 if failed or missing or tests == 0 else 0)
PY
