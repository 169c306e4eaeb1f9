#!/usr/bin/env bash
# Runs every test of tuna: Rust unit and integration tests (real Postgres, real sockets, real
# libtorch on CPU) and the Python tests that check tuna with the tools people use (the official
# `openai` package, transformers, peft). Installs what is missing first (scripts/setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

scripts/setup.sh

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

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo shear (unused or misplaced dependencies)"
cargo shear

echo "== cargo clippy (workspace, tests included; warnings are errors)"
cargo clippy --workspace --all-targets -- -D warnings

echo "== cargo build (workspace, tests included)"
cargo build --workspace --all-targets

echo "== cargo test"
cargo test --workspace -- --test-threads=2

echo "== python tests (openai SDK, transformers/peft loading, OpenAPI)"
python -m pytest -q tests/python
