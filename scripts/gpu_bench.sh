#!/bin/bash
# `shardgen bench --gpu` on one GPU machine, unattended, in one go: SD 1.5 architecture at 512x512
# (25 DPM-Solver++ steps, guidance 7.5, batch 32) and SDXL architecture at 1024x1024 (30 steps,
# batch 8), random weights built on the GPU (no download), each as the plain diffusers loop, the
# loop with channels_last + torch.compile, a whole shardgen job with shardgen's defaults, then the
# job with each per-stage speed choice alone (compile: true / regional, attention_backend, cache;
# systems past 400 s are skipped and say so). Leaves under $OUT: gpu_bench.json (every figure),
# gpu_bench.log (the run), nvidia-smi.txt and commit.txt, and prints the table last, then the same
# figures as the markdown table for docs/performance.md. Needs ray, diffusers, pydantic and nvidia-ml-py importable (on the project's GPU
# machines: the wheel bundle's setup.sh, sourced first). Budget: about 7 minutes on an H200.
#
#   GPU_BENCH_TINY=1 PYTHON=.venv/bin/python OUT=/tmp/x bash scripts/gpu_bench.sh   # the same steps on CPU, tiny models
set -euo pipefail
: "${OUT:?set OUT to the folder for the results}"
PYTHON=${PYTHON:-python3}
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 SHARDGEN_CACHE=${SHARDGEN_CACHE:-$(mktemp -d)}
mkdir -p "$OUT"
quick=()
[ "${GPU_BENCH_TINY:-0}" = 1 ] && quick=(--quick)
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" > "$OUT/nvidia-smi.txt"
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null || echo "unknown (no git)" > "$OUT/commit.txt"
start=$(date +%s)
# A hard stop below the machine's limit, so that the JSON written after each architecture comes back.
status=0
timeout "${GPU_BENCH_TIMEOUT:-480}" "$PYTHON" -m pipeline.cli bench --gpu "${quick[@]}" --json "$OUT/gpu_bench.json" \
  > "$OUT/gpu_bench.log" 2>&1 || status=$?
# The table (and any traceback) from the log; Ray's and the libraries' chatter stays in the file.
sed -n '/^shardgen bench --gpu:/p; /^Traceback/,$p; /TFLOP\/s/,$p' "$OUT/gpu_bench.log" | grep -v '^\s*$' | tail -60
echo "exit $status after $(( $(date +%s) - start ))s; figures in $OUT/gpu_bench.json"
exit "$status"
