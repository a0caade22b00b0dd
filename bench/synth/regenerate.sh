#!/usr/bin/env bash
# Regenerate the default 500-study archive and measure its difficulty (the README's record).
#   bench/synth/regenerate.sh OUT [WORKERS]
# OUT/archive (DICOM, ~22 GB), OUT/cache (token cache), OUT/inputs.npz (the CNN's study volumes);
# the record goes to bench/results/synth_difficulty.json. Uses NEUROVFM_SITE_SECRET (default:
# bench-secret, the record's).
set -euo pipefail
out=${1:?usage: bench/synth/regenerate.sh OUT [WORKERS]}
workers=${2:-2}
here=$(cd "$(dirname "$0")/../.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
export NEUROVFM_SITE_SECRET=${NEUROVFM_SITE_SECRET:-bench-secret}
mkdir -p "$out"
time "$py" -m neurovfm synth "$out/archive" --studies 500 --seed 0 --workers "$workers"
time "$py" -m neurovfm ingest "$out/archive/dicom" "$out/cache" --workers "$workers" --quiet
time "$py" "$here/bench/synth/difficulty.py" "$out/archive" "$out/cache" --epochs 100 --aux-weight 1 \
    --inputs "$out/inputs.npz" --out "$here/bench/results/synth_difficulty.json"
# The labels-only CNN's learning curve (~35 min more): LEARNING_CURVE=1 bench/synth/regenerate.sh OUT
if [ "${LEARNING_CURVE:-0}" = 1 ]; then
    for f in 0.50 0.25; do  # results named by the digits: synth_learning_curve_f050.json, ..._f025.json
        "$py" "$here/bench/synth/difficulty.py" "$out/archive" "$out/cache" --only-cnn --aux-weight 0 --epochs 100 \
            --train-fraction "$f" --inputs "$out/inputs.npz" --out "$here/bench/results/synth_learning_curve_f${f/./}.json"
    done
    "$py" "$here/bench/synth/learning_curve.py" "$here/bench/results/synth_difficulty.json" \
        "$here/bench/results/synth_learning_curve_f050.json" "$here/bench/results/synth_learning_curve_f025.json" \
        --out "$here/bench/results/synth_learning_curve"
fi
