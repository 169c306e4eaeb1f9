#!/usr/bin/env bash
# Runs every test of tuna: Rust unit and integration tests (real Postgres, real sockets, real
# libtorch on CPU) and the Python tests that check tuna with the tools people use (the official
# `openai` package, transformers, peft). Installs what is missing first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

scripts/setup.sh
echo "== setup: $SECONDS s"

export PATH="$ROOT/.venv/bin:$PATH"
export VIRTUAL_ENV="$ROOT/.venv"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TUNA_PYTHON="$ROOT/.venv/bin/python"
export RUST_BACKTRACE=1

# Stop the shared test Postgres cluster however the run ends.
stop_test_pg() {
    local pgdata="$ROOT/target/tuna-test-pg"
    if [ -f "$pgdata/postmaster.pid" ]; then
        local bindir
        bindir=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n1)
        if [ "$(id -u)" = 0 ]; then
            runuser -u postgres -- "$bindir/pg_ctl" -D "$pgdata" stop -m fast >/dev/null 2>&1 || true
        else
            "$bindir/pg_ctl" -D "$pgdata" stop -m fast >/dev/null 2>&1 || true
        fi
    fi
}
trap stop_test_pg EXIT

# Each phase prints how long the previous one took (CI time is a budget: keep the suite inside it).
phase() {
    local now=$SECONDS
    [ -n "${PHASE_NAME:-}" ] && echo "== ${PHASE_NAME}: $((now - PHASE_START)) s"
    PHASE_NAME=$1 PHASE_START=$now
    echo "== $1"
}

phase "cargo fmt --check"
cargo fmt --all -- --check

phase "cargo shear (unused or misplaced dependencies)"
cargo shear

phase "cargo clippy (workspace, tests included; warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

phase "cargo build (workspace, tests included)"
cargo build --workspace --all-targets

phase "cargo test"
cargo test --workspace -- --test-threads=2

phase "python tests (openai SDK, transformers/peft loading, OpenAPI)"
python -m pytest -q tests/python
phase "done"
