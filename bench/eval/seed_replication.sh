#!/usr/bin/env bash
# Does Vol-JEPA pretraining beat a random-init encoder beyond seed-to-seed variation?
#   bench/eval/seed_replication.sh DATA OUT [SEEDS]      (SEEDS default "0 1 2")
# DATA: the default 500-study archive's folder (made here if missing: DATA/archive, DATA/cache,
# DATA/keyed). For every seed S: ViT-Tiny Vol-JEPA pretrained with configs/pretrain_tiny_cpu.yaml
# (--set run.seed=S) and a random-init twin (init-model --size tiny --seed S), both embedded and
# evaluated with auto heads (5 head seeds each), plus the histogram baseline; then one comparison
# file OUT/pooled.json (bench/eval/paired_from_predictions.py) and the record OUT/record.json
# (bench/eval/replication_record.py).
#
# Protocol, fixed before the first result (2026-12-05): per modality, the mean test macro AUROC of
# the pretrained seeds minus the mean of the random-init seeds (--pooled). "Pretraining helps" in a
# modality only if BOTH the patient-bootstrap interval AND the seed-level Student's t interval
# (replicate_t) lie above zero; "hurts" if both lie below; otherwise no evidence either way.
# Per-seed pairs and pretrained-minus-histogram are secondary. pooled.json carries the rule's answer
# per modality as "verdict" ("A better" = pretraining helps; eval.metrics.replication_verdict).
#
# PRETRAIN_SET="key=value ..." passes each item as `--set key=value` to every pretraining run (a
# variant of the recorded config, e.g. PRETRAIN_SET="optim.intensity_target=1.0"); the random-init
# twins and the histogram do not depend on it, so their folders may be linked in from an earlier OUT
# (eval_random_sS, feat_random_sS, random_sS, feat_hist, eval_histogram) and are then not redone.
# OUT/settings.json keeps PRETRAIN_SET; a rerun into that OUT with another PRETRAIN_SET is refused.
# Each pretrained model folder receives its heads, calibration and thresholds (`evaluate
# --save-model`), ready for `neurovfm analyze` and `neurovfm pointing`. THREADS (default 1) threads
# per process.
#
# Every step is skipped when its output exists and pretraining runs in resumable chunks, so a
# killed run continues where it stopped when started again. One lane of one thread per seed, at
# most LANES=3 (more lanes than cores share them); about 4-5 hours on 2 cores for three seeds
# (pretraining ~40 min a seed on one core, embedding ~15 min and evaluation 15-30 min a model on one).
set -uo pipefail
DATA=${1:?usage: bench/eval/seed_replication.sh DATA OUT [SEEDS]}; OUT=${2:?usage: ... DATA OUT [SEEDS]}
SEEDS=${3:-0 1 2}
LANES=${LANES:-3}; [[ "$LANES" =~ ^[1-9][0-9]*$ ]] || { echo "LANES must be a whole number >= 1, not '$LANES'" >&2; exit 2; }
here=${NEUROVFM_ROOT:-$(cd "$(dirname "$0")/../.." && pwd)}; cd "$here"  # NEUROVFM_ROOT: run a copy of this file
B=${NEUROVFM_BIN:-$here/.venv/bin/neurovfm}; PY=${PYTHON:-$here/.venv/bin/python}
THREADS=${THREADS:-1}; [[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || { echo "THREADS must be a whole number >= 1, not '$THREADS'" >&2; exit 2; }
export NEUROVFM_SITE_SECRET=${NEUROVFM_SITE_SECRET:-bench-secret} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=$THREADS
PRETRAIN_SET=${PRETRAIN_SET:-}; read -r -a sets <<< "$PRETRAIN_SET"; extra=()
for kv in "${sets[@]}"; do
  [[ "$kv" == *=* ]] || { echo "PRETRAIN_SET items must be key=value, not '$kv'" >&2; exit 2; }
  extra+=(--set "$kv")
done
C=$DATA/cache; L=$DATA/keyed/labels_keyed.csv
export NEUROVFM_CACHE=$C NEUROVFM_SPLITS=$L
mkdir -p "$OUT"
settings=$("$PY" -c 'import json, sys; print(json.dumps({"pretrain_set": sys.argv[1]}))' "$PRETRAIN_SET") \
  || { echo "cannot run $PY (set PYTHON)" >&2; exit 2; }
if [ -e "$OUT/settings.json" ]; then
  [ "$(cat "$OUT/settings.json")" = "$settings" ] || {
    echo "$OUT was made with other settings ($(cat "$OUT/settings.json")), not $settings: use another OUT" >&2; exit 2; }
else
  echo "$settings" > "$OUT/settings.json.tmp" && mv "$OUT/settings.json.tmp" "$OUT/settings.json"
fi
step() { echo "$(date -u +%FT%TZ) $*"; }
if [ ! -e "$L" ]; then
  step archive
  [ -e "$DATA/archive/labels.csv" ] || "$B" synth "$DATA/archive" --studies 500 --seed 0 --workers 2 --quiet || exit 1
  "$B" ingest "$DATA/archive/dicom" "$C" --workers 2 --quiet || exit 1
  "$B" rekey "$DATA/archive" --out "$DATA/keyed" || exit 1
fi
pretrain() { scripts/pretrain_in_chunks.sh configs/pretrain_tiny_cpu.yaml "$OUT/pt_s$1" 300 --set run.seed="$1" \
             "${extra[@]}" >> "$OUT/pt_s$1.log" 2>&1; }
embed() { [ -e "$3/.done" ] || { "$B" embed "$1" "$C" "$3" --splits-csv "$L" --quiet > "$2" 2>&1 && touch "$3/.done"; }; }
evaluate() { [ -e "$OUT/eval_$1/metrics.json" ] || "$B" evaluate --features "$1=$2" --labels "$L" --cache "$C" \
             --out "$OUT/eval_$1" --head auto --head-seeds 5 ${3:+--save-model "$3"} --quiet > "$OUT/eval_$1.log" 2>&1; }
lane() {  # pretrain, embed and evaluate the given seeds in turn
  for s in "$@"; do
    step "pretrain seed $s"; pretrain "$s" || return 1
    embed "$OUT/pt_s$s/model" "$OUT/embed_ref_s$s.log" "$OUT/feat_ref_s$s" || return 1
    [ -e "$OUT/random_s$s/encoder.safetensors" ] || "$B" init-model "$OUT/random_s$s" --size tiny --seed "$s" || return 1
    embed "$OUT/random_s$s" "$OUT/embed_random_s$s.log" "$OUT/feat_random_s$s" || return 1
    step "evaluate seed $s"; evaluate "ref_s$s" "$OUT/feat_ref_s$s" "$OUT/pt_s$s/model"; evaluate "random_s$s" "$OUT/feat_random_s$s"
  done
}
read -r -a all <<< "$SEEDS"
# one lane per seed, at most LANES (default 3: each lane holds ~2.5 GB while pretraining), seeds dealt
# round-robin; more lanes than cores share them, which avoids one seed running alone at the end
for ((k = 0; k < LANES && k < ${#all[@]}; k++)); do
  mine=(); for ((i = k; i < ${#all[@]}; i += LANES)); do mine+=("${all[$i]}"); done
  lane "${mine[@]}" &
done
{ embed histogram:32 "$OUT/embed_hist.log" "$OUT/feat_hist" && evaluate histogram "$OUT/feat_hist"; } &
wait
missing=(); for m in histogram $(for s in "${all[@]}"; do echo "ref_s$s random_s$s"; done); do
  [ -e "$OUT/eval_$m/metrics.json" ] || missing+=("$m")
done
if (( ${#missing[@]} )); then  # say which step failed and where its log is; rerunning resumes
  echo "not evaluated: ${missing[*]} (see $OUT/pt_s*.log, $OUT/embed_*.log, $OUT/eval_*.log); rerun to resume" >&2
  exit 1
fi
step compare
runs=(); ref=(); rnd=(); pairs=()
for s in "${all[@]}"; do
  ref+=("ref_s$s"); rnd+=("random_s$s"); pairs+=(--pair "ref_s$s" "random_s$s" --pair "ref_s$s" histogram)
  for m in "ref_s$s" "random_s$s"; do runs+=(--run "$OUT/eval_$m/predictions.csv" "$OUT/eval_$m/metrics.json"); done
done
IFS=,; pooled=(--pooled "${ref[*]}" "${rnd[*]}"); unset IFS
"$PY" bench/eval/paired_from_predictions.py "$OUT/eval_histogram/predictions.csv" "$OUT/eval_histogram/metrics.json" \
  "${runs[@]}" "${pooled[@]}" "${pairs[@]}" --out "$OUT/pooled.json" > "$OUT/pooled.log" 2>&1 \
  || { echo "comparison failed: $OUT/pooled.log" >&2; exit 1; }
"$PY" bench/eval/replication_record.py "$OUT" --out "$OUT/record.json" > /dev/null \
  || { echo "record failed: see above" >&2; exit 1; }
step "done: $OUT/pooled.json, $OUT/record.json (the bench/results record, verdict per modality)"
