#!/usr/bin/env python3
"""Runs an extractive question-answering model tuna trained the way transformers' own
question-answering example does (transformers 5 has no question-answering pipeline):
`AutoModelForQuestionAnswering`, the tokenizer's overflowing windows
(`truncation="only_second"`, `stride`, offsets), the example's post-processing
(`examples/pytorch/question-answering/utils_qa.py: postprocess_qa_predictions`, n_best_size 20,
max_answer_length 30) and SQuAD's official scoring (its v2 script's normalisation, exact match
and F1).

Usage: HF_HUB_OFFLINE=1 .venv/bin/python python/check_qa.py CASE.json

CASE.json: {"dir": <final model folder>, "max_length": N, "doc_stride": S,
            "with_negative": bool (SQuAD v2: the empty answer may win),
            "rows": [{"question", "context", "answers": {"text": [...], "answer_start": [...]}}]}

Prints one JSON object: per row its windows' `input_ids` and the predicted answer
(`predictions`); and `exact_match` and `f1` over all rows, as fractions. Any missing or
unexpected key when loading fails. Used by crates/train/tests/train/qa.rs.
"""

import collections
import json
import re
import string
import sys

import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering

from hf_load import load_exactly


def postprocess(windows, context, with_negative, n_best_size=20, max_answer_length=30):
    """utils_qa.postprocess_qa_predictions for one example: `windows` holds each window's
    (start_logits, end_logits, offset_mapping with None outside the context)."""
    min_null_prediction = None
    prelim_predictions = []
    for start_logits, end_logits, offset_mapping in windows:
        feature_null_score = start_logits[0] + end_logits[0]
        if min_null_prediction is None or min_null_prediction["score"] > feature_null_score:
            min_null_prediction = {"offsets": (0, 0), "score": feature_null_score,
                                   "start_logit": start_logits[0], "end_logit": end_logits[0]}
        start_indexes = np.argsort(start_logits)[-1: -n_best_size - 1: -1].tolist()
        end_indexes = np.argsort(end_logits)[-1: -n_best_size - 1: -1].tolist()
        for start_index in start_indexes:
            for end_index in end_indexes:
                if (start_index >= len(offset_mapping) or end_index >= len(offset_mapping)
                        or offset_mapping[start_index] is None or len(offset_mapping[start_index]) < 2
                        or offset_mapping[end_index] is None or len(offset_mapping[end_index]) < 2):
                    continue
                if end_index < start_index or end_index - start_index + 1 > max_answer_length:
                    continue
                prelim_predictions.append({
                    "offsets": (offset_mapping[start_index][0], offset_mapping[end_index][1]),
                    "score": start_logits[start_index] + end_logits[end_index],
                    "start_logit": start_logits[start_index], "end_logit": end_logits[end_index]})
    if with_negative and min_null_prediction is not None:
        prelim_predictions.append(min_null_prediction)
        null_score = min_null_prediction["score"]
    predictions = sorted(prelim_predictions, key=lambda x: x["score"], reverse=True)[:n_best_size]
    if with_negative and min_null_prediction is not None and not any(p["offsets"] == (0, 0) for p in predictions):
        predictions.append(min_null_prediction)
    for pred in predictions:
        pred["text"] = context[pred["offsets"][0]: pred["offsets"][1]]
    if len(predictions) == 0 or (len(predictions) == 1 and predictions[0]["text"] == ""):
        predictions.insert(0, {"text": "empty", "start_logit": 0.0, "end_logit": 0.0, "score": 0.0})
    if not with_negative:
        return predictions[0]["text"]
    i = 0
    while predictions[i]["text"] == "":
        i += 1
    best = predictions[i]
    score_diff = null_score - best["start_logit"] - best["end_logit"]
    return "" if score_diff > 0.0 else best["text"]


# SQuAD v2's official evaluation script (evaluate-v2.0.py).
def normalize_answer(s):
    def remove_articles(text):
        return re.sub(r"\b(a|an|the)\b", " ", text, flags=re.UNICODE)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def compute_exact(a_gold, a_pred):
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def compute_f1(a_gold, a_pred):
    gold_toks = normalize_answer(a_gold).split()
    pred_toks = normalize_answer(a_pred).split()
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def main():
    with open(sys.argv[1]) as f:
        case = json.load(f)
    model, tok = load_exactly(AutoModelForQuestionAnswering, case["dir"])
    out = {"input_ids": [], "predictions": []}
    exact, f1 = [], []
    for row in case["rows"]:
        enc = tok(row["question"], row["context"], truncation="only_second", max_length=case["max_length"],
                  stride=case["doc_stride"], return_overflowing_tokens=True, return_offsets_mapping=True)
        windows, ids = [], []
        for k in range(len(enc["input_ids"])):
            seq = enc.sequence_ids(k)
            offsets = [o if seq[j] == 1 else None for j, o in enumerate(enc["offset_mapping"][k])]
            inputs = {key: torch.tensor([enc[key][k]]) for key in ("input_ids", "attention_mask", "token_type_ids")
                      if key in enc}
            with torch.no_grad():
                r = model(**inputs)
            windows.append((r.start_logits[0].float().numpy(), r.end_logits[0].float().numpy(), offsets))
            ids.append(enc["input_ids"][k])
        pred = postprocess(windows, row["context"], case["with_negative"])
        golds = [t for t in row["answers"]["text"] if normalize_answer(t)] or [""]
        exact.append(max(compute_exact(g, pred) for g in golds))
        f1.append(max(compute_f1(g, pred) for g in golds))
        out["input_ids"].append(ids)
        out["predictions"].append(pred)
    out["exact_match"] = sum(exact) / len(exact)
    out["f1"] = sum(f1) / len(f1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
