"""The examples in docs/ run, so they cannot rot.

Every fenced ```sh and ```python block of docs/guide.md and docs/outputs.md (except those marked
`norun`) runs in order, in one scratch directory per document, against a live `tuna serve` WITH
its in-process worker, so jobs really train (the tiny `.fixtures/gpt2` checkpoint registered as
`gpt2`, `.fixtures/bert` as `bert`). The blocks see TUNA_URL, TUNA_API_KEY, OPENAI_BASE_URL,
OPENAI_API_KEY, BASE_MODEL_DIR, BERT_MODEL_DIR, and `tuna` plus the venv's python on PATH.

Also checks that docs/cli.md documents every `tuna` subcommand and that each subcommand it shows
is one `tuna --help` knows."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import BINARY, ROOT, tuna_serve

DOCS = ROOT / "docs"
BLOCK = re.compile(r"^```(sh|python)([^\n]*)\n(.*?)^```\s*$", re.M | re.S)


def runnable_blocks(path: Path):
    text = path.read_text()
    blocks = []
    for m in BLOCK.finditer(text):
        if "norun" in m.group(2).split():
            continue
        line = text[: m.start()].count("\n") + 1
        blocks.append((m.group(1), m.group(3), line))
    return blocks


@pytest.fixture(scope="module")
def live_server():
    """`tuna serve` with its worker (the shared `server` fixture has none)."""
    if not BINARY.exists() or not (BINARY.parent / "tuna-trainer").exists():
        pytest.fail("build first: cargo build -p tuna -p tuna-train --bins")
    if os.environ.get("TUNA_TEST_DATABASE_URL"):
        pytest.skip("needs a private database of its own")
    with tuna_serve(["--worker-device", "cpu"], "tuna-docs-", models=["gpt2", "bert"]) as (base, key, data_dir):
        yield {"base": base, "key": key, "data_dir": data_dir}


def run_document(name, live_server, tmp_path):
    blocks = runnable_blocks(DOCS / name)
    assert blocks, f"{name} has no runnable examples"
    env = dict(os.environ)
    for k in ("DATABASE_URL", "TUNA_DATA_DIR"):
        env.pop(k, None)
    env.update(
        TUNA_URL=live_server["base"], TUNA_API_KEY=live_server["key"],
        OPENAI_BASE_URL=live_server["base"] + "/v1", OPENAI_API_KEY=live_server["key"],
        BASE_MODEL_DIR=str(ROOT / ".fixtures" / "gpt2"), BERT_MODEL_DIR=str(ROOT / ".fixtures" / "bert"),
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        PATH=f"{BINARY.parent}:{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}",
    )
    python = str(ROOT / ".venv" / "bin" / "python")
    for lang, code, line in blocks:
        cmd = ["bash", "-euo", "pipefail", "-c", code] if lang == "sh" else [python, "-c", code]
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (
            f"docs/{name}:{line}: the ```{lang} block failed ({proc.returncode})\n--- code\n{code}\n"
            f"--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}")
    return tmp_path


def test_guide_examples_run(live_server, tmp_path):
    out = run_document("guide.md", live_server, tmp_path)
    for d in ("curl-model", "cli-model", "sdk-model"):
        assert (out / d / "adapter_config.json").is_file(), d


def test_outputs_examples_run(live_server, tmp_path):
    run_document("outputs.md", live_server, tmp_path)


EXAMPLE = re.compile(r"^(#+ [^\n]*)$|^```(json|text)\n(.*?)^```\s*$", re.M | re.S)


def test_data_formats_examples_are_accepted_as_their_shape(live_server):
    """Every example file in docs/data-formats.md (```json: JSONL, ```text: CoNLL in its section,
    else CSV or TSV by its header) uploads as `processed`, with the shape its section names."""
    import httpx2 as httpx

    text = (DOCS / "data-formats.md").read_text()
    # First match wins: "text + labels" before "text + label".
    shapes = {"chat": "messages", "prompt / completion": "prompt_completion", "text + labels": "text_labels",
              "text + label": "text_label", "text + number": "text_label", "sentence pairs": "text_label",
              "text — causal": "text", "csv and tsv": "text_label", "tokens + tags": "tokens_tags",
              "conll": "tokens_tags", "question + context": "question_answers",
              "preference pairs": "preference"}
    heading, checked = "", 0
    for m in EXAMPLE.finditer(text):
        if m.group(1):
            heading = m.group(1).lower()
            continue
        lang, body = m.group(2), m.group(3)
        if lang == "json":
            name = "example.jsonl"
        elif "conll" in heading:
            name = "example.conll"
        else:
            name = "example.tsv" if "\t" in body.splitlines()[0] else "example.csv"
        r = httpx.post(f"{live_server['base']}/v1/files", headers={"Authorization": f"Bearer {live_server['key']}"},
                       files={"file": (name, body.encode())}, data={"purpose": "fine-tune"}, timeout=30)
        assert r.status_code == 200, (heading, body, r.text)
        f = r.json()
        assert f["status"] == "processed", (heading, body, f)
        want = next((v for k, v in shapes.items() if k in heading), "unknown")
        assert want != "unknown", f"no expected shape for section {heading!r}"
        assert f["format"] == want, (heading, body, f)
        checked += 1
    assert checked >= 13, checked


def test_cli_doc_covers_every_command():
    doc = (DOCS / "cli.md").read_text()
    help_text = subprocess.run([str(BINARY), "--help"], capture_output=True, text=True, check=True).stdout
    commands = re.findall(r"^  ([a-z][a-z-]*)\s{2,}", help_text, re.M)
    commands = [c for c in commands if c != "help"]
    assert {"serve", "worker", "files", "jobs", "download", "models", "keys"} <= set(commands), commands
    for c in commands:
        assert f"tuna {c}" in doc, f"docs/cli.md does not mention `tuna {c}`"
    for group in ("files", "jobs", "models", "keys"):
        sub_help = subprocess.run([str(BINARY), group, "--help"], capture_output=True, text=True,
                                  check=True).stdout
        subs = {s for s in re.findall(r"^  ([a-z][a-z-]*)\s{2,}", sub_help, re.M) if s != "help"}
        shown = set(re.findall(rf"\btuna {group} ([a-z][a-z-]*)", doc))
        assert shown <= subs, f"docs/cli.md shows `tuna {group}` subcommands that do not exist: {shown - subs}"
        assert subs <= shown, f"docs/cli.md does not show `tuna {group}` {sorted(subs - shown)}"


def test_configuration_doc_covers_every_flag():
    doc = (DOCS / "configuration.md").read_text()
    for command in ("serve", "worker"):
        help_text = subprocess.run([str(BINARY), command, "--help"], capture_output=True, text=True,
                                   check=True).stdout
        for flag in set(re.findall(r"^\s+(--[a-z][a-z-]*)", help_text, re.M)) - {"--help"}:
            assert f"`{flag}`" in doc, f"docs/configuration.md does not document `tuna {command} {flag}`"
        for var in set(re.findall(r"\[env: ([A-Z_]+)", help_text)):
            assert f"`{var}`" in doc, f"docs/configuration.md does not document {var}"


def test_cli_doc_forms_not_covered_by_cli_rs(live_server, tmp_path):
    """docs/cli.md forms that crates/tuna/tests/cli.rs does not run: keys, paging and filter
    flags, idempotency keys, local validation files, job files from stdin."""
    env = dict(os.environ, TUNA_URL=live_server["base"], TUNA_API_KEY=live_server["key"])
    env.pop("DATABASE_URL", None)

    def tuna(*args, stdin=None):
        proc = subprocess.run([str(BINARY), *args], cwd=tmp_path, env=env, input=stdin,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"tuna {' '.join(args)}: {proc.stderr}"
        return proc.stdout

    data_dir = str(live_server["data_dir"])
    secret = tuna("keys", "create", "--org", "docs-team", "--name", "ci", "--data-dir", data_dir).strip().splitlines()[-1]
    assert secret and "docs-team" not in secret
    assert "ci" in tuna("keys", "list", "--data-dir", data_dir)
    (tmp_path / "t.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    (tmp_path / "v.jsonl").write_text('{"text": "three"}\n')
    first = tuna("files", "upload", "t.jsonl", "--json")
    file_id = json.loads(first)["id"]
    tuna("files", "upload", "t.jsonl", "--purpose", "user_data")
    listed = tuna("files", "list", "--purpose", "fine-tune", "--limit", "5", "--order", "desc", "--json")
    assert file_id in listed
    tuna("files", "list", "--after", file_id)
    args = ["jobs", "create", "--model", "gpt2", "--training-file", file_id, "--validation-file", "v.jsonl",
            "--set", "max_steps=1", "--idempotency-key", "docs-idem-1", "--json"]
    a, b = json.loads(tuna(*args)), json.loads(tuna(*args))
    assert a["id"] == b["id"] and a["validation_file"].startswith("file-")
    job = json.loads(tuna("jobs", "create", "-f", "-", "--json",
                                        stdin=f'{{"model": "gpt2", "training_file": "{file_id}", "max_steps": 1}}'))
    tuna("jobs", "watch", job["id"], "--poll", "--interval", "1")
    assert job["id"] in tuna("jobs", "list", "--all", "--limit", "1")
    tuna("jobs", "watch", a["id"])
