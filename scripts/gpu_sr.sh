#!/bin/bash
# Super-resolution on one GPU, in one go (issue 5): continue training shapes-sr for a wall-clock
# budget on a Ray Train GPU worker, save the new pipeline to $OUT/shapes-sr, then measure PSNR
# against bicubic on the held-out scenes for the new and the committed model on the GPU
# ($OUT/sr_eval.json, and a table on stdout). Run from the project root, on the GPU machine after
# `source .gpu/setup.sh`.
#
#   GPU_SR_TINY=1 PYTHON=.venv/bin/python OUT=/tmp/x bash scripts/gpu_sr.sh   # the same steps on CPU, in a few minutes
set -euo pipefail
: "${OUT:?set OUT to the folder for the results}"
PYTHON=${PYTHON:-python3}
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
if [ "${GPU_SR_TINY:-0}" = 1 ]; then
  train=(--workers 1 --threads 1 --steps 20 --batch 8 --scenes 64 --max-minutes 2)
  eval=(--device cpu --images 5)
else
  # One H200: batch 256 of whole 32x32 latents (the CPU runs: 32 crops of 16x16 per worker),
  # 10000 scenes (the CPU runs: 3000), until the budget ends (--steps is only a ceiling).
  train=(--gpu --workers 1 --threads 8 --steps 100000 --batch 256 --scenes 10000 --max-minutes "${TRAIN_MINUTES:-4}")
  eval=(--device cuda --images 100)
fi
models=$(mktemp -d)
trap 'rm -rf "$models"' EXIT
# What `sr --resume` reads: the model to continue, its decoder (shapes-sr-vae) and the caption encoder.
mkdir -p "$models/shapes-t2i" "$OUT"
cp -r pipeline/models/trained/shapes-sr pipeline/models/trained/shapes-sr-vae "$models/"
cp -r pipeline/models/trained/shapes-t2i/text_encoder "$models/shapes-t2i/"
start=$(date +%s)
"$PYTHON" -m pipeline.training sr --resume --crop 32 --out "$models" "${train[@]}" 2>&1 | tee "$OUT/train.log" | { grep --line-buffered -E "step [0-9]+/|saved|Error|error:|Traceback" || true; }
echo "training: $(( $(date +%s) - start ))s"
rm -rf "$OUT/shapes-sr"
cp -r "$models/shapes-sr" "$OUT/shapes-sr"
"$PYTHON" -m pipeline.training eval-sr --models "$OUT/shapes-sr" pipeline/models/trained/shapes-sr --json "$OUT/sr_eval.json" "${eval[@]}" 2> "$OUT/eval.log"
echo "total: $(( $(date +%s) - start ))s"
