# Sourced by run.sh and test.sh: create .venv and install the project into it, once.
# Idempotent: the install is skipped when pyproject.toml has not changed since the last one,
# so a second call costs well under a second.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv"
stamp="$venv/.distml-install-stamp"

source "$repo_root/scripts/_venv.sh"
ensure_venv "$venv" setup

want="$(cat "$repo_root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    echo "setup: installing distml and its dependencies into .venv (first run takes a few minutes)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$repo_root[dev,ray]"
    echo "$want" >"$stamp"
fi

export PATH="$venv/bin:$PATH"
