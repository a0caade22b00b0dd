#!/usr/bin/env bash
# Rebuild the shipped demo model (src/neurovfm/demo_model) from scratch, on CPU:
#   synthetic archive (300 studies, seed 0) -> ingest -> Vol-JEPA (configs/pretrain_demo_cpu.yaml)
#   -> frozen features -> gated heads + Platt calibration + operating points + distance-to-training
#   (evaluate --save-model) -> float16 copy into the package.
#   scripts/train_demo_model.sh [WORK_DIR]      (~1 h on 2 cores; every step resumes if rerun)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WORK=${1:-/work/runs/demo_model}
ARCH=${DEMO_ARCHIVE:-$WORK/archive}
mkdir -p "$WORK"
export NEUROVFM_SITE_SECRET="${NEUROVFM_SITE_SECRET:-demo-model-site-secret}"
$BIN/neurovfm synth "$ARCH" --studies 300 --seed 0 --workers 2 --quiet > "$WORK/synth_summary.json"
$BIN/neurovfm ingest "$ARCH/dicom" "$WORK/cache" --workers 2 --quiet
$BIN/neurovfm rekey "$ARCH" --out "$WORK/keyed" > /dev/null
export NEUROVFM_CACHE="$WORK/cache" NEUROVFM_SPLITS="$WORK/keyed/labels_keyed.csv"
scripts/pretrain_in_chunks.sh configs/pretrain_demo_cpu.yaml "$WORK/pretrain" 200
$BIN/neurovfm embed "$WORK/pretrain/model" "$WORK/cache" "$WORK/features" --quiet > /dev/null
$BIN/neurovfm evaluate --features demo="$WORK/features" --labels "$WORK/keyed/labels_keyed.csv" \
  --cache "$WORK/cache" --out "$WORK/eval" --head gated --min-test-positives 5 --save-model "$WORK/pretrain/model" --quiet
$BIN/python scripts/ship_demo_model.py "$WORK/pretrain/model" src/neurovfm/demo_model \
  --eval "$WORK/eval/metrics.json" --command "scripts/train_demo_model.sh $WORK"
echo "demo model: src/neurovfm/demo_model"
