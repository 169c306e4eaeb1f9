#!/usr/bin/env python3
"""Greedy generation with transformers' `generate`, the reference for tuna's KV-cache decoding.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python python/check_generate.py CASE.json

CASE.json: {"dir": <model folder>, "prompts": [[token ids], ...], "max_new_tokens": N,
            "pad_id": P, "eos": [token ids], "adapter": <optional PEFT adapter folder>}

With `adapter`, the model is PEFT's PeftModel of the adapter over `dir`.

Prints {"batched": [...], "single": [...]}: per prompt the new tokens of greedy `generate`
(fp32, CPU), all prompts in one batch padded on the left with `pad_id` (`batched`) and each
alone (`single`), each cut before its first token of `eos` (where tuna stops). Used by
crates/train/tests/train/generate.rs.
"""

import json
import sys

import torch
from transformers import AutoModelForCausalLM

from hf_load import load_exactly


def cut(tokens, eos):
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[:i]
    return tokens


def main():
    with open(sys.argv[1]) as f:
        case = json.load(f)
    torch.set_num_threads(2)
    model, _ = load_exactly(AutoModelForCausalLM, case["dir"])
    if case.get("adapter"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, case["adapter"])
        model.eval()
    n, pad, eos = case["max_new_tokens"], case["pad_id"], set(case["eos"])
    prompts = case["prompts"]
    kwargs = dict(max_new_tokens=n, do_sample=False, pad_token_id=pad, eos_token_id=sorted(eos) or None)

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    batched = [cut(row[width:].tolist(), eos) for row in out]
    single = []
    for p in prompts:
        with torch.no_grad():
            o = model.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                               **kwargs)
        single.append(cut(o[0, len(p):].tolist(), eos))
    print(json.dumps({"batched": batched, "single": single}))


if __name__ == "__main__":
    main()
