#!/usr/bin/env bash
# Training-speed benchmark (issue 6): tuna (`tuna-trainer bench`) against transformers
# (`python/bench_train_peer.py run`) on the same model folder, the same pre-tokenised batches and
# the same settings, run alternately (tuna, peer, tuna, peer, ...) so machine load hits both alike.
#
#   scripts/bench-train.sh [--device cpu|cuda] [--cases gpt2,llama,lora,varlen,minilm]
#                          [--rounds N] [--threads T] [--warmup W] [--steps N] [--out DIR]
#
# Cases: gpt2 (GPT-2 124M full fine-tune), llama (SmolLM-135M shape, full), lora (the same,
# LoRA r16 all linear layers), varlen (GPT-2 124M on log-normal example lengths: tuna packs,
# transformers pads to the longest), minilm (all-MiniLM-L6-v2 classification on SST-2, both
# sides pad each batch to its longest), minilm-group (the same, tuna with `packing`: each batch
# split into length groups padded separately; transformers as in minilm).
# Sizes: on cuda the issue's (batch 16 x 1024 tokens; varlen 16 examples, median 120, cap
# 1024; minilm 32 x up to 128). On cpu they are SCALED DOWN (printed at the start).
#
# Environment: TUNA_TRAINER (prebuilt binary; default target/release/tuna-trainer, built with
# cargo when missing and cargo exists), PYTHON (default .venv/bin/python, else python3; needs
# torch, transformers, peft), PEAK_TFLOPS (for the MFU; default 989 on H100/H200, none on cpu),
# BENCH_WORK (scratch folder for models and batches; default target/bench/work).
# No cargo is needed when TUNA_TRAINER points at a binary (the GPU machine).
#
# Output: one JSON line per process under $OUT/raw.jsonl, a summary JSON and a markdown table
# (medians over the rounds; ratio = tuna / transformers). Peak memory: on cpu each process's
# VmHWM (Python's includes the interpreter and libraries); on cuda the largest
# `nvidia-smi --query-compute-apps` used_memory seen for the process (sampled every 0.2 s,
# the same way for both sides).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DEVICE=cpu
CASES=""
ROUNDS=2
THREADS=""
WARMUP=""
STEPS=""
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --cases) CASES=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$DEVICE" in cpu|cuda) ;; *) echo "--device must be cpu or cuda" >&2; exit 2 ;; esac

if [ -z "${PYTHON:-}" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TUNA_TRAINER=${TUNA_TRAINER:-$ROOT/target/release/tuna-trainer}
if [ ! -x "$TUNA_TRAINER" ]; then
  if command -v cargo >/dev/null; then
    cargo build --release -p tuna-train --bin tuna-trainer >&2
  else
    echo "no tuna-trainer at $TUNA_TRAINER and no cargo to build it: set TUNA_TRAINER" >&2; exit 2
  fi
fi
TORCH_LIB=$("$PYTHON" -c 'import torch,os;print(os.path.join(os.path.dirname(torch.__file__),"lib"))')
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${OUT:-$ROOT/target/bench/train-$DEVICE-$STAMP}
WORK=${BENCH_WORK:-$ROOT/target/bench/work}
mkdir -p "$OUT" "$WORK"
RAW=$OUT/raw.jsonl
: > "$RAW"

if [ "$DEVICE" = cuda ]; then
  CASES=${CASES:-gpt2,llama,lora,varlen}
  W=${WARMUP:-3}; N=${STEPS:-10}
  # batch seq_len prepare-steps median
  SIZE_gpt2="16 1024 2 0"; SIZE_llama="16 1024 2 0"; SIZE_varlen="16 1024 8 120"; SIZE_minilm="32 128 8 0"
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 || true)
  if [ -z "${PEAK_TFLOPS:-}" ]; then
    case "$GPU" in *H100*|*H200*) PEAK_TFLOPS=989 ;; *) PEAK_TFLOPS="" ;; esac
  fi
  THREADS=${THREADS:-}
else
  CASES=${CASES:-minilm,gpt2}
  W=${WARMUP:-2}; N=${STEPS:-5}
  SIZE_gpt2="4 128 2 0"; SIZE_llama="4 128 2 0"; SIZE_varlen="16 256 4 40"; SIZE_minilm="32 64 8 0"
  THREADS=${THREADS:-$(nproc)}
  PEAK_TFLOPS=${PEAK_TFLOPS:-}
fi

echo "# bench-train: device=$DEVICE cases=$CASES rounds=$ROUNDS warmup=$W steps=$N threads=${THREADS:-default} peak_tflops=${PEAK_TFLOPS:-none}"
[ "$DEVICE" = cpu ] && echo "# CPU sizes are SCALED DOWN (batch x seq): gpt2/llama/lora ${SIZE_gpt2% * * *} x $(echo $SIZE_gpt2 | cut -d' ' -f2), varlen $(echo $SIZE_varlen | cut -d' ' -f1) examples cap $(echo $SIZE_varlen | cut -d' ' -f2) median $(echo $SIZE_varlen | cut -d' ' -f4), minilm $(echo $SIZE_minilm | cut -d' ' -f1) x <= $(echo $SIZE_minilm | cut -d' ' -f2)"
echo "# tuna-trainer: $TUNA_TRAINER; python: $PYTHON; out: $OUT"
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)"

prepare() { # case-data-name model-case size-var
  local name=$1 pcase=$2 size=$3
  read -r B T S M <<<"$size"
  local dir=$WORK/$DEVICE-$name-$B-$T
  if [ ! -f "$dir/batches.json" ]; then
    "$PYTHON" "$ROOT/python/bench_train_peer.py" prepare --case "$pcase" --out "$dir" --batch "$B" \
      --seq-len "$T" --steps "$S" ${M:+$( [ "$M" != 0 ] && echo --median-len "$M")} >&2
  fi
  echo "$dir"
}

# Runs one process, appends its JSON line (plus the sampled GPU memory) to $RAW.
measure() { # label cmd...
  local label=$1; shift
  local log=$OUT/$label.$RANDOM.log
  "$@" >"$log.out" 2>"$log.err" &
  local pid=$! peak=0
  if [ "$DEVICE" = cuda ]; then
    while kill -0 "$pid" 2>/dev/null; do
      local m
      m=$(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits 2>/dev/null \
          | awk -F', *' -v p="$pid" '$1==p {print $2}' | head -1)
      if [ -n "$m" ] && [ "$m" -gt "$peak" ]; then peak=$m; fi
      sleep 0.2
    done
  fi
  if ! wait "$pid"; then
    echo "!! $label failed; stderr tail:" >&2; tail -5 "$log.err" >&2
  fi
  local line
  line=$(grep '^{' "$log.out" | tail -1 || true)
  if [ -n "$line" ]; then
    "$PYTHON" -c 'import json,sys; d=json.loads(sys.argv[1]); d["gpu_peak_used_mib"]=int(sys.argv[2]) or None; d["load_avg"]=open("/proc/loadavg").read().split()[0]; print(json.dumps(d))' "$line" "$peak" >>"$RAW"
    "$PYTHON" -c 'import json,sys; d=json.loads(sys.argv[1]); print("  %12s %7s: %9.1f ms/step %10.0f real tok/s  loss %.3f  load %s" % (d["side"], d["case"], d["step_time_median_s"]*1000, d["tokens_per_s_real"], d["timed_loss_per_target"], open("/proc/loadavg").read().split()[0]))' "$line"
  fi
}

IFS=, read -ra CASE_LIST <<<"$CASES"
for c in "${CASE_LIST[@]}"; do
  case "$c" in
    gpt2) dir=$(prepare gpt2 gpt2 "$SIZE_gpt2"); targs=(); pargs=() ;;
    llama) dir=$(prepare llama llama "$SIZE_llama"); targs=(); pargs=() ;;
    lora) dir=$(prepare llama llama "$SIZE_llama"); targs=(--lora-r 16 --lora-alpha 32); pargs=(--lora-r 16 --lora-alpha 32) ;;
    varlen) dir=$(prepare varlen varlen "$SIZE_varlen"); targs=(--packing); pargs=() ;;
    minilm) dir=$(prepare minilm minilm "$SIZE_minilm"); targs=(); pargs=() ;;
    minilm-group) dir=$(prepare minilm minilm "$SIZE_minilm"); targs=(--packing); pargs=() ;;
    *) echo "unknown case $c" >&2; exit 2 ;;
  esac
  common=(--model-dir "$dir/model" --data "$dir/batches.json" --device "$DEVICE" --warmup "$W"
          --steps "$N" --case "$c" ${THREADS:+--threads "$THREADS"} ${PEAK_TFLOPS:+--peak-tflops "$PEAK_TFLOPS"})
  echo "## $c ($dir)"
  for r in $(seq 1 "$ROUNDS"); do
    measure "tuna-$c-$r" "$TUNA_TRAINER" bench "${common[@]}" "${targs[@]}"
    measure "peer-$c-$r" "$PYTHON" "$ROOT/python/bench_train_peer.py" run "${common[@]}" "${pargs[@]}"
  done
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"

"$PYTHON" - "$RAW" "$OUT" "$DEVICE" <<'EOF'
import json, statistics, sys, os
raw, out, device = sys.argv[1:4]
rows = [json.loads(l) for l in open(raw) if l.strip()]
cases = []
for r in rows:
    if r["case"] not in cases:
        cases.append(r["case"])
med = lambda xs: statistics.median(xs) if xs else float("nan")
summary = {"device": device, "cases": {}}
lines = ["| case | side | ms/step (median) | real tok/s | padded tok/s | TFLOP/s | MFU | peak mem | loss/target | runs |",
         "|---|---|---|---|---|---|---|---|---|---|"]
for c in cases:
    s = {}
    for side in ("tuna", "transformers"):
        rs = [r for r in rows if r["case"] == c and r["side"] == side]
        if not rs:
            continue
        gpu = [r["gpu_peak_used_mib"] for r in rs if r.get("gpu_peak_used_mib")]
        mem = (max(gpu) * 2**20) if gpu else max((r.get("peak_rss_bytes") or 0) for r in rs)
        s[side] = {
            "step_ms": med([r["step_time_median_s"] * 1000 for r in rs]),
            "real_tps": med([r["tokens_per_s_real"] for r in rs]),
            "padded_tps": med([r["tokens_per_s_padded"] for r in rs]),
            "tflops": med([r["tflops"] for r in rs]),
            "mfu": med([r["mfu"] for r in rs]) if all(r.get("mfu") is not None for r in rs) else None,
            "peak_mem_bytes": mem, "mem_kind": "gpu (nvidia-smi)" if gpu else "rss (VmHWM)",
            "loss": med([r["timed_loss_per_target"] for r in rs]), "runs": len(rs),
            "precision": rs[0]["precision"], "batch": rs[0]["batch_size"], "max_len": rs[0]["max_len"],
        }
        x = s[side]
        mfu = "-" if x["mfu"] is None else "%.1f%%" % (x["mfu"] * 100)
        lines.append(f"| {c} | {side} | {x['step_ms']:.1f} | {x['real_tps']:.0f} | {x['padded_tps']:.0f} | "
                     f"{x['tflops']:.3f} | {mfu} | "
                     f"{x['peak_mem_bytes']/2**30:.2f} GiB | {x['loss']:.3f} | {x['runs']} |")
    if "tuna" in s and "transformers" in s:
        t, p = s["tuna"], s["transformers"]
        s["ratio_real_tps"] = t["real_tps"] / p["real_tps"]
        s["ratio_peak_mem"] = t["peak_mem_bytes"] / p["peak_mem_bytes"] if p["peak_mem_bytes"] else None
        memr = "" if s["ratio_peak_mem"] is None else "%.2fx" % s["ratio_peak_mem"]
        lines.append(f"| {c} | **tuna/transformers** | | **{s['ratio_real_tps']:.2f}x** | | | | {memr} | | |")
    summary["cases"][c] = s
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
table = "\n".join(lines)
open(os.path.join(out, "table.md"), "w").write(table + "\n")
print(table)
EOF
echo "# results: $OUT/{raw.jsonl,summary.json,table.md}"
