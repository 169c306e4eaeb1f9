#!/usr/bin/env python3
"""Loads checkpoints tuna wrote with transformers / PEFT and computes their logits.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python python/check_export.py CASES.json OUT.safetensors

CASES.json is a list of objects:
  {"name": "...", "kind": "full" | "lora",
   "task": "causal_lm" | "sequence_classification" | "token_classification" | "question_answering",
   "dir": <checkpoint or adapter folder>, "base": <base model folder, for "lora">,
   "base_kwargs": {...extra from_pretrained kwargs for the base, e.g. num_labels/pad_token_id},
   "nf4_base": {"double_quant": bool} (optional, "lora": a QLoRA adapter: after PEFT has loaded
               it over the unquantised base, the base's layer linear weights are rounded through
               bitsandbytes' NF4, block 64, as tuna stored them while training),
   "input_ids": [[...], ...], "attention_mask": [[...], ...]}

OUT.safetensors gets one fp32 tensor per case (its logits, eval mode, CPU; question answering's
start and end logits stacked as [batch, seq, 2]); the script also prints
one JSON line per case with the label names transformers read (`id2label`) and the logits' shape.
Used by crates/train/tests/train/export.rs; any load error (missing/unexpected keys included, in the
full checkpoint or the adapter) fails.
"""

import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import (AutoModelForCausalLM, AutoModelForQuestionAnswering,
                          AutoModelForSequenceClassification, AutoModelForTokenClassification)


def model_class(task):
    return {
        "causal_lm": AutoModelForCausalLM,
        "token_classification": AutoModelForTokenClassification,
        "question_answering": AutoModelForQuestionAnswering,
    }.get(task, AutoModelForSequenceClassification)


def round_through_nf4(model, double_quant):
    """Replaces every linear weight inside the layers (2-D, not an adapter's; GPT-2's Conv1D as
    [out, in]) by its bitsandbytes
    NF4 round trip, block 64: the base a QLoRA job trained over. The codes and absmaxes are
    bitsandbytes' (`quantize_4bit`); the weights are rebuilt from them as the format defines
    (level x absmax; double quantisation: absmax = 8-bit code x its block's scale + offset),
    since bitsandbytes 0.50.2's CPU `dequantize_4bit` scales some blocks by another block's
    absmax (a [64, 48] weight is off by up to 0.03 where the codes give 0.008). The 8-bit
    absmax codes are those of bitsandbytes' reference `quantize_blockwise` (the nearest map
    value, over bitsandbytes' own offset and scales), which tuna's equal; its CPU kernel's
    approximate search picks a neighbour for 0.1-0.2% of blocks (check_nf4.py)."""
    import bitsandbytes.functional as F
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for name, p in model.named_parameters():
            in_layer = any(part in name for part in (".layers.", ".layer.", ".h."))
            if not in_layer or p.dim() != 2 or "lora_" in name:
                continue
            # GPT-2's Conv1D weight is [in, out]: transformers transposes it for bitsandbytes.
            conv1d = isinstance(model.get_submodule(name.rsplit(".", 1)[0]), Conv1D)
            w = (p.data.float().T if conv1d else p.data.float()).contiguous()
            q, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
            packed = q.reshape(-1)
            codes = torch.stack([(packed >> 4) & 15, packed & 15], 1).reshape(-1).long()
            absmax = state.absmax
            if double_quant:
                _, plain = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=False)
                s2, code8 = state.state2, state.state2.code
                idx = torch.arange(plain.absmax.numel()) // s2.blocksize
                scaled = ((plain.absmax - state.offset) / s2.absmax[idx]).clamp(-1, 1)
                nearest = torch.bucketize(scaled, (code8[:-1] + code8[1:]) / 2)
                absmax = code8[nearest] * s2.absmax[idx] + state.offset
            levels = state.code[codes] * absmax.float().repeat_interleave(64)[: codes.numel()]
            rebuilt = levels[: w.numel()].reshape(w.shape)
            p.copy_(rebuilt.T if conv1d else rebuilt)


def main():
    cases_path, out_path = sys.argv[1], sys.argv[2]
    with open(cases_path) as f:
        cases = json.load(f)
    outputs = {}
    for case in cases:
        cls = model_class(case["task"])
        if case["kind"] == "full":
            model, info = cls.from_pretrained(case["dir"], dtype=torch.float32, output_loading_info=True)
            bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
            if bad:
                sys.exit(f"{case['name']}: transformers reports {bad}")
        else:
            from peft import PeftModel, get_peft_model_state_dict

            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import load_file

            base = cls.from_pretrained(case["base"], dtype=torch.float32, **case.get("base_kwargs", {}))
            model = PeftModel.from_pretrained(base, case["dir"])
            # The adapter holds exactly what PEFT saves for its config: no key missing or unexpected.
            saved = set(load_file(f"{case['dir']}/adapter_model.safetensors"))
            expected = set(get_peft_model_state_dict(model))
            if saved != expected:
                sys.exit(f"{case['name']}: adapter keys missing {sorted(expected - saved)}, "
                         f"unexpected {sorted(saved - expected)}")
            if case.get("nf4_base") is not None:
                round_through_nf4(model, case["nf4_base"]["double_quant"])
        model.eval()
        ids = torch.tensor(case["input_ids"], dtype=torch.long)
        mask = torch.tensor(case["attention_mask"], dtype=torch.long)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask)
            # Question answering: [batch, seq, 2], the start and end logits side by side.
            logits = out.logits if case["task"] != "question_answering" else \
                torch.stack([out.start_logits, out.end_logits], -1)
            logits = logits.float().contiguous()
        outputs[case["name"]] = logits
        config = model.config if case["kind"] == "full" else model.base_model.model.config
        id2label = {str(k): v for k, v in (config.id2label or {}).items()} if case["task"] != "causal_lm" else None
        print(json.dumps({"name": case["name"], "id2label": id2label, "shape": list(logits.shape),
                          "architectures": getattr(config, "architectures", None)}))
    save_file(outputs, out_path)


if __name__ == "__main__":
    main()
