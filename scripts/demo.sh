#!/usr/bin/env bash
# `make demo`: the main job end to end on the embedded default data.
#   synthetic hospital archive (real DICOM + ground truth) -> ingest -> resume -> PHI audit
#   -> ground truth re-keyed to the cache's keys -> cache summary -> a short Vol-JEPA pretraining
#   (ViT-Tiny, train split, resumed once) -> frozen features of the pretrained and a random-init
#   encoder and the histogram baseline -> study-level heads evaluated on the test split, trained with
#   the train split's lesion masks as a second target (`--token-masks`: maps that point; validation and
#   test never see a mask) and saved into the model with calibration, operating points and
#   distance-to-training -> `analyze` of one
#   test study with that model and with the shipped demo model -> a draft findings report of that
#   study (shipped report model on SmolLM2-135M-Instruct, with the consistency guard) -> pointing game.
# SMOKE=1 (`make demo-smoke`, run by CI): the same path with fewer steps and baselines.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
SMOKE=${SMOKE:-0}
OUT=${DEMO_OUT:-demo-out}
rm -rf "$OUT/archive" "$OUT/cache" "$OUT/keyed" "$OUT/pretrain" "$OUT/features" "$OUT/eval" "$OUT/random" \
  "$OUT/analyze" "$OUT/analyze-shipped" "$OUT/pointing" "$OUT/report"
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
echo "== pretrain: ViT-Tiny Vol-JEPA on the train split, in two resumable chunks =="
export NEUROVFM_CACHE="$OUT/cache" NEUROVFM_SPLITS="$OUT/keyed/labels_keyed.csv"
PT=(configs/pretrain_tiny_cpu.yaml --set run.out="$OUT/pretrain" --set run.epochs=2 --set run.monitor_every=5
    --set run.checkpoint_every=5 --set data.tokens_per_batch=4096 --quiet)
if [ "$SMOKE" = 1 ]; then
  $BIN/neurovfm pretrain "${PT[@]}" --set run.epochs=1 --max-steps 2
  $BIN/neurovfm pretrain "${PT[@]}" --set run.epochs=1 --resume
  FEATS=(pretrained:"$OUT/pretrain/model"); EPOCHS=3; BOOT=100
else
  $BIN/neurovfm pretrain "${PT[@]}" --max-steps 4
  $BIN/neurovfm pretrain "${PT[@]}" --resume
  FEATS=(pretrained:"$OUT/pretrain/model" random:"$OUT/random" histogram:histogram:32); EPOCHS=10; BOOT=200
fi
echo "== embed: pretrained, random-init (same architecture and seed), histogram baseline =="
$BIN/neurovfm init-model "$OUT/random" --like "$OUT/pretrain/model" --seed 0 > /dev/null
ARGS=()
for m in "${FEATS[@]}"; do
  $BIN/neurovfm embed "${m#*:}" "$OUT/cache" "$OUT/features/${m%%:*}" --quiet > /dev/null
  ARGS+=("${m%%:*}=$OUT/features/${m%%:*}")
done
echo "== evaluate: heads on train (labels + lesion masks), choices on validation, numbers on test =="
$BIN/neurovfm evaluate --features "${ARGS[@]}" --labels "$OUT/keyed/labels_keyed.csv" --cache "$OUT/cache" \
  --out "$OUT/eval" --min-test-positives 1 --bootstrap "$BOOT" --epochs "$EPOCHS" --token-masks "$OUT/archive" \
  --save-model "$OUT/pretrain/model" --quiet
echo "== analyze: one test study, DICOM folder -> findings, triage, maps =="
STUDY=$($BIN/python -c "import json,os,sys; rs=[json.loads(l) for l in open(sys.argv[1]+'/records.jsonl')]; \
r=next(r for r in rs if r['split']=='test'); print(os.path.join(sys.argv[1], os.path.dirname(r['series'][0]['path'])))" "$OUT/archive")
$BIN/neurovfm analyze "$STUDY" --model "$OUT/pretrain/model" --out "$OUT/analyze"
if [ -e src/neurovfm/demo_model/config.json ]; then
  echo "== analyze: the same study with the shipped demo model (the default) =="
  $BIN/neurovfm analyze "$STUDY" --out "$OUT/analyze-shipped" --quiet
fi
if [ -e src/neurovfm/demo_model/report/report_config.json ]; then
  echo "== report: the same study -> draft structured findings report (shipped model + SmolLM2 + guard) =="
  $BIN/neurovfm report "$STUDY" --out "$OUT/report" --indication "$($BIN/python -c "import json,sys; \
rs=[json.loads(l) for l in open(sys.argv[1]+'/records.jsonl')]; print(next(r for r in rs if r['split']=='test').get('indication',''))" "$OUT/archive")"
fi
echo "== pointing game: does the head's map hit the lesions of the test split? =="
$BIN/neurovfm pointing "$OUT/archive" --model "$OUT/pretrain/model" --out "$OUT/pointing" --quiet
echo
echo "evaluation: $OUT/eval/index.html   (16 studies: a smoke run of the pipeline, not a measurement)"
echo "analysis:   $OUT/analyze/summary.html   maps: $OUT/analyze/*_map_*.nii.gz over *_image.nii.gz"
[ -e "$OUT/analyze-shipped/summary.html" ] && echo "shipped demo model: $OUT/analyze-shipped/summary.html"
[ -e "$OUT/report/result.json" ] && echo "findings report: $OUT/report/summary.html (result.json: exams[].report)"
echo "previews:   $OUT/archive/preview/*.png"
