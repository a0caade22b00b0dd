#!/usr/bin/env bash
# A long pretraining run as resumable chunks: each chunk runs N steps and ends with a checkpoint,
# the next resumes from it exactly; kill it at any time and run it again to continue.
#   scripts/pretrain_in_chunks.sh CONFIG OUT [STEPS_PER_CHUNK] [extra `neurovfm pretrain` options]
set -euo pipefail
CFG=$1; OUT=$2; STEPS=${3:-200}; shift $(( $# < 3 ? $# : 3 ))
BIN=${NEUROVFM_BIN:-$(dirname "$0")/../.venv/bin/neurovfm}
while [ ! -e "$OUT/model/encoder.safetensors" ]; do
  if [ -e "$OUT/checkpoints/latest" ]; then R=--resume; else R=; fi
  "$BIN" pretrain "$CFG" --set run.out="$OUT" $R --max-steps "$STEPS" --quiet "$@"
done
echo "finished: $OUT/model"
