"""Fixtures for the black-box tests: a running `tuna serve` driven by the official `openai` SDK.

The server is the already-built `target/debug/tuna` (build it first: `cargo build -p tuna`),
started once per session with `--port 0` in a temporary data directory. Unless
TUNA_TEST_DATABASE_URL is set (a fresh, empty database), it runs its own private PostgreSQL
cluster there, which it stops on SIGTERM.

Every HTTP response the SDK receives is validated against openapi.yaml (path, method, status
and JSON body schema); mismatches fail the test that caused them.
"""

import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx2 as httpx
import jsonschema
import openai
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BINARY = ROOT / "target" / "debug" / "tuna"
MAX_UPLOAD = 64 * 1024


class SpecChecker:
    """Validates responses against openapi.yaml."""

    def __init__(self, spec_path: Path):
        self.spec = yaml.safe_load(spec_path.read_text())
        self.routes = []
        for template, item in self.spec["paths"].items():
            pattern = "^" + re.sub(r"\{[^/]+\}", "[^/]+", template) + "$"
            self.routes.append((re.compile(pattern), template, item))
        self.failures = []

    def resolve(self, obj):
        while isinstance(obj, dict) and "$ref" in obj and obj["$ref"].startswith("#/components/responses/"):
            obj = self.spec["components"]["responses"][obj["$ref"].rsplit("/", 1)[1]]
        return obj

    def schema_for(self, method: str, path: str, status: int):
        for pattern, template, item in self.routes:
            if pattern.match(path) and method.lower() in item:
                responses = item[method.lower()]["responses"]
                resp = self.resolve(responses.get(str(status)))
                if resp is None:
                    raise AssertionError(f"{method} {template}: status {status} is not in openapi.yaml")
                return template, resp.get("content", {})
        return None, None

    def check(self, response: httpx.Response):
        request = response.request
        path = request.url.path
        try:
            template, content = self.schema_for(request.method, path, response.status_code)
            if template is None:
                # Unknown routes and wrong methods must still answer the error shape.
                self.validate(response.json(), {"$ref": "#/components/schemas/ErrorResponse"})
                return
            ctype = response.headers.get("content-type", "").split(";")[0]
            if ctype == "application/json":
                schema = content.get("application/json", {}).get("schema")
                if schema is None:
                    raise AssertionError(f"{request.method} {template} {response.status_code}: JSON not documented")
                self.validate(response.json(), schema)
            elif ctype not in content:
                raise AssertionError(f"{request.method} {template}: content type {ctype} not documented")
        except Exception as e:  # collected, reported by the autouse fixture
            self.failures.append(f"{request.method} {path} -> {response.status_code}: {e}")

    def validate(self, instance, schema):
        root = {"components": self.spec["components"], **schema}
        jsonschema.Draft202012Validator(root).validate(instance)


@pytest.fixture(scope="session")
def spec_checker():
    return SpecChecker(ROOT / "openapi.yaml")


def _wait_for_address(proc, deadline):
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise RuntimeError(f"tuna serve exited with {proc.returncode}")
            continue
        m = re.match(r"tuna listening on (http://\S+)", line.strip())
        if m:
            return m.group(1)
    raise RuntimeError("tuna serve did not print its address in time")


@contextlib.contextmanager
def tuna_serve(args, prefix, database_url=None, models=(), port=0, data_dir=None):
    """Runs `target/debug/tuna serve --port PORT ARGS` in a fresh data directory, registers each
    fixture model of `models` under its name, and yields `(base_url, admin_key, data_dir)`.
    Without `database_url` the server runs its own private PostgreSQL there. SIGTERM on exit;
    the data directory is kept when the server did not exit cleanly. With `data_dir` (a
    directory an earlier server used), the server restarts on it, which is then left alone."""
    # Not pytest's tmp_path: the private cluster may run as user `postgres` (when the tests run
    # as root), which must be able to reach the directory.
    reused = data_dir is not None
    if not reused:
        data_dir = Path(tempfile.mkdtemp(prefix=prefix))
        data_dir.chmod(0o755)
    env = dict(os.environ)
    env.pop("DATABASE_URL", None)
    if database_url:
        env["DATABASE_URL"] = database_url
    env.setdefault("RUST_LOG", "warn")
    log = open(data_dir / "server.log", "w")
    proc = subprocess.Popen(
        [str(BINARY), "serve", "--port", str(port), "--data-dir", str(data_dir), *args],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=env,
    )
    try:
        base = _wait_for_address(proc, time.time() + 120)
        admin_key = (data_dir / "admin_key").read_text().strip()
        for name in models:
            r = httpx.post(f"{base}/v1/models", headers={"Authorization": f"Bearer {admin_key}"},
                           json={"id": name, "path": str(ROOT / ".fixtures" / name)})
            assert r.status_code == 200, r.text
        yield base, admin_key, data_dir
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        if proc.returncode == 0:
            if not reused:
                shutil.rmtree(data_dir, ignore_errors=True)
        else:
            print(f"tuna serve exited with {proc.returncode}; its data directory is kept: {data_dir}")


@pytest.fixture(scope="session")
def server():
    if not BINARY.exists():
        pytest.fail(f"{BINARY} is missing; run `cargo build -p tuna` first")
    # No in-process worker: these tests drive job states themselves, without training.
    args = ["--max-upload-bytes", str(MAX_UPLOAD), "--no-worker"]
    database_url = os.environ.get("TUNA_TEST_DATABASE_URL")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if database_url:
        env["DATABASE_URL"] = database_url
    with tuna_serve(args, "tuna-pytest-", database_url, models=["gpt2"]) as (base, admin_key, data_dir):
        other = subprocess.run(
            [str(BINARY), "keys", "create", "--org", "other-org", "--data-dir", str(data_dir)],
            capture_output=True, text=True, env=env, check=True,
        )
        other_key = other.stdout.strip().splitlines()[-1]
        yield {"base": base, "admin_key": admin_key, "other_key": other_key, "data_dir": data_dir}


def _client(server, key, spec_checker):
    http = httpx.Client(event_hooks={"response": [lambda r: (r.read(), spec_checker.check(r))]})
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key=key, http_client=http)


@pytest.fixture
def client(server, spec_checker):
    return _client(server, server["admin_key"], spec_checker)


@pytest.fixture
def other_client(server, spec_checker):
    return _client(server, server["other_key"], spec_checker)


@pytest.fixture
def raw(server, spec_checker):
    """A plain httpx client with the admin key, for requests the SDK cannot make."""
    return httpx.Client(
        base_url=server["base"],
        headers={"Authorization": f"Bearer {server['admin_key']}"},
        event_hooks={"response": [lambda r: (r.read(), spec_checker.check(r))]},
    )


@pytest.fixture(autouse=True)
def responses_match_the_spec(spec_checker):
    spec_checker.failures.clear()
    yield
    assert not spec_checker.failures, "responses that do not match openapi.yaml:\n" + "\n".join(spec_checker.failures)


@pytest.fixture(scope="session")
def worker_server():
    """`tuna serve` with its in-process CPU worker, so jobs really train, and the tiny
    `.fixtures/gpt2` and `.fixtures/bert` checkpoints registered as `gpt2` and `bert`: for the
    dashboard's browser tests and the terminal test of `jobs watch`. `file://` dataset URLs
    are allowed (data the worker reads itself, so that a bad line fails the job)."""
    if not BINARY.exists() or not (BINARY.parent / "tuna-trainer").exists():
        pytest.fail("build first: cargo build -p tuna -p tuna-train --bins")
    if os.environ.get("TUNA_TEST_DATABASE_URL"):
        pytest.skip("needs a private database of its own")
    args = ["--worker-device", "cpu", "--allow-file-urls"]
    with tuna_serve(args, "tuna-ui-", models=["gpt2", "bert"]) as (base, key, data_dir):
        yield {"base": base, "key": key, "data_dir": data_dir}


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item (`item.rep_call`), so fixtures can tell
    whether the test failed (the browser tests save a screenshot then)."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
