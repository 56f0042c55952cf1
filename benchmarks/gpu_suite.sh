#!/usr/bin/env bash
# Every GPU row of docs/BENCHMARKS.md in one go, in at most 8 minutes on one H100/H200:
#   1. training throughput (OPT shapes, random init, bf16)      benchmarks/train_throughput.py
#   2. generation: ours vs HF generate at batch 1 and 16 (on CUDA also ours without CUDA graphs)  generate_throughput.py
#   3. a 4-trial sweep packed on one GPU at gpu: 0.25           paraphrase-ray tune, search_spaces/gpu_suite.yaml
#   4. Serve under load with the sweep's best prompt            benchmarks/serve_load.py
# Each step writes its JSON lines (and log) under OUT (default runs/gpu_suite) and has its own time limit, so one
# slow step cannot eat the others' budget.
#
#   bash benchmarks/gpu_suite.sh                  # on the GPU machine (device tool: one prepared call)
#   bash benchmarks/gpu_suite.sh --device cpu     # plumbing: every step at its smallest, on the CPU
#   bash benchmarks/gpu_suite.sh --dry-run        # print the commands only
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
DRY=0
OUT=${OUT:-runs/gpu_suite}
PY=${PY:-python}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_suite.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cpu|cuda) ;; *) echo "gpu_suite.sh: --device must be cpu or cuda" >&2; exit 2 ;; esac

if [ "$DEVICE" = cuda ]; then  # full sizes; limits in seconds add up to 8 minutes
  TRAIN=(--device cuda --repeats 3);                       T_TRAIN=150
  GEN=(--device cuda --batches 1 16 --repeats 3);          T_GEN=90
  SPACE=search_spaces/gpu_suite.yaml; TUNE=();             T_TUNE=150
  SERVE=(--device cuda --clients 16 --seconds 20 --rounds 1); T_SERVE=90
else  # plumbing: the same commands at their smallest
  TRAIN=(--device cpu --repeats 1 --steps 1 --no-breakdown); T_TRAIN=300
  GEN=(--device cpu --batches 1 --repeats 1 --new-tokens 4 --no-warmup --scenarios fast); T_GEN=300
  SPACE=search_spaces/quickstart.yaml; TUNE=(--smoke-test); T_TUNE=900  # CPU trials: no gpu share
  SERVE=(--device cpu --clients 2 --seconds 4 --rounds 1); T_SERVE=300
fi
NAME="gpu-suite-$DEVICE"
STORAGE="$OUT/sweeps"

step() {  # step NAME LIMIT_S CMD...: run with a time limit, JSON lines to OUT/NAME.jsonl, log to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit} s): $*"
  [ "$DRY" = 1 ] && return 0
  local t0=$SECONDS rc=0
  timeout "$limit" "$@" > >(tee "$OUT/$name.log" | grep '^{' > "$OUT/$name.jsonl") 2>&1 || rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t0))}" >> "$OUT/steps.jsonl"
  [ "$rc" = 0 ] || echo "   $name failed (rc $rc); see $OUT/$name.log" >&2
}

[ "$DRY" = 1 ] || { mkdir -p "$OUT"; : > "$OUT/steps.jsonl"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
step train "$T_TRAIN" "$PY" benchmarks/train_throughput.py "${TRAIN[@]}"
step generate "$T_GEN" "$PY" benchmarks/generate_throughput.py "${GEN[@]}"
step sweep "$T_TUNE" "$PY" -m paraphrase_ray.cli.main tune --space "$SPACE" --name "$NAME" \
  --storage "$STORAGE" "${TUNE[@]}"
step serve "$T_SERVE" "$PY" benchmarks/serve_load.py --prompt "best=$STORAGE/$NAME/best" "${SERVE[@]}" \
  --output "$OUT/serve.json"
[ "$DRY" = 1 ] || cat "$OUT/steps.jsonl"
