#!/usr/bin/env bash
# Generation-speed benchmark (issue 16 §4): tuna (`tuna-trainer bench-generate`, KV cache,
# greedy) against transformers' `generate` (`python/bench_generate_peer.py run`) on the same
# model folder, the same prompts and settings, run alternately (tuna, peer, tuna, peer, ...) so
# machine load hits both alike.
#
#   scripts/bench-generate.sh [--device cpu|cuda] [--cases gpt2,llama] [--batches 1,8]
#                             [--prompt-len P] [--new-tokens N] [--rounds R] [--repeats K]
#                             [--threads T] [--out DIR]
#
# Cases: gpt2 (GPT-2 124M, random weights), llama (SmolLM-135M shape: 30 layers, GQA 9/3).
# Prompts: random tokens, lengths P, P-8, P-16, P-24 (a batch of 8 is padded on the left).
# Each process times R rounds (after a warm-up round) of generate(1 token) and generate(N);
# TTFT is the first, the decode speed batch * (N - 1) / (t_N - t_1). K processes per side.
# Defaults: cpu, gpt2 and llama, batches 1 and 8, P 128, N 64, R 3, K 2, 2 threads.
#
# Environment: TUNA_TRAINER (prebuilt binary; default target/release/tuna-trainer, built with
# cargo when missing), PYTHON (default .venv/bin/python), BENCH_WORK (default
# target/bench/generate).
#
# Output: $OUT/raw.jsonl (one line per process) and a markdown table on stdout (medians over
# the processes; TTFT ratio = transformers / tuna, decode ratio = tuna / transformers: above 1
# means tuna is faster).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DEVICE=cpu CASES=gpt2,llama BATCHES=1,8 PROMPT_LEN=128 NEW=64 ROUNDS=3 REPEATS=2 THREADS=2 OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --cases) CASES=$2; shift 2 ;;
    --batches) BATCHES=$2; shift 2 ;;
    --prompt-len) PROMPT_LEN=$2; shift 2 ;;
    --new-tokens) NEW=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --repeats) REPEATS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TUNA_TRAINER=${TUNA_TRAINER:-$ROOT/target/release/tuna-trainer}
if [ ! -x "$TUNA_TRAINER" ]; then
  cargo build --release -p tuna-train --bin tuna-trainer
fi
WORK=${BENCH_WORK:-$ROOT/target/bench/generate}
OUT=${OUT:-$WORK/out}
mkdir -p "$OUT"
: > "$OUT/raw.jsonl"
for case in ${CASES//,/ }; do
  dir=$WORK/$case
  "$PYTHON" python/bench_generate_peer.py prepare --case "$case" --out "$dir" --prompt-len "$PROMPT_LEN"
  for batch in ${BATCHES//,/ }; do
    for _ in $(seq "$REPEATS"); do
      "$TUNA_TRAINER" bench-generate --model-dir "$dir/model" --prompts "$dir/prompts.json" \
        --batch "$batch" --new-tokens "$NEW" --rounds "$ROUNDS" --device "$DEVICE" \
        --threads "$THREADS" | sed "s/^{/{\"case\":\"$case\",/" >> "$OUT/raw.jsonl"
      "$PYTHON" python/bench_generate_peer.py run --model-dir "$dir/model" --prompts "$dir/prompts.json" \
        --batch "$batch" --new-tokens "$NEW" --rounds "$ROUNDS" --device "$DEVICE" \
        --threads "$THREADS" | sed "s/^{/{\"case\":\"$case\",/" >> "$OUT/raw.jsonl"
    done
  done
done
"$PYTHON" - "$OUT/raw.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
keys = sorted({(r["case"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1]))
print("| case | batch | TTFT tuna (ms) | TTFT transformers (ms) | ratio | decode tuna (tok/s) | decode transformers (tok/s) | ratio |")
print("|---|---|---|---|---|---|---|---|")
for case, batch in keys:
    def med(impl, k):
        return statistics.median(r[k] for r in rows if (r["case"], r["batch"], r["impl"]) == (case, batch, impl))
    t_tuna, t_hf = med("tuna", "ttft_s"), med("transformers", "ttft_s")
    d_tuna, d_hf = med("tuna", "decode_tokens_per_s"), med("transformers", "decode_tokens_per_s")
    print(f"| {case} | {batch} | {t_tuna * 1e3:.1f} | {t_hf * 1e3:.1f} | {t_hf / t_tuna:.2f} | {d_tuna:.1f} | {d_hf:.1f} | {d_tuna / d_hf:.2f} |")
PY
