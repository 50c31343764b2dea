#!/usr/bin/env bash
# The GPU day: every device check in one call on the lent GPU machine, whose image has Python
# 3.12 and torch 2.11 but no faiss and nothing to fetch (the device tool's KINDS.md).
#
#   here, once:        bash bench/gpu_day.sh --prepare      # the wheels it carries, into .whl/ (ignored by git)
#   on the device:     bash bench/gpu_day.sh                # run with carry [".whl"]; at most 8 minutes
#   rehearsal here:    bash bench/gpu_day.sh --device cpu   # any other arguments go to gpu_check.py
#
# It installs the project from this tree with --no-deps (the image's torch, torchvision, onnx,
# onnxruntime, numpy, pillow, click, ... are used as they are; pyproject's torch>=2.14 is not
# asked for), adds the carried wheels, says which torch it runs on, then runs bench/gpu_check.py.
# The table goes to $OUT/gpu_check.json (the device tool brings $OUT back) or ./gpu-day/.
set -uo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl

if [ "${1:-}" = "--prepare" ]; then
  # faiss-cpu is the one dependency the image lacks that the checks import; abi3, so cp312 takes it.
  python3 -m pip download --quiet --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d "$WHEELS" faiss-cpu
  du -ch "$WHEELS"/*.whl | tail -1
  exit 0
fi

OUT_DIR="${OUT:-$PWD/gpu-day}"
mkdir -p "$OUT_DIR"
python3 -m pip install --quiet --no-deps --no-index "$WHEELS"/*.whl || { echo "FAILED: no wheels in $WHEELS: run --prepare here and carry .whl"; exit 2; }
python3 -m pip install --quiet --no-deps --no-build-isolation . || { echo "FAILED: the project did not install"; exit 2; }
python3 -c 'import sys, torch, onnxruntime; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, onnxruntime {onnxruntime.__version__} ({onnxruntime.get_available_providers()}), GPUs {torch.cuda.device_count()}")'
timeout 450 python3 bench/gpu_check.py --out "$OUT_DIR/work" --json "$OUT_DIR/gpu_check.json" "$@"
status=$?
rm -rf "$OUT_DIR/work"   # images, runs, indexes: only the table comes back
exit $status
