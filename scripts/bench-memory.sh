#!/usr/bin/env bash
# Memory benchmark (issue 13): the memory planner's estimate (tuna_core::memory) against the
# peak tuna-trainer really reaches, for the same model, batches and method.
#
#   scripts/bench-memory.sh [--out DIR] [--threads T] [--only REGEX]
#
# --only runs the cases whose line below matches REGEX (grep -E), e.g. --only 'gpt2.*checkpointing'.
#
# Each case prepares a model and pre-tokenised batches with python/bench_train_peer.py (GPT-2
# 124M, SmolLM-135M's Llama shape, a 12-layer Llama-style decoder or all-MiniLM-L6-v2; random
# weights but MiniLM's; fixed-length rows, or variable-length rows that need padding masks), runs `tuna-trainer bench` for one warm-up and two timed steps on the
# CPU (QLoRA cases also report the bytes their NF4 base takes), and reads the process's peak resident memory (VmHWM) and the planner's estimate from its
# JSON line. Prints a markdown table (measured, planned, planned / measured) and writes the raw
# lines to DIR/memory.jsonl (default target/bench/memory).
#
# Environment: TUNA_TRAINER (default target/debug/tuna-trainer, built when missing), PYTHON
# (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=target/bench/memory
THREADS=2
ONLY=
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --only) ONLY=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
TRAINER=${TUNA_TRAINER:-$ROOT/target/debug/tuna-trainer}
[ -x "$TRAINER" ] || cargo build -q -p tuna-train --bin tuna-trainer
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
RAW=$OUT/memory.jsonl
: > "$RAW"

# case  batch  length  extra tuna-trainer flags
CASES=(
  "gpt2 2 256"
  "gpt2 4 256"
  "gpt2 2 512"
  "gpt2 2 512 --gradient-checkpointing"
  "gpt2 2 256 --lora-r 16 --quantization nf4"
  "varlen 8 512"
  "llama 2 256"
  "llama 4 256"
  "llama 2 512"
  "llama 2 512 --gradient-checkpointing"
  "llama12 2 512"
  "llama12 2 512 --gradient-checkpointing"
  "llama12 4 512 --lora-r 16 --gradient-checkpointing"
  "llama12 2 256 --lora-r 16 --gradient-checkpointing"
  "llama12 2 256 --lora-r 16 --quantization nf4"
  "llama12 2 256 --lora-r 16 --quantization nf4 --no-double-quantization"
  "llama 4 256 --lora-r 16"
  "llama 4 256 --lora-r 16 --lora-dropout 0.05"
  "minilm-fixed 32 128"
  "minilm-fixed 32 128 --gradient-checkpointing"
  "minilm 32 128"
)
for c in "${CASES[@]}"; do
  if [ -n "$ONLY" ] && ! grep -qE -- "$ONLY" <<<"$c"; then continue; fi
  read -r kind batch len extra <<<"$c"
  dir=$OUT/$kind-$batch-$len
  if [ ! -f "$dir/batches.json" ]; then
    "$PYTHON" python/bench_train_peer.py prepare --case "$kind" --out "$dir" --batch "$batch" \
      --seq-len "$len" --steps 3 >/dev/null
  fi
  # shellcheck disable=SC2086
  "$TRAINER" bench --model-dir "$dir/model" --data "$dir/batches.json" --warmup 1 --steps 2 \
    --threads "$THREADS" --case "$kind $batch x $len ${extra:-}" ${extra:-} >>"$RAW" 2>/dev/null
done

"$PYTHON" - "$RAW" <<'EOF'
import json, sys
print("| case | trainable params | measured peak (MiB) | planned (MiB) | planned / measured |")
print("| --- | --- | --- | --- | --- |")
for line in open(sys.argv[1]):
    d = json.loads(line)
    m, p = d["peak_rss_bytes"], d["planned"]["total_bytes"]
    print(f"| {d['case'].strip()} | {d['trainable_params']:,} | {m / 2**20:,.0f} | {p / 2**20:,.0f} | {p / m:.2f} |")
print()
print("| QLoRA case | parameters in NF4 | their bytes | bytes per parameter | last loss |")
print("| --- | --- | --- | --- | --- |")
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["held"]["nf4_params"]:
        n, b = d["held"]["nf4_params"], d["held"]["nf4_bytes"]
        print(f"| {d['case'].strip()} | {n:,} | {b:,} | {b / n:.4f} | {d['last_loss']:.4f} |")
EOF
