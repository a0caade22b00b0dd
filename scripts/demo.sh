#!/usr/bin/env bash
# `make demo`: the main job end to end on the embedded default data.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
OUT=demo-out
rm -rf "$OUT"
mkdir -p "$OUT"
export NEUROVFM_SITE_SECRET="${NEUROVFM_SITE_SECRET:-demo-site-secret}"
$BIN/python scripts/make_demo_source.py "$OUT/source"
echo "== ingest =="
$BIN/neurovfm ingest "$OUT/source" "$OUT/cache" --show-paths
echo "== rerun (resumes: everything already cached) =="
$BIN/neurovfm ingest "$OUT/source" "$OUT/cache" --quiet
echo "== PHI audit =="
$BIN/neurovfm audit-phi "$OUT/cache" --source "$OUT/source"
echo "== cache =="
$BIN/neurovfm cache-info "$OUT/cache"
echo "manifest: $OUT/cache/manifest.csv"
