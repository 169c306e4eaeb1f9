"""Tiny random checkpoints of the decoder families added after the Llama family, for tuna's Rust
tests; `make_fixtures.py` calls `write_decoder_fixtures(root)`. Each folder is as `decoder_fixture`
writes it (checkpoint, tokenizer, `reference.safetensors` with the logits transformers computes
for a batch with a right-padded row), plus `facts.json`: what transformers says of the model
(`num_parameters()`, the short names of the linear modules of its base model, which are
PEFT's target names, and how far its bf16 logits land from its fp32 ones).

Fixtures (each with something odd for its family):
- qwen3:         Qwen3ForCausalLM, GQA, tied head, q/k norms, transformers 5 keys.
- qwen3-sliding: Qwen3ForCausalLM, 6 heads of 12 over a width of 64 (head_dim is its own key),
                 untied, a sliding window (6) on the layers from max_window_layers on, OLD keys
                 (no `layer_types`, `rope_theta`/`rope_scaling` with linear scaling).
- gemma2:        Gemma2ForCausalLM, GQA, sliding/global layers with a window (6) shorter than the
                 reference, small soft-caps (so both caps bite), query_pre_attn_scalar != head_dim,
                 OLD keys (`sliding_window_pattern`-less alternation, `hidden_act` beside
                 `hidden_activation`, `torch_dtype`).
- gemma3:        Gemma3ForCausalLM (gemma3_text), 3 heads of 16 over 1 KV head, width 48, untied, sliding window (6),
                 every other layer global, local and global RoPE bases with linear scaling on the
                 global one, final soft-cap, transformers 5 keys (`rope_parameters` per layer type).
- phi3:          Phi3ForCausalLM, fused qkv/gate_up, sliding window (6) on every layer, residual
                 dropout, OLD keys.
- phi3-longrope: Phi3ForCausalLM, GQA, tied, LongRoPE with the reference (12) beyond
                 original_max_position_embeddings (8), rotary on half of each head.
- olmo2:         Olmo2ForCausalLM, GQA, attention bias, norms after each block, q/k norms.

The sliding windows are 6 (of the reference's 12 tokens): with the padded row's 7 real tokens, a
narrower window would leave its last padding query with only padding keys, where implementations
part ways (transformers' SDPA path gives zeros, its eager path attends to every key, tuna to the
query's own position); no loss is ever read there.
"""

import json
import os
import shutil

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from make_fixtures import byte_level_bpe, decoder_fixture, write_reference

NAMES = ("qwen3", "qwen3-sliding", "gemma2", "gemma3", "phi3", "phi3-longrope", "olmo2")


def write_facts(out, model):
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.model.named_modules() if isinstance(m, nn.Linear)})
    # How far transformers' own bf16 forward lands from its fp32 logits (the yardstick for tuna's).
    ref = load_file(os.path.join(out, "reference.safetensors"))
    attn = "sdpa" if model._supports_sdpa else "eager"
    bf16 = type(model).from_pretrained(out, dtype=torch.bfloat16, attn_implementation=attn).eval()
    with torch.no_grad():
        logits = bf16(input_ids=ref["input_ids"], attention_mask=ref["attention_mask"]).logits.float()
    facts = {"num_parameters": model.num_parameters(), "linear_modules": linear,
             "bf16_logits_max_diff": (logits - ref["logits"]).abs().max().item()}
    with open(os.path.join(out, "facts.json"), "w") as f:
        json.dump(facts, f, indent=2)


def rewrite_config(out, cls, edit):
    """Edits config.json into an older spelling and checks transformers reads it as before: the
    reference logits are computed again from the edited folder and must not move."""
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    before = load_file(os.path.join(out, "reference.safetensors"))
    inputs = {k: before[k] for k in ("input_ids", "attention_mask")}
    after = write_reference(out, cls, inputs).logits
    assert torch.allclose(after, before["logits"], atol=1e-6), f"{out}: the older keys read differently"


def write_decoder_fixtures(root):
    for sub in NAMES:
        shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok = byte_level_bpe(420, specials, bos="<s>")
    sp = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    small = dict(hidden_size=64, intermediate_size=96, max_position_embeddings=64, **ids)

    def fixture(name, cfg_cls, model_cls, kwargs, seed, **kw):
        model = decoder_fixture(root, name, cfg_cls, model_cls, tok, sp, dict(small, **kwargs), seed, **kw)
        write_facts(os.path.join(root, name), model)
        return os.path.join(root, name)

    fixture("qwen3", Qwen3Config, Qwen3ForCausalLM,
            dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
            seed=21)
    out = fixture("qwen3-sliding", Qwen3Config, Qwen3ForCausalLM,
                  dict(num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2, head_dim=12,
                       tie_word_embeddings=False, use_sliding_window=True, sliding_window=6, max_window_layers=1,
                       rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
                  seed=22, old_keys=True)
    rewrite_config(out, Qwen3ForCausalLM, lambda c: c.pop("layer_types"))

    out = fixture("gemma2", Gemma2Config, Gemma2ForCausalLM,
                  dict(num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       query_pre_attn_scalar=24, sliding_window=6, attn_logit_softcapping=5.0,
                       final_logit_softcapping=3.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
                  seed=23, old_keys=True)
    rewrite_config(out, Gemma2ForCausalLM,
                   lambda c: (c.pop("layer_types"), c.update(hidden_act="gelu_pytorch_tanh")))

    fixture("gemma3", Gemma3TextConfig, Gemma3ForCausalLM,
            dict(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1, head_dim=16,
                 query_pre_attn_scalar=16, sliding_window=6, tie_word_embeddings=False,
                 final_logit_softcapping=4.0,
                 layer_types=["sliding_attention", "full_attention"] * 2,
                 rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                  "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}}),
            seed=24)

    fixture("phi3", Phi3Config, Phi3ForCausalLM,
            dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, sliding_window=6,
                 resid_pdrop=0.1, tie_word_embeddings=False, original_max_position_embeddings=64,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
            seed=25, old_keys=True)
    fixture("phi3-longrope", Phi3Config, Phi3ForCausalLM,
            dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 original_max_position_embeddings=8,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                                  "short_factor": [1.0, 1.1, 1.3, 1.6], "long_factor": [1.5, 2.0, 3.0, 5.0],
                                  "original_max_position_embeddings": 8}),
            seed=26)

    fixture("olmo2", Olmo2Config, Olmo2ForCausalLM,
            dict(num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                 rms_norm_eps=1e-6, tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
            seed=27)
