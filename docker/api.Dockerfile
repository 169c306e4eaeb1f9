# Control plane image: `tuna serve --no-worker` (API) without libtorch.
# Build from the repo root: docker build -f docker/api.Dockerfile -t tuna-api .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Only the control-plane crates: tuna-train (libtorch) is not built.
RUN cargo build --release -p tuna --locked

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates postgresql \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tuna /usr/local/bin/tuna
ENV TUNA_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
ENTRYPOINT ["tuna"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
