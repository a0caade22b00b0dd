#!/usr/bin/env bash
# `make demo`: the main job end to end on the embedded default data.
#   synthetic hospital archive (real DICOM + ground truth) -> ingest -> resume -> PHI audit
#   -> ground truth re-keyed to the cache's keys -> cache summary
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo-out
rm -rf "$OUT/archive" "$OUT/cache" "$OUT/keyed"
mkdir -p "$OUT"
export NEUROVFM_SITE_SECRET="${NEUROVFM_SITE_SECRET:-demo-site-secret}"
echo "== synth: 6 studies (first run also builds the anatomy template, ~1 min) =="
$BIN/neurovfm synth "$OUT/archive" --studies 6 --seed 0 --workers 2 --preview --quiet > "$OUT/synth_summary.json"
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
