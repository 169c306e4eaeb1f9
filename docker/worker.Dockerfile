# GPU worker image: `tuna worker` plus the `tuna-trainer` binary linked against libtorch 2.11.0.
# CUDA base image; libtorch is the PyPI torch wheel (a CUDA 13.0 build whose CUDA libraries come
# as nvidia-* wheels), so the host only needs the NVIDIA driver and the NVIDIA container toolkit.
# The build steps are the ones scripts/setup.sh runs: a venv with torch==2.11.0 (+ setuptools),
# `.libtorch` linked to its torch folder (.cargo/config.toml points tch at it), then cargo.
# Build from the repo root: docker build -f docker/worker.Dockerfile -t tuna-worker .
ARG CUDA_BASE=nvidia/cuda:13.0.0-base-ubuntu24.04

# The dashboard's front end, built as scripts/setup.sh builds it (`npm ci`, `npm run build`);
# the tuna binary (also in this image) embeds crates/dashboard/web/dist.
FROM node:20-bookworm-slim AS web
WORKDIR /web
COPY crates/dashboard/web/package.json crates/dashboard/web/package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY crates/dashboard/web/tsconfig.json crates/dashboard/web/build.mjs crates/dashboard/web/index.html ./
COPY crates/dashboard/web/src ./src
RUN npm run build

FROM ${CUDA_BASE} AS build
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates curl build-essential pkg-config python3 python3-venv python3-dev \
    && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/opt/rustup CARGO_HOME=/opt/cargo PATH=/opt/cargo/bin:$PATH
RUN curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --default-toolchain none
WORKDIR /src
COPY . .
COPY --from=web /web/dist crates/dashboard/web/dist
# Same as scripts/setup.sh (only torch: the worker needs no transformers at run time).
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir torch==2.11.0 setuptools \
    && TORCH_DIR=$(/opt/venv/bin/python -c 'import torch, os; print(os.path.dirname(torch.__file__))') \
    && ln -sfn "$TORCH_DIR" .libtorch && ln -sfn "$TORCH_DIR" /opt/libtorch
RUN cargo build --release --locked -p tuna -p tuna-train --bins

FROM ${CUDA_BASE}
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# Same paths as in the build stage: tuna-trainer's rpath points into the venv.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/libtorch /opt/libtorch
COPY --from=build /src/target/release/tuna /src/target/release/tuna-trainer /usr/local/bin/
ENV LD_LIBRARY_PATH=/opt/libtorch/lib \
    TUNA_TRAINER_BIN=/usr/local/bin/tuna-trainer \
    TUNA_DATA_DIR=/data \
    TUNA_DEVICE=cuda \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
VOLUME /data
ENTRYPOINT ["tuna"]
# DATABASE_URL and TUNA_ARTIFACTS (s3://bucket/prefix, with the AWS_* variables) come from the
# environment; see docs/deployment.md.
CMD ["worker"]
