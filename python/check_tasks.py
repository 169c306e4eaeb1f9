#!/usr/bin/env python3
"""Runs a sequence-level model tuna trained (classification, regression, multi-label; single
texts or pairs) the way its users will: transformers' tokenizer, AutoModelForSequenceClassification
and the text-classification pipeline.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python python/check_tasks.py CASE.json

CASE.json: {"dir": <final model folder>, "max_length": N,
            "rows": [{"text": "...", "text_pair": "..." (optional)}, ...]}

Prints one JSON object: the config's `problem_type`, `num_labels` and `id2label`; per row the
tokenizer's `input_ids` and `token_type_ids` (`tokenizer(text, text_pair, truncation=True,
max_length=N)`), the model's fp32 `logits` (eval mode, CPU), and the pipeline's scores for every
label (`top_k=None`: softmax, sigmoid or the raw number, as the pipeline picks from
`problem_type`). Any missing or unexpected key when loading fails. Used by
crates/train/tests/train/tasks.rs.
"""

import json
import sys

import torch
from transformers import AutoModelForSequenceClassification, pipeline

from hf_load import load_exactly


def main():
    with open(sys.argv[1]) as f:
        case = json.load(f)
    model, tok = load_exactly(AutoModelForSequenceClassification, case["dir"])
    out = {
        "problem_type": model.config.problem_type,
        "num_labels": model.config.num_labels,
        "id2label": {str(k): v for k, v in model.config.id2label.items()},
        "input_ids": [],
        "token_type_ids": [],
        "logits": [],
    }
    for row in case["rows"]:
        enc = tok(row["text"], row.get("text_pair"), truncation=True, max_length=case["max_length"],
                  return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits.float()[0]
        out["input_ids"].append(enc["input_ids"][0].tolist())
        types = enc.get("token_type_ids")
        out["token_type_ids"].append(types[0].tolist() if types is not None else None)
        out["logits"].append(logits.tolist())
    pipe = pipeline("text-classification", model=model, tokenizer=tok, device="cpu")
    inputs = [{"text": r["text"], "text_pair": r["text_pair"]} if r.get("text_pair") else r["text"]
              for r in case["rows"]]
    scores = pipe(inputs, top_k=None, truncation=True, max_length=case["max_length"])
    out["pipeline"] = [{s["label"]: s["score"] for s in row} for row in scores]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
