# Sourced by scripts/_setup.sh and bench/_kserve_env.sh: find Python 3.11 and create a venv, once.
# ensure_venv DIR LABEL: create DIR with Python 3.11 (or $PYTHON) unless it has a python already; messages to
# stderr, prefixed with LABEL.

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "error: Python 3.11 is needed; set PYTHON=/path/to/python3.11" >&2
    return 1
}

ensure_venv() {
    local dir="$1" label="$2" py
    if [ ! -x "$dir/bin/python" ]; then
        py="$(find_python)"
        echo "$label: creating $dir with $py" >&2
        "$py" -m venv "$dir"
    fi
}
