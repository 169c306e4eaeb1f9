#!/usr/bin/env python3
"""Runs a token-classification model tuna trained the way its users will: transformers'
tokenizer on pre-split words (`is_split_into_words=True`), AutoModelForTokenClassification, each
word's tag read at its first sub-token, and seqeval's scores of those tags.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python python/check_tokens.py CASE.json

CASE.json: {"dir": <final model folder>, "max_length": N,
            "rows": [{"tokens": [...], "tags": [...]}, ...]}

Prints one JSON object: the config's `architectures`, `id2label`; per row the tokenizer's
`input_ids`, `word_ids` and `token_type_ids`, the model's fp32 `logits` (eval mode, CPU) and the
predicted tag of every word the encoding kept (`pred`, the truth cut to the same words in
`truth`); and seqeval's `precision`, `recall`, `f1` (micro, default mode) and `accuracy` over
all rows. Any missing or unexpected key when loading fails. Used by
crates/train/tests/train/tokens.rs.
"""

import json
import sys

import torch
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score
from transformers import AutoModelForTokenClassification

from hf_load import load_exactly


def main():
    with open(sys.argv[1]) as f:
        case = json.load(f)
    model, tok = load_exactly(AutoModelForTokenClassification, case["dir"])
    id2label = model.config.id2label
    out = {
        "architectures": model.config.architectures,
        "id2label": {str(k): v for k, v in id2label.items()},
        "input_ids": [], "word_ids": [], "token_type_ids": [], "logits": [], "pred": [], "truth": [],
    }
    for row in case["rows"]:
        enc = tok(row["tokens"], is_split_into_words=True, truncation=True,
                  max_length=case["max_length"], return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits.float()[0]
        word_ids = enc.word_ids(0)
        pred, truth, prev = [], [], None
        for j, w in enumerate(word_ids):
            if w is not None and w != prev:
                pred.append(id2label[int(logits[j].argmax())])
                truth.append(row["tags"][w])
            prev = w
        out["input_ids"].append(enc["input_ids"][0].tolist())
        out["word_ids"].append(word_ids)
        types = enc.get("token_type_ids")
        out["token_type_ids"].append(types[0].tolist() if types is not None else None)
        out["logits"].append(logits.tolist())
        out["pred"].append(pred)
        out["truth"].append(truth)
    y_true, y_pred = out["truth"], out["pred"]
    out["precision"] = precision_score(y_true, y_pred, zero_division=0)
    out["recall"] = recall_score(y_true, y_pred, zero_division=0)
    out["f1"] = f1_score(y_true, y_pred, zero_division=0)
    out["accuracy"] = accuracy_score(y_true, y_pred)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
