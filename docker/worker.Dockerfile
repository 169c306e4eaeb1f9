# GPU worker image: `tuna worker` plus the `tuna-trainer` binary linked against libtorch 2.11.0
# (the PyPI torch wheel, a CUDA 13.0 build whose CUDA libraries come as nvidia-* wheels; the host
# only needs the NVIDIA driver). The build steps are the ones scripts/setup.sh runs.
# Build from the repo root: docker build -f docker/worker.Dockerfile -t tuna-worker .
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3-venv && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir torch==2.11.0 setuptools \
    && ln -sfn "$(/opt/venv/bin/python -c 'import torch,os;print(os.path.dirname(torch.__file__))')" .libtorch
RUN cargo build --release -p tuna -p tuna-train --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates python3 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
# Same path as in the build stage: tuna-trainer's rpath points into it.
COPY --from=build /opt/venv /opt/venv
COPY --from=build /src/target/release/tuna /src/target/release/tuna-trainer /usr/local/bin/
ENV LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/torch/lib \
    TUNA_TRAINER_BIN=/usr/local/bin/tuna-trainer \
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
ENTRYPOINT ["tuna"]
CMD ["worker"]
