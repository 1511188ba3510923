#!/usr/bin/env bash
# Create the venv of one peer server for bench/serve_peers.py: bench/.cache/venv-litserve or venv-bentoml.
#
# Each peer gets its own venv, as KServe does (bench/_kserve_env.sh): they pin their own fastapi/uvicorn/
# pydantic versions, which must not touch .venv. The versions measured are pinned here (onnxruntime the same as
# .venv's). Installs from the package index only. Idempotent: the install is skipped when the requirement list
# has not changed (stamp file). Prints the venv's bin folder at the end (the only line on stdout), e.g.
#   bin="$(bench/_peer_env.sh litserve)" && "$bin/python" bench/peers/litserve_app.py --model-dir DIR
set -euo pipefail

peer="${1:?usage: bench/_peer_env.sh litserve|bentoml}"
case "$peer" in
litserve) requirements=(litserve==0.2.19 onnxruntime==1.32.0 numpy pillow) check='import litserve, onnxruntime' ;;
bentoml) requirements=(bentoml==1.4.40 onnxruntime==1.32.0 numpy) check='import bentoml, onnxruntime' ;;
*)
    echo "error: unknown peer $peer (litserve, bentoml)" >&2
    exit 2
    ;;
esac

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$repo_root/bench/.cache/venv-$peer"
stamp="$venv/.install-stamp"

source "$repo_root/scripts/_venv.sh"
mkdir -p "$repo_root/bench/.cache"
ensure_venv "$venv" "$peer-env"

want="$(printf '%s\n' "${requirements[@]}" | sha256sum | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
if [ "$want" != "$have" ]; then
    echo "$peer-env: installing ${requirements[*]} into $venv (first run takes a minute or two)" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${requirements[@]}" >&2
    "$venv/bin/python" -c "$check" >&2
    echo "$want" >"$stamp"
fi

echo "$venv/bin"
