"""Preference tuning (DPO) through the API with the official `openai` SDK, checked against TRL.

Each DPO job below trains on a real worker. Its final evaluation (the loss and TRL's
rewards/chosen, rewards/rejected, rewards/accuracies and rewards/margins over the validation
pairs) must equal what TRL's `DPOTrainer.evaluate()` computes on the same pairs, in one batch,
for the downloaded model against the same reference, within 1e-5:

- a full fine-tune of GPT-2 on plain-text pairs (TRL's `prompt`/`chosen`/`rejected` layout, the
  end-of-text token appended), its reference the base;
- the usual SFT-then-DPO recipe: a LoRA SFT job on conversations whose merged weights are the
  base of a LoRA DPO job on OpenAI's pair layout (`input`/`preferred_output`/
  `non_preferred_output`), rendered with the ChatML template. TRL gets the exported adapter
  over the SFT model as the policy and the SFT model as the reference: the adapter switched
  off, which is tuna's reference. (Handed a PeftModel without a reference, TRL would take a copy
  of the trained adapter as the reference, as it does to re-train an existing adapter.)
"""

import io
import json
import math
import tarfile
import time
from pathlib import Path

import httpx2 as httpx
import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = ["cats", "dogs", "birds", "fish", "trees", "rivers", "stars", "boats"]
METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"]


def lines(records):
    return ("\n".join(json.dumps(r) for r in records) + "\n").encode()


def openai_pairs(n, offset=0):
    out = []
    for i in range(offset, offset + n):
        s = SUBJECTS[i % len(SUBJECTS)]
        out.append({
            "input": {"messages": [{"role": "user", "content": f"tell me about {s} ({i})"}]},
            "preferred_output": [{"role": "assistant", "content": f"{s} are wonderful and kind"}],
            "non_preferred_output": [{"role": "assistant", "content": f"{s} are awful and rude"}],
        })
    return out


def text_pairs(n, offset=0):
    return [{"prompt": f"about {s} ({i}):", "chosen": f" {s} are wonderful", "rejected": f" {s} are awful and rude"}
            for i in range(offset, offset + n) for s in [SUBJECTS[i % len(SUBJECTS)]]]


@pytest.fixture(scope="module")
def api(worker_server, tmp_path_factory):
    """The openai client, a plain HTTP client with the key, and qwen2 registered."""
    import openai

    http = httpx.Client(base_url=worker_server["base"], headers={"Authorization": f"Bearer {worker_server['key']}"},
                        timeout=120)
    r = http.post("/v1/models", json={"id": "qwen2-dpo", "path": str(ROOT / ".fixtures" / "qwen2")})
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=worker_server["base"] + "/v1", api_key=worker_server["key"])
    return client, http, tmp_path_factory.mktemp("dpo")


def upload(client, records, name):
    return client.files.create(file=(name, lines(records)), purpose="fine-tune").id


def wait(client, job_id, timeout=420):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            assert job.status == "succeeded", job.error
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} did not finish in {timeout}s")


def last_eval(client, job_id):
    evals = []
    for ev in client.fine_tuning.jobs.list_events(job_id, limit=100):
        data = ev.data or {}
        m = data.get("metrics", data) if isinstance(data, dict) else {}
        if "valid_rewards/margins" in m:
            evals.append((data.get("step", 0), m))
    assert evals, "no DPO evaluation in the job's events"
    return max(evals, key=lambda e: e[0])[1]


def download(http, job_id, dest):
    r = http.get(f"/v1/fine_tuning/jobs/{job_id}/artifacts.tar")
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(dest, filter="data")
    configs = [p.parent for p in Path(dest).rglob("*config.json") if p.name in ("config.json", "adapter_config.json")]
    return min(configs, key=lambda p: len(p.parts))


def trl_eval(model, ref_model, tokenizer_dir, rows, beta, max_length, out):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    args = DPOConfig(output_dir=str(out), beta=beta, max_length=max_length, per_device_eval_batch_size=len(rows),
                     report_to=[], use_cpu=True, bf16=False, fp16=False, disable_dropout=True,
                     dataloader_num_workers=0, dataset_num_proc=None)
    ds = Dataset.from_list(rows)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=ds, eval_dataset=ds,
                         processing_class=tok)
    return trainer.evaluate()


def assert_same(tuna, trl):
    assert abs(tuna["valid_loss"] - trl["eval_loss"]) < 1e-5, (tuna, trl)
    for k in METRICS:
        assert abs(tuna[f"valid_{k}"] - trl[f"eval_{k}"]) < 1e-5, (k, tuna, trl)


def test_full_dpo_on_plain_text_pairs_matches_trl(api):
    client, http, tmp = api
    train, valid = text_pairs(24), text_pairs(8, offset=24)
    job = client.fine_tuning.jobs.create(
        model="gpt2",
        training_file=upload(client, train, "pairs.jsonl"),
        validation_file=upload(client, valid, "valid.jsonl"),
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 8}}},
        extra_body={"learning_rate": 2e-4, "max_seq_length": 32, "precision": "fp32"},
    )
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    job = wait(client, job.id)
    tuna = last_eval(client, job.id)
    # Part way: the loss is well below ln 2 (where the policy is the reference) and above 0.
    assert 0.01 < tuna["valid_loss"] < math.log(2) - 0.1, tuna
    # Each evaluation also shows what the model writes after the first validation prompts
    # (eval_samples, default 3), beside the preferred answers.
    samples = [ev for ev in client.fine_tuning.jobs.list_events(job.id, limit=100)
               if isinstance(ev.data, dict) and "samples" in ev.data]
    assert len(samples) == 2, [ev.message for ev in samples]
    shown = samples[0].data["samples"]
    assert [x["prompt"] for x in shown] == [r["prompt"] for r in valid[:3]], shown
    assert [x["reference"] for x in shown] == [r["chosen"] for r in valid[:3]], shown
    assert samples[0].message.startswith("Step ") and "samples" in samples[0].message

    final = download(http, job.id, tmp / "gpt2-dpo")
    policy = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(ROOT / ".fixtures" / "gpt2", dtype=torch.float32)
    trl = trl_eval(policy, ref, final, valid, 0.2, 32, tmp / "trl-gpt2")
    assert_same(tuna, trl)


def test_sft_then_lora_dpo_on_openai_pairs_matches_trl_against_the_sft_model(api):
    client, http, tmp = api
    chats = [{"messages": [{"role": "user", "content": f"tell me about {s}"},
                           {"role": "assistant", "content": f"{s} are here"}]} for s in SUBJECTS * 2]
    sft = client.fine_tuning.jobs.create(
        model="qwen2-dpo", training_file=upload(client, chats, "chats.jsonl"),
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}},
        extra_body={"training_type": "lora", "lora_r": 8, "merge_lora": True, "learning_rate": 1e-3,
                    "precision": "fp32", "validation_split": 0},
    )
    sft = wait(client, sft.id)
    assert sft.fine_tuned_model

    train, valid = openai_pairs(24), openai_pairs(8, offset=24)
    job = client.fine_tuning.jobs.create(
        model=sft.fine_tuned_model,
        training_file=upload(client, train, "pairs.jsonl"),
        validation_file=upload(client, valid, "valid.jsonl"),
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 2, "batch_size": 8}}},
        extra_body={"training_type": "lora", "lora_r": 8, "lora_dropout": 0.1, "learning_rate": 5e-3,
                    "max_seq_length": 48, "precision": "fp32"},
    )
    # beta defaults to 0.1, as OpenAI's and TRL's.
    assert job.method.dpo.hyperparameters.beta == 0.1
    job = wait(client, job.id)
    tuna = last_eval(client, job.id)
    assert tuna["valid_rewards/accuracies"] == 1.0 and tuna["valid_rewards/margins"] > 0, tuna

    sft_dir = download(http, sft.id, tmp / "sft")
    merged = sft_dir / "merged" if (sft_dir / "merged" / "config.json").exists() else sft_dir
    adapter = download(http, job.id, tmp / "dpo-lora")
    assert (adapter / "adapter_config.json").exists(), sorted(p.name for p in adapter.iterdir())
    base = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, adapter, is_trainable=True)
    rows = [{"prompt": r["input"]["messages"], "chosen": r["preferred_output"], "rejected": r["non_preferred_output"]}
            for r in valid]
    ref = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    trl = trl_eval(policy, ref, merged, rows, 0.1, 48, tmp / "trl-qwen2")
    assert_same(tuna, trl)
