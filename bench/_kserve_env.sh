#!/usr/bin/env bash
# Create the separate venv for the KServe baseline server (bench/_kserve_server.py): .venv-kserve.
#
# Kept apart from .venv because kserve pins its own fastapi/uvicorn/pydantic/protobuf versions, which may
# conflict with mlflow's. kserve 0.21.0 does not need torch. Installs from the package index only.
# Idempotent: the install is skipped when the requirement list below has not changed (stamp file).
# Prints the venv's python at the end (the only line on stdout), e.g.
#   py="$(bench/_kserve_env.sh)" && "$py" bench/_kserve_server.py --model-dir DIR --port 18080
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/.venv-kserve"
stamp="$venv/.kserve-install-stamp"
requirements=(kserve==0.21.0 onnxruntime numpy pillow)

source "$repo_root/scripts/_venv.sh"
ensure_venv "$venv" kserve-env

want="$(printf '%s\n' "${requirements[@]}" | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    echo "kserve-env: installing ${requirements[*]} into $venv (first run takes a minute or two)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}" >&2
    "$venv/bin/python" -c 'import kserve, onnxruntime, numpy, PIL' >&2
    echo "$want" >"$stamp"
fi

echo "$venv/bin/python"
