"""The official `openai` SDK against a running tuna: every files and fine-tuning call, paging,
error classes, idempotency, tenant isolation, upload checks."""

import io
import json
import time

import httpx2 as httpx
import openai
import pytest

from conftest import MAX_UPLOAD

CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "system", "content": "brief"}, {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]},
]


def jsonl(records):
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


def upload(client, data=None, name="train.jsonl", purpose="fine-tune"):
    return client.files.create(file=(name, io.BytesIO(data if data is not None else jsonl(CHAT))), purpose=purpose)


def wait_validated(client, job_id, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status != "validating_files":
            return job
        time.sleep(0.1)
    raise AssertionError(f"{job_id} stayed in validating_files")


def test_files_create_retrieve_list_content_delete(client):
    f = upload(client)
    assert f.id.startswith("file-") and f.object == "file"
    assert f.status == "processed" and f.purpose == "fine-tune" and f.filename == "train.jsonl"
    assert f.bytes == len(jsonl(CHAT))
    assert f.format == "messages" and f.example_count == 2
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).read() == jsonl(CHAT)
    assert f.id in [x.id for x in client.files.list()]
    deleted = client.files.delete(f.id)
    assert deleted.deleted is True and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)


def test_files_list_pages_with_after_and_order(client):
    ids = [upload(client, name=f"p{i}.jsonl").id for i in range(3)]
    page = client.files.list(limit=2, order="asc", purpose="fine-tune")
    seen = [f.id for f in page]  # auto-paging iterates every page
    assert seen.index(ids[0]) < seen.index(ids[1]) < seen.index(ids[2])
    assert len(seen) == len(set(seen))
    first = client.files.list(limit=1)
    assert first.has_more is True and first.data[0].id == ids[-1]


def test_bad_jsonl_lines_are_reported_with_numbers(client):
    data = jsonl(CHAT) + b"{not json\n" + jsonl([{"messages": [{"role": "user", "content": "no answer"}]}])
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, data, name="bad.jsonl")
    err = e.value
    assert err.code == "invalid_file_format" and err.param == "file"
    assert "line 3" in err.message and "invalid_json" in err.message
    assert "line 4" in err.message and "example_missing_assistant_message" in err.message
    kept = [f for f in client.files.list() if f.filename == "bad.jsonl"]
    assert kept and kept[0].status == "error" and "line 3" in kept[0].status_details


def test_csv_and_tsv_with_header(client):
    f = upload(client, b"text,label\ngood,pos\nbad,neg\n", name="s.csv")
    assert f.status == "processed" and f.format == "text_label" and f.example_count == 2
    f = upload(client, b"prompt\tcompletion\nQ\tA\n", name="s.tsv")
    assert f.format == "prompt_completion"
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, b"foo,bar\n1,2\n", name="x.csv")
    assert "csv_missing_column" in e.value.message


def test_oversized_upload_is_413(client):
    with pytest.raises(openai.APIStatusError) as e:
        upload(client, b"x" * (MAX_UPLOAD + 10_000), name="big.jsonl")
    assert e.value.status_code == 413
    assert e.value.code == "payload_too_large"


def test_create_job_resolves_and_echoes_extensions(client):
    f = upload(client)
    job = client.fine_tuning.jobs.create(
        model="gpt2",
        training_file=f.id,
        suffix="demo",
        seed=7,
        metadata={"team": "ml"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": "auto", "lora_r": 4}}},
        extra_body={"warmup_ratio": 0.1, "lr_scheduler": "cosine", "max_seq_length": 32, "eval_interval": 3},
    )
    assert job.id.startswith("ftjob-") and job.object == "fine_tuning.job"
    assert job.status == "queued"
    assert job.hyperparameters.n_epochs == 2 and job.hyperparameters.batch_size == 8
    assert job.hyperparameters.learning_rate_multiplier == 1.0
    hp = job.method.supervised.hyperparameters.model_dump()
    assert hp["lora_r"] == 4 and hp["warmup_ratio"] == 0.1 and hp["lr_scheduler"] == "cosine"
    assert hp["max_seq_length"] == 32 and hp["eval_interval"] == 3 and hp["training_type"] == "lora"
    assert job.seed == 7 and job.metadata == {"team": "ml"} and job.user_provided_suffix == "demo"
    assert job.training_file == f.id and job.validation_file is None
    assert job.error is None and job.fine_tuned_model is None and job.finished_at is None
    assert job.result_files == [] and job.trained_tokens is None
    assert job.model_extra["task"] == "causal_lm"
    done = wait_validated(client, job.id)
    assert done.status == "queued"


def test_validation_failure_is_reported_on_the_job(client):
    f = upload(client)
    job = client.fine_tuning.jobs.create(model="not-registered", training_file=f.id)
    done = wait_validated(client, job.id)
    assert done.status == "failed"
    assert done.error.code == "model_not_found" and done.error.param == "model"
    assert "gpt2" in done.error.message
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id)]
    assert any("not registered" in m for m in events)


def test_dataset_url_instead_of_training_file(client):
    job = client.fine_tuning.jobs.create(
        model="gpt2", training_file=None, extra_body={"dataset_url": "https://example.com/train.jsonl"}
    )
    assert job.training_file is None and job.model_extra["dataset_url"] == "https://example.com/train.jsonl"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="gpt2", training_file=None, extra_body={"dataset_url": "file:///etc/passwd"})
    assert e.value.param == "dataset_url"


def test_jobs_list_pages_through_more_than_one_page(client):
    f = upload(client)
    created = [client.fine_tuning.jobs.create(model="gpt2", training_file=f.id, metadata={"batch": "paging"}).id for _ in range(5)]
    first = client.fine_tuning.jobs.list(limit=2, metadata={"batch": "paging"})
    assert len(first.data) == 2 and first.has_more is True
    seen = [j.id for j in client.fine_tuning.jobs.list(limit=2, metadata={"batch": "paging"})]
    assert seen == list(reversed(created))


def test_cancel_pause_resume_and_conflict(client):
    f = upload(client)
    job = client.fine_tuning.jobs.create(model="gpt2", training_file=f.id)
    assert wait_validated(client, job.id).status == "queued"
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    assert client.fine_tuning.jobs.resume(job.id).status == "queued"
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    start = time.time()
    with pytest.raises(openai.ConflictError) as e:
        client.fine_tuning.jobs.cancel(job.id)
    assert time.time() - start < 0.4, "the SDK retried a 409 (x-should-retry: false missing)"
    assert e.value.status_code == 409
    with pytest.raises(openai.ConflictError):
        client.fine_tuning.jobs.resume(job.id)
    messages = [ev.message for ev in client.fine_tuning.jobs.list_events(job.id, limit=2)]
    assert len(messages) >= 2
    all_events = list(client.fine_tuning.jobs.list_events(job.id, limit=2))
    assert [e.message for e in all_events][0] == "Job cancelled"
    assert all_events[-1].message.startswith("Created fine-tuning job")
    assert len({e.id for e in all_events}) == len(all_events) >= 5


def test_checkpoints_list_of_a_new_job_is_empty(client):
    f = upload(client)
    job = client.fine_tuning.jobs.create(model="gpt2", training_file=f.id)
    page = client.fine_tuning.jobs.checkpoints.list(job.id)
    assert page.data == [] and page.has_more is False
    assert page.first_id is None and page.last_id is None


def test_idempotency_key_returns_the_same_job(client):
    f = upload(client)
    a = client.fine_tuning.jobs.create(model="gpt2", training_file=f.id, extra_headers={"Idempotency-Key": "py-1"})
    b = client.fine_tuning.jobs.create(model="gpt2", training_file=f.id, extra_headers={"Idempotency-Key": "py-1"})
    assert a.id == b.id


def test_tenant_isolation(client, other_client):
    f = upload(client)
    job = client.fine_tuning.jobs.create(model="gpt2", training_file=f.id)
    with pytest.raises(openai.NotFoundError):
        other_client.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        other_client.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        other_client.fine_tuning.jobs.list_events(job.id)
    with pytest.raises(openai.NotFoundError):
        other_client.fine_tuning.jobs.checkpoints.list(job.id)
    with pytest.raises(openai.NotFoundError):
        other_client.files.retrieve(f.id)
    with pytest.raises(openai.BadRequestError) as e:
        other_client.fine_tuning.jobs.create(model="gpt2", training_file=f.id)
    assert e.value.param == "training_file"
    assert job.id not in [j.id for j in other_client.fine_tuning.jobs.list()]


def test_error_classes(server, client, spec_checker):
    bad = openai.OpenAI(base_url=server["base"] + "/v1", api_key="tuna-sk-wrong",
                        http_client=httpx.Client(event_hooks={"response": [lambda r: (r.read(), spec_checker.check(r))]}))
    with pytest.raises(openai.AuthenticationError):
        bad.fine_tuning.jobs.list()
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    f = upload(client)
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="gpt2", training_file=f.id, extra_body={"nepochs": 3})
    assert e.value.param == "nepochs" and e.value.type == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="gpt2", training_file=f.id, hyperparameters={"n_epochs": "lots"})
    assert e.value.param == "hyperparameters.n_epochs"
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="gpt2", training_file=f.id, extra_body={"lora_r": "big"})
    assert e.value.param == "lora_r"


def test_malformed_bodies_unknown_routes_and_methods(raw):
    r = raw.post("/v1/fine_tuning/jobs", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert r.headers["x-request-id"]
    r = raw.get("/v1/fine-tuning/jobs")
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"
    r = raw.delete("/v1/fine_tuning/jobs")
    assert r.status_code == 405
    r = raw.post("/v1/files", content=b"not multipart", headers={"content-type": "text/plain"})
    assert r.status_code == 400


def test_models_and_operations(client, raw):
    ids = [m.id for m in client.models.list()]
    assert "gpt2" in ids
    m = client.models.retrieve("gpt2")
    assert m.object == "model" and m.owned_by == "tuna" and m.model_extra["architecture"]["family"] == "gpt2"
    assert raw.get("/healthz").json() == {"status": "ok"}
    assert raw.get("/readyz").status_code == 200
    metrics = raw.get("/metrics").text
    assert "tuna_http_requests_total" in metrics and 'tuna_jobs{status="queued"}' in metrics


def parse_sse(text):
    """Server-sent events as (id, event, data) tuples; comments skipped."""
    out = []
    for block in text.split("\n\n"):
        ev_id, event, data = None, "message", []
        for line in block.splitlines():
            if not line or line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "id":
                ev_id = value
            elif key == "event":
                event = value
            elif key == "data":
                data.append(value)
        if data:
            out.append((ev_id, event, json.loads("\n".join(data))))
    return out


def test_event_stream_and_downloads_of_a_job_without_a_model(client, raw, server):
    f = upload(client)
    job = client.fine_tuning.jobs.create(model="gpt2", training_file=f.id)
    wait_validated(client, job.id)
    client.fine_tuning.jobs.cancel(job.id)
    listed = list(reversed([e for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]))
    # A terminal job: every event, oldest first, then `end`.
    r = raw.get(f"/v1/fine_tuning/jobs/{job.id}/events/stream")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert events[-1] == (None, "end", {"status": "cancelled"})
    assert [e[0] for e in events[:-1]] == [e.id for e in listed]
    assert [e[2]["message"] for e in events[:-1]] == [e.message for e in listed]
    resumed = parse_sse(raw.get(f"/v1/fine_tuning/jobs/{job.id}/events/stream",
                                headers={"Last-Event-ID": listed[0].id}).text)
    assert [e[0] for e in resumed[:-1]] == [e.id for e in listed[1:]]
    # No final model: 409 with a clear message; another organisation: 404.
    for path in ("artifacts", "artifacts.tar", "artifacts/config.json"):
        r = raw.get(f"/v1/fine_tuning/jobs/{job.id}/{path}")
        assert r.status_code == 409 and "no final model" in r.json()["error"]["message"], r.text
        other = httpx.get(f"{server['base']}/v1/fine_tuning/jobs/{job.id}/{path}",
                          headers={"Authorization": f"Bearer {server['other_key']}"})
        assert other.status_code == 404
    r = raw.get(f"/v1/fine_tuning/jobs/{job.id}/artifacts/..%2F..%2Fadmin_key")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_path"
