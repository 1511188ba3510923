#!/usr/bin/env bash
# The main job: the whole pipeline on Fashion-MNIST (distml run): ingest -> train the seed's three candidates
# (2 DDP workers each) -> select -> register the champion. Extra arguments go to `distml run` (e.g. --serve,
# --epochs 8). The workspace is $DISTML_HOME, default ./.distml; a second run with nothing changed is all hits.
# Uses the local copy in ../shared/datasets/fashion-mnist when present, else downloads from the mirrors.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$repo_root"

source_args=()
local_copy="${DISTML_FASHION_MNIST_SOURCE:-$repo_root/../shared/datasets/fashion-mnist}"
if [ -d "$local_copy" ]; then
    source_args=(--source "$local_copy")
fi

exec distml run "${source_args[@]}" "$@"
