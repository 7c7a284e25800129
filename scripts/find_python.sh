#!/usr/bin/env bash
# find_python MAJOR.MINOR: print a working interpreter of that version (PATH, system
# folders, then pyenv's versions, whose shims may exist without the version installed).
find_python() {
    local want="$1" major="${1%%.*}" minor="${1#*.}"
    local candidates=("python$want" "/usr/bin/python$want" "/usr/local/bin/python$want")
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=("$(pyenv root)"/versions/"$want"*/bin/python"$want")
    fi
    for c in "${candidates[@]}"; do
        if "$c" -c "import sys; assert sys.version_info[:2] == ($major, $minor)" >/dev/null 2>&1; then
            command -v "$c" 2>/dev/null || echo "$c"
            return 0
        fi
    done
    echo "find_python: no working python$want found" >&2
    return 1
}
