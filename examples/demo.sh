#!/usr/bin/env bash
# The whole flow on the bundled Fashion-MNIST sample, in ./demo-workspace (about 5 minutes on a CPU):
# train for 3 minutes, index the training images, search with a test image, and score the encoder
# by kNN against its own random initialisation and raw pixels, list the duplicate groups, and say
# how to open the web app.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cli="$(cd "$here/.." && pwd)/.venv/bin/simsiam-embed"
[ -x "$cli" ] || cli="simsiam-embed"
sample="$here/fashion-mnist"
mkdir -p demo-workspace && cd demo-workspace

if [ -f runs/train/checkpoint.pt ] && ! "$cli" pretrain "$sample/train" >/dev/null 2>&1; then
  "$cli" pretrain "$sample/train" --resume   # an interrupted demo continues where it stopped
else
  # Batch 64, not the paper's 256: 1,000 images make 3 steps an epoch at 256, and 3 minutes on a
  # 2-core CPU afford 11-12 such steps, too few to beat random init on every seed; at 64 the same
  # minutes give 42-48 steps and beat it on each of 3 seeds (bench/RESULTS.md, "The demo's gain").
  "$cli" pretrain "$sample/train" --time-budget 3m --batch-size 64
fi
"$cli" index
echo "--- search: the 5 nearest training images of a test sneaker"
"$cli" search "$sample/test/sneaker/sneaker-000.png" -k 5
echo "--- kNN accuracy on the 200 test images, bank = the 1,000 training images: trained, random init, raw pixels"
"$cli" knn --train "$sample/train" --test "$sample/test" -k 20 -t 0.07 --compare-random-init --compare-raw-pixels
echo "--- duplicates among the 1,000 indexed images (groups, plan and pages in demo-workspace/explore/)"
"$cli" dedup
echo "--- next: browse the index in your browser (search by dropping an image, duplicates, clusters, map):"
echo "    cd demo-workspace && $cli serve      # then open http://127.0.0.1:8765"
