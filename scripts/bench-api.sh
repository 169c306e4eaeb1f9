#!/usr/bin/env bash
# Control-plane benchmark (issue 2): builds release binaries, starts `tuna serve` on a temporary
# data directory with its private PostgreSQL, registers the tiny GPT-2 fixture as base model
# `gpt2`, runs `tuna-bench api` (job creations/s, retrievals/s, claim throughput, insert-to-claim
# latency) and stops everything. Arguments are passed to `tuna-bench api`, e.g.
#   scripts/bench-api.sh --concurrency 32 --duration 20
# Environment: BENCH_NO_BUILD=1 skips the build (BENCH_BIN_DIR: where the binaries are); BENCH_KEEP=1 keeps the data directory;
# BENCH_SERVER_ARGS adds `tuna serve` arguments; BENCH_PG_SQL runs SQL first and BENCH_NO_KEY=1
# sends no API key (experiments). Results are printed and written as JSON to
# target/bench/api-<time>.json. Everything listens on 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    cargo build --release -p tuna -p tuna-bench
fi
BIN_DIR=${BENCH_BIN_DIR:-$ROOT/target/release}
TUNA="$BIN_DIR/tuna"
BENCH="$BIN_DIR/tuna-bench"

DIR=$(mktemp -d /tmp/tuna-bench.XXXXXX)
# The private cluster may run as the `postgres` user, which must reach $DIR/pg.
chmod 755 "$DIR"
SERVER_PID=""
cleanup() {
    if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.1
        done
    fi
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "kept $DIR (server log: $DIR/serve.log)"
    else
        rm -rf "$DIR"
    fi
}
trap cleanup EXIT

# The bench creates tens of thousands of jobs; lift the per-organisation pending-job cap.
# shellcheck disable=SC2086
"$TUNA" serve --port 0 --data-dir "$DIR" --no-worker --max-pending-jobs 100000000 ${BENCH_SERVER_ARGS:-} \
    >"$DIR/serve.out" 2>"$DIR/serve.log" &
SERVER_PID=$!
URL=""
for _ in $(seq 1 600); do
    URL=$(sed -n 's/^tuna listening on \(http:\/\/.*\)$/\1/p' "$DIR/serve.out" | head -n1)
    [ -n "$URL" ] && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$DIR/serve.log" >&2; echo "tuna serve exited" >&2; exit 1; }
    sleep 0.1
done
[ -n "$URL" ] || { cat "$DIR/serve.log" >&2; echo "tuna serve did not start in 60 s" >&2; exit 1; }

"$TUNA" models register --data-dir "$DIR" gpt2 "$ROOT/.fixtures/gpt2" >/dev/null

# Experiments only: SQL run on the server's database before the bench, e.g.
#   BENCH_PG_SQL="alter system set synchronous_commit = off; select pg_reload_conf()"
if [ -n "${BENCH_PG_SQL:-}" ]; then
    PG_PORT=$(sed -n 4p "$DIR/pg/postmaster.pid")
    echo "experiment: $BENCH_PG_SQL"
    # One statement per call: ALTER SYSTEM cannot run inside the implicit transaction of a
    # multi-statement string.
    IFS=';' read -ra STATEMENTS <<<"$BENCH_PG_SQL"
    for stmt in "${STATEMENTS[@]}"; do
        [ -n "${stmt// /}" ] || continue
        psql -X -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -d tuna -c "$stmt" >/dev/null
    done
fi

mkdir -p "$ROOT/target/bench"
JSON="$ROOT/target/bench/api-$(date -u +%Y%m%dT%H%M%SZ).json"
echo "machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1)"
echo "date: $(date -u +%FT%TZ)  load before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "server: $URL (pid $SERVER_PID, data dir $DIR)"
# BENCH_NO_KEY=1 (experiments, with BENCH_SERVER_ARGS=--open-access): send no API key.
KEY=$(head -n1 "$DIR/admin_key")
[ "${BENCH_NO_KEY:-0}" = 1 ] && KEY=""
"$BENCH" api --url "$URL" --api-key "$KEY" --data-dir "$DIR" \
    --server-pid "$SERVER_PID" --json "$JSON" "$@"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "results: $JSON"
