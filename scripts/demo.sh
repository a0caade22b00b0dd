#!/usr/bin/env bash
# `make demo`: the main job end to end on the embedded default data.
#   synthetic hospital archive (real DICOM + ground truth) -> ingest -> resume -> PHI audit
#   -> ground truth re-keyed to the cache's keys -> cache summary -> a short Vol-JEPA pretraining
#   (ViT-Tiny, train split, resumed once) -> frozen features of the pretrained and a random-init
#   encoder and the histogram baseline -> study-level heads evaluated on the test split
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo-out
rm -rf "$OUT/archive" "$OUT/cache" "$OUT/keyed" "$OUT/pretrain" "$OUT/features" "$OUT/eval" "$OUT/random"
mkdir -p "$OUT"
export NEUROVFM_SITE_SECRET="${NEUROVFM_SITE_SECRET:-demo-site-secret}"
echo "== synth: 16 studies (first run also builds the anatomy template, ~1 min) =="
$BIN/neurovfm synth "$OUT/archive" --studies 16 --seed 1 --workers 2 --preview --quiet > "$OUT/synth_summary.json"
# a messy corner of a real export: a localizer, a gantry-tilted phantom, a stray text file
$BIN/python scripts/make_demo_source.py "$OUT/archive/dicom/EXTRAS" > /dev/null
echo "== ingest =="
$BIN/neurovfm ingest "$OUT/archive/dicom" "$OUT/cache" --workers 2 --show-paths
echo "== rerun (resumes: everything already cached) =="
$BIN/neurovfm ingest "$OUT/archive/dicom" "$OUT/cache" --quiet
echo "== PHI audit =="
$BIN/neurovfm audit-phi "$OUT/cache" --source "$OUT/archive/dicom"
echo "== ground truth re-keyed to the cache =="
$BIN/neurovfm rekey "$OUT/archive" --out "$OUT/keyed"
echo "== cache =="
$BIN/neurovfm cache-info "$OUT/cache"
echo "previews: $OUT/archive/preview/*.png   manifest: $OUT/cache/manifest.csv"
echo "== pretrain: ViT-Tiny Vol-JEPA on the train split, 2 epochs, in two resumable chunks =="
export NEUROVFM_CACHE="$OUT/cache" NEUROVFM_SPLITS="$OUT/keyed/labels_keyed.csv"
PT=(configs/pretrain_tiny_cpu.yaml --set run.out="$OUT/pretrain" --set run.epochs=2 --set run.monitor_every=5
    --set run.checkpoint_every=5 --set data.tokens_per_batch=4096 --quiet)
$BIN/neurovfm pretrain "${PT[@]}" --max-steps 4
$BIN/neurovfm pretrain "${PT[@]}" --resume
echo "== embed: pretrained, random-init (same architecture and seed), histogram baseline =="
$BIN/neurovfm init-model "$OUT/random" --like "$OUT/pretrain/model" --seed 0 > /dev/null
for m in pretrained:"$OUT/pretrain/model" random:"$OUT/random" histogram:histogram:32; do
  $BIN/neurovfm embed "${m#*:}" "$OUT/cache" "$OUT/features/${m%%:*}" --quiet > /dev/null
done
echo "== evaluate: heads on train, choices on validation, numbers on test =="
$BIN/neurovfm evaluate --features pretrained="$OUT/features/pretrained" random="$OUT/features/random" \
  histogram="$OUT/features/histogram" --labels "$OUT/keyed/labels_keyed.csv" --cache "$OUT/cache" \
  --out "$OUT/eval" --min-test-positives 1 --bootstrap 200 --epochs 10 --save-model "$OUT/pretrain/model" --quiet
echo "report: $OUT/eval/index.html   (16 studies: a smoke run of the pipeline, not a measurement)"
