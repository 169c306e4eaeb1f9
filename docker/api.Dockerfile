# Control plane image: `tuna serve --no-worker` (the API and the web dashboard) without
# libtorch: the `tuna` binary does not link tch; only `tuna-trainer` (crates/train) does, and it
# is not built here.
# Build from the repo root: docker build -f docker/api.Dockerfile -t tuna-api .

# The dashboard's front end, built as scripts/setup.sh builds it (`npm ci`, `npm run build`);
# the tuna binary embeds crates/dashboard/web/dist.
FROM node:20-bookworm-slim AS web
WORKDIR /web
COPY crates/dashboard/web/package.json crates/dashboard/web/package-lock.json ./
RUN npm ci --ignore-scripts --no-audit --no-fund
COPY crates/dashboard/web/tsconfig.json crates/dashboard/web/build.mjs crates/dashboard/web/index.html ./
COPY crates/dashboard/web/src ./src
RUN npm run build

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
COPY --from=web /web/dist crates/dashboard/web/dist
RUN cargo build --release --locked -p tuna --bins

FROM debian:bookworm-slim
# postgresql: only for the private cluster `tuna serve` starts when DATABASE_URL is unset.
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates postgresql \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/tuna /usr/local/bin/tuna
ENV TUNA_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
ENTRYPOINT ["tuna"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
