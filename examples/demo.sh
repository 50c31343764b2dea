#!/usr/bin/env bash
# The whole flow on the bundled Fashion-MNIST sample, in ./demo-workspace (a few minutes on a CPU).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cli="${SIMSIAM_EMBED:-simsiam-embed}"
command -v "$cli" >/dev/null || cli="$here/../.venv/bin/simsiam-embed"
mkdir -p demo-workspace && cd demo-workspace
"$cli" pretrain "$here/fashion-mnist/train" --time-budget 3m
