#!/usr/bin/env bash
# Rebuild the shipped demo model (src/neurovfm/demo_model) from scratch, on CPU:
#   encoder: synthetic demo archive (300 studies, seed 0) -> ingest -> Vol-JEPA
#            (configs/pretrain_demo_cpu.yaml, train split) -> float16 copy (what is shipped)
#   heads:   the default archive (500 studies, seed 0; same split function and seed, so the
#            encoder's pretraining patients are its train patients only) -> the float16 encoder's
#            features + intensity histograms (32 bins) + neighbourhood (radius 1)
#            (MRI: + the co-located tokens of the study's other series, add-context --cross-series)
#            -> per modality (CT: ABMIL, MRI: top-k; the kinds chosen on validation for these
#            features) a 5-seed ensemble on standardised features with the training split's lesion
#            masks, Platt calibration, operating points and distance-to-training
#            (evaluate --save-model) -> float16 copy into the package.
#   scripts/train_demo_model.sh [WORK_DIR]      (~3 h on 2 cores; every step resumes if rerun)
# The demo archive's features ($WORK/features) are what the shipped report model was trained on
# (`neurovfm report-train`, command in demo_model/report/report_config.json).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
WORK=${1:-/work/runs/demo_model}
ARCH=${DEMO_ARCHIVE:-$WORK/archive}
HEADS=${DEMO_HEADS_ARCHIVE:-$WORK/archive500}
mkdir -p "$WORK"
export NEUROVFM_SITE_SECRET="${NEUROVFM_SITE_SECRET:-demo-model-site-secret}"
CMD="scripts/train_demo_model.sh $WORK"

# the encoder, on the demo archive
$BIN/neurovfm synth "$ARCH" --studies 300 --seed 0 --workers 2 --quiet > "$WORK/synth_summary.json"
$BIN/neurovfm ingest "$ARCH/dicom" "$WORK/cache" --workers 2 --quiet
$BIN/neurovfm rekey "$ARCH" --out "$WORK/keyed" > /dev/null
NEUROVFM_CACHE="$WORK/cache" NEUROVFM_SPLITS="$WORK/keyed/labels_keyed.csv" \
  scripts/pretrain_in_chunks.sh configs/pretrain_demo_cpu.yaml "$WORK/pretrain" 200
[ -e "$WORK/features/meta.json" ] || \
  $BIN/neurovfm embed "$WORK/pretrain/model" "$WORK/cache" "$WORK/features" --quiet > /dev/null
[ -e "$WORK/encoder16/config.json" ] || \
  $BIN/python scripts/ship_demo_model.py "$WORK/pretrain/model" "$WORK/encoder16" --command "$CMD" > /dev/null

# the heads, on the default archive
[ -e "$HEADS/records.jsonl" ] || \
  $BIN/neurovfm synth "$HEADS" --studies 500 --seed 0 --workers 2 --quiet > "$WORK/synth500_summary.json"
$BIN/neurovfm ingest "$HEADS/dicom" "$WORK/cache500" --workers 2 --quiet
$BIN/neurovfm rekey "$HEADS" --out "$WORK/keyed500" > /dev/null
L="$WORK/keyed500/labels_keyed.csv"
$BIN/neurovfm embed "$WORK/encoder16" "$WORK/cache500" "$WORK/features500" --splits-csv "$L" \
  --append-histogram 32 --append-context 1 --quiet > /dev/null
# MRI tokens also read the co-located tokens of the study's other series (Plan O, /work/runs/s41)
$BIN/neurovfm add-context "$WORK/features500" "$WORK/features500_xs" --radius 0 --cross-series \
  --cache "$WORK/cache500" --quiet > /dev/null
for spec in CT:abmil:features500 MR:topk:features500_xs; do
  IFS=: read -r mod kind feats <<< "$spec"
  [ -e "$WORK/heads_$mod/config.json" ] || cp -r "$WORK/encoder16" "$WORK/heads_$mod"
  [ -e "$WORK/eval_$mod/metrics.json" ] || \
    $BIN/neurovfm evaluate --features demo="$WORK/$feats" --labels "$L" --cache "$WORK/cache500" \
      --out "$WORK/eval_$mod" --modalities "$mod" --head "$kind" --head-seeds 5 --standardize \
      --token-masks "$HEADS" --save-model "$WORK/heads_$mod" --quiet
done
$BIN/python scripts/ship_demo_model.py "$WORK/encoder16" src/neurovfm/demo_model \
  --heads CT="$WORK/heads_CT" MR="$WORK/heads_MR" --eval "$WORK/eval_CT/metrics.json" "$WORK/eval_MR/metrics.json" \
  --data "encoder: neurovfm synth --studies 300 --seed 0 (train split); heads: neurovfm synth --studies 500 --seed 0 (synthetic)" \
  --command "$CMD"
# the MRI head draws token maps fused across the study's series (chosen on validation: Plan Q, /work/runs/s42)
$BIN/neurovfm set-map src/neurovfm/demo_model MR=token-fused > /dev/null
echo "demo model: src/neurovfm/demo_model"
