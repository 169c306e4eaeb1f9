"""docker/: what can be checked without a Docker engine.

- compose.yaml: `docker compose config` when the compose plugin is available; otherwise (as on
  the CI machines, which have neither an engine nor the plugin) it is parsed with PyYAML and its
  structure is checked: the services, the GPU reservation, the shared settings, the volumes.
- The images run the flags and environment variables tuna really has (checked against
  `tuna serve --help` / `tuna worker --help`) and build with the commands scripts/setup.sh runs
  (torch==2.11.0 as python/requirements.txt pins it, the `.libtorch` link, `-p tuna-train` only
  in the worker image)."""

import re
import shutil
import subprocess

import pytest
import yaml

from conftest import BINARY, ROOT

DOCKER = ROOT / "docker"


def compose_config():
    """The resolved compose model, by `docker compose config` if possible."""
    docker = shutil.which("docker")
    if docker:
        proc = subprocess.run([docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config"],
                              capture_output=True, text=True)
        if proc.returncode == 0:
            return yaml.safe_load(proc.stdout), "docker compose config"
    # No compose plugin here: YAML parse (anchors and merge keys resolved by PyYAML).
    return yaml.safe_load((DOCKER / "compose.yaml").read_text()), "yaml"


def env_of(service):
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_structure():
    config, how = compose_config()
    print("compose checked with", how)
    services = config["services"]
    assert {"postgres", "minio", "api", "worker"} <= set(services)
    api, worker = services["api"], services["worker"]
    assert api["build"]["dockerfile"].endswith("api.Dockerfile")
    assert worker["build"]["dockerfile"].endswith("worker.Dockerfile")
    assert "--no-worker" in api["command"] and api["command"][0] == "serve"
    assert worker["command"] == ["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    a, w = env_of(api), env_of(worker)
    for key in ("DATABASE_URL", "TUNA_ARTIFACTS", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert a[key] == w[key], key
    assert a["DATABASE_URL"].startswith("postgres://") and "@postgres:" in a["DATABASE_URL"]
    assert a["TUNA_ARTIFACTS"].startswith("s3://")
    assert a["AWS_ENDPOINT_URL"].startswith("http://minio:")
    minio_env = env_of(services["minio"])
    assert minio_env["MINIO_ROOT_USER"] == a["AWS_ACCESS_KEY_ID"]
    assert minio_env["MINIO_ROOT_PASSWORD"] == a["AWS_SECRET_ACCESS_KEY"]
    bucket = a["TUNA_ARTIFACTS"].removeprefix("s3://").split("/")[0]
    assert any(bucket in str(s.get("command", "")) for s in services.values()), "nothing creates the bucket"
    pg = env_of(services["postgres"])
    assert f"{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@" in a["DATABASE_URL"]
    assert a["DATABASE_URL"].endswith("/" + pg["POSTGRES_DB"])
    declared = set(config.get("volumes", {}))
    for s in services.values():
        for v in s.get("volumes", []):
            source = v["source"] if isinstance(v, dict) else v.split(":")[0]
            if not source.startswith(("/", ".")):
                assert source in declared, source


def help_of(*args):
    return subprocess.run([str(BINARY), *args, "--help"], capture_output=True, text=True, check=True).stdout


def test_images_use_real_flags_and_variables():
    config, _ = compose_config()
    serve_help, worker_help = help_of("serve"), help_of("worker")
    api_df = (DOCKER / "api.Dockerfile").read_text()
    cmd = re.search(r'^CMD \[(.*)\]', api_df, re.M).group(1)
    for flag in re.findall(r'"(--[a-z-]+)"', cmd):
        assert flag in serve_help, flag
    for flag in config["services"]["api"]["command"]:
        if flag.startswith("--"):
            assert flag in serve_help, flag
    # Every TUNA_* variable the images or compose set is one tuna reads.
    known = set(re.findall(r"TUNA_[A-Z_]+", serve_help + worker_help)) | {"TUNA_TRAINER_BIN"}
    text = api_df + (DOCKER / "worker.Dockerfile").read_text() + (DOCKER / "compose.yaml").read_text()
    for var in set(re.findall(r"TUNA_[A-Z_]+", text)):
        assert var in known, f"{var} is not a variable tuna reads"
    assert "DATABASE_URL" in worker_help and "TUNA_ARTIFACTS" in worker_help and "TUNA_ARTIFACTS" in serve_help


def test_worker_image_builds_like_setup():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    requirements = (ROOT / "python" / "requirements.txt").read_text()
    worker_df = (DOCKER / "worker.Dockerfile").read_text()
    api_df = (DOCKER / "api.Dockerfile").read_text()
    torch_pin = re.search(r"^torch==(\S+)$", requirements, re.M).group(1)
    assert f"torch=={torch_pin}" in worker_df
    assert "python3 -m venv" in setup and "python3 -m venv" in worker_df
    assert "ln -sfn" in setup and ".libtorch" in setup
    assert re.search(r'ln -sfn "\$TORCH_DIR" \.libtorch', worker_df)
    assert "import torch, os; print(os.path.dirname(torch.__file__))" in setup
    assert "import torch, os; print(os.path.dirname(torch.__file__))" in worker_df
    assert re.search(r"cargo build --release --locked -p tuna -p tuna-train", worker_df)
    assert "tuna-train" not in re.sub(r"#.*", "", api_df), "the control plane image must not build libtorch code"
    assert re.search(r"^FROM nvidia/cuda|CUDA_BASE=nvidia/cuda", worker_df, re.M)
    # Both images build `tuna`, which embeds the dashboard: built in a Node stage with the
    # commands setup.sh runs, and copied where crates/dashboard/build.rs reads it.
    for df in (api_df, worker_df):
        assert "npm ci --ignore-scripts" in df and "npm run build" in df
        assert "COPY --from=web /web/dist crates/dashboard/web/dist" in df
    assert "npm ci --ignore-scripts" in setup and "npm run --silent build" in setup
    # The toolchain the images build with is the repo's.
    channel = re.search(r'channel = "(\d+\.\d+)', (ROOT / "rust-toolchain.toml").read_text()).group(1)
    assert f"rust:{channel}" in api_df
