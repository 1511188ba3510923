#!/usr/bin/env bash
# The main job. Until the pipeline lands (issue 7) it ingests Fashion-MNIST into the workspace
# (DISTML_HOME, default ./.distml) and prints the dataset summary.
# Uses the local copy in ../shared/datasets/fashion-mnist when present, else downloads from the mirrors.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_setup.sh"
cd "$repo_root"

source_args=()
local_copy="${DISTML_FASHION_MNIST_SOURCE:-$repo_root/../shared/datasets/fashion-mnist}"
if [ -d "$local_copy" ]; then
    source_args=(--source "$local_copy")
fi

distml data ingest fashion-mnist "${source_args[@]}" "$@"
distml data show fashion-mnist
