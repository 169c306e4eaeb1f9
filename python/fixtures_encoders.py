"""Tiny RANDOM encoder checkpoints beyond BERT for tuna's Rust tests (called by make_fixtures.py).

Each ROOT/<name> is a folder as `save_pretrained` writes it plus `reference.safetensors` with fixed
`input_ids` [2, T] (second row right-padded), `attention_mask` (and `token_type_ids` where the
model reads them), what transformers computes for them (fp32, CPU, eval mode, from the model as
it reloads it from disk): `last_hidden_state` of the base model, `logits` for the fixtures saved
with a classification head, and `num_parameters`: the base model's parameter count inside
`AutoModelForSequenceClassification` (the number `GET /v1/models/{id}` shows).

Fixtures (one in the form the published checkpoints have, one odd configuration per family):
- roberta:          RobertaForMaskedLM (tied lm_head), byte-level BPE, <pad> = 1.
- xlm-roberta:      XLMRobertaForSequenceClassification, 3 labels, 3 heads of 16, SentencePiece-style
                    Unigram tokenizer, old `torch_dtype` key.
- distilbert:       DistilBertForMaskedLM, WordPiece.
- distilbert-odd:   DistilBertForSequenceClassification, sinusoidal positions, 3 heads, ReLU.
- deberta-v3:       DebertaV2ForMaskedLM as v3 configs are published: relative attention with log
                    buckets (8, below the reference length), shared keys, p2c|c2p as a string,
                    LayerNorm'd relative embeddings, no absolute positions.
- deberta-odd:      DebertaV2ForSequenceClassification: separate position projections, no buckets,
                    max_relative_positions 5 (clipped), absolute positions, token types, v2's
                    convolution, 3 heads.
- modernbert:       ModernBertForMaskedLM, transformers 5 keys (layer_types, rope_parameters),
                    local window 8 (below the reference length), mean pooling.
- modernbert-odd:   ModernBertForSequenceClassification, the older keys
                    (global_attn_every_n_layers, global/local_rope_theta), local window 4, 3 heads,
                    every bias on, cls pooling.
"""

import json
import os
import shutil

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForSequenceClassification,
    DebertaV2Config,
    DebertaV2ForMaskedLM,
    DebertaV2ForSequenceClassification,
    DistilBertConfig,
    DistilBertForMaskedLM,
    DistilBertForSequenceClassification,
    ModernBertConfig,
    ModernBertForMaskedLM,
    ModernBertForSequenceClassification,
    RobertaConfig,
    RobertaForMaskedLM,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

import make_fixtures as mf

NAMES = ["roberta", "xlm-roberta", "distilbert", "distilbert-odd", "deberta-v3", "deberta-odd", "modernbert", "modernbert-odd"]


def unigram(vocab_size, specials, unk, cls, sep):
    """A SentencePiece-style Unigram tokenizer (XLM-R, DeBERTa-v3) with `cls $A sep`."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk,
                                      show_progress=False)
    tok.train_from_iterator(mf.CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} {sep} $B {sep}",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


def bpe_with_template(vocab_size, specials, cls, sep):
    tok = mf.byte_level_bpe(vocab_size, specials)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
        special_tokens=[(cls, tok.token_to_id(cls)), (sep, tok.token_to_id(sep))])
    return tok


def rewrite_config(out, edit):
    path = os.path.join(out, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    edit(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def write(root, name, model_cls, cfg, tok, specials, seed, *, attn="sdpa", cls_token=None,
          token_types=False, keep=(), edit_config=None):
    """Saves a randomised `model_cls(cfg)` with its tokenizer as ROOT/name and its reference."""
    out = os.path.join(root, name)
    torch.manual_seed(seed)
    model = model_cls(cfg)
    kept = {k: v.detach().clone() for k, v in model.named_parameters() if any(s in k for s in keep)}
    mf.randomize(model, seed)
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in kept:
                v.copy_(kept[k])
    model.save_pretrained(out)
    mf.save_tokenizer(tok, out, **specials)
    if edit_config is not None:
        rewrite_config(out, edit_config)
    pad_id = tok.token_to_id(specials["pad_token"])
    first = tok.token_to_id(cls_token) if cls_token else None
    inputs = mf.reference_inputs(cfg.vocab_size, pad_id, first, seed, bert=token_types)
    reloaded = model_cls.from_pretrained(out, dtype=torch.float32, attn_implementation=attn).eval()
    with torch.no_grad():
        hidden = reloaded.base_model(**inputs).last_hidden_state
        model.set_attn_implementation(attn)
        direct = model.eval().base_model(**inputs).last_hidden_state
        tensors = {k: v.contiguous() for k, v in inputs.items()}
        tensors["last_hidden_state"] = hidden.float().contiguous()
        if "SequenceClassification" in model_cls.__name__:
            tensors["logits"] = reloaded(**inputs).logits.float().contiguous()
    assert torch.allclose(direct, hidden, atol=1e-5), f"{name}: reloaded model differs"
    counted = AutoModelForSequenceClassification.from_pretrained(out)
    tensors["num_parameters"] = torch.tensor([counted.base_model.num_parameters()])
    save_file(tensors, os.path.join(out, "reference.safetensors"), metadata={"format": "pt"})


def write_encoder_fixtures(root):
    for sub in NAMES:
        shutil.rmtree(os.path.join(root, sub), ignore_errors=True)

    # RoBERTa: <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4, byte-level BPE, `<s> $A </s>`.
    rspecials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    rtok = mf.byte_level_bpe(400, rspecials)
    rtok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), trim_offsets=False)
    rsp = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
           "cls_token": "<s>", "sep_token": "</s>", "mask_token": "<mask>"}
    write(root, "roberta", RobertaForMaskedLM,
          RobertaConfig(vocab_size=rtok.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128, max_position_embeddings=40,
                        type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                        eos_token_id=2),
          rtok, rsp, seed=21, cls_token="<s>")
    xtok = unigram(300, rspecials, "<unk>", "<s>", "</s>")
    write(root, "xlm-roberta", XLMRobertaForSequenceClassification,
          XLMRobertaConfig(vocab_size=xtok.get_vocab_size(), hidden_size=48, num_hidden_layers=2,
                           num_attention_heads=3, intermediate_size=80, max_position_embeddings=24,
                           type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
                           eos_token_id=2, classifier_dropout=0.3,
                           id2label={0: "negative", 1: "neutral", 2: "positive"}),
          xtok, rsp, seed=22, cls_token="<s>",
          edit_config=lambda c: c.update(torch_dtype=c.pop("dtype"), transformers_version="4.40.0"))

    # DistilBERT: WordPiece, [PAD] = 0.
    wtok = mf.wordpiece(300)
    wsp = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
           "mask_token": "[MASK]"}
    write(root, "distilbert", DistilBertForMaskedLM,
          DistilBertConfig(vocab_size=wtok.get_vocab_size(), dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                           max_position_embeddings=32, pad_token_id=0),
          wtok, wsp, seed=23, cls_token="[CLS]")
    write(root, "distilbert-odd", DistilBertForSequenceClassification,
          DistilBertConfig(vocab_size=wtok.get_vocab_size(), dim=48, n_layers=2, n_heads=3, hidden_dim=96,
                           max_position_embeddings=32, sinusoidal_pos_embds=True, activation="relu",
                           seq_classif_dropout=0.1, pad_token_id=0, id2label={0: "bad", 1: "good"}),
          wtok, wsp, seed=24, cls_token="[CLS]", keep=("position_embeddings",))

    # DeBERTa-v2/v3: [PAD]=0 [CLS]=1 [SEP]=2 [UNK]=3 [MASK]=4, Unigram, `[CLS] $A [SEP]`.
    dspecials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    dtok = unigram(300, dspecials, "[UNK]", "[CLS]", "[SEP]")
    dsp = {"bos_token": "[CLS]", "eos_token": "[SEP]", "unk_token": "[UNK]", "pad_token": "[PAD]",
           "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"}
    write(root, "deberta-v3", DebertaV2ForMaskedLM,
          DebertaV2Config(vocab_size=dtok.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, intermediate_size=128, max_position_embeddings=32,
                          relative_attention=True, position_buckets=8, max_relative_positions=-1,
                          norm_rel_ebd="layer_norm", share_att_key=True, pos_att_type="p2c|c2p",
                          position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7,
                          pad_token_id=0),
          dtok, dsp, seed=25, attn="eager", cls_token="[CLS]",
          edit_config=lambda c: c.update(pos_att_type="p2c|c2p"))
    write(root, "deberta-odd", DebertaV2ForSequenceClassification,
          DebertaV2Config(vocab_size=dtok.get_vocab_size(), hidden_size=48, num_hidden_layers=2,
                          num_attention_heads=3, intermediate_size=96, max_position_embeddings=32,
                          relative_attention=True, max_relative_positions=5, share_att_key=False,
                          pos_att_type=["c2p", "p2c"], position_biased_input=True, type_vocab_size=2,
                          conv_kernel_size=3, conv_act="gelu", layer_norm_eps=1e-7, pad_token_id=0,
                          id2label={0: "a", 1: "b", 2: "c"}),
          dtok, dsp, seed=26, attn="eager", cls_token="[CLS]", token_types=True)

    # ModernBERT: byte-level BPE with BERT-style specials, `[CLS] $A [SEP]`.
    mspecials = ["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"]
    mtok = bpe_with_template(400, mspecials, "[CLS]", "[SEP]")
    msp = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
           "mask_token": "[MASK]"}
    ids = {k: mtok.token_to_id(v) for k, v in
           [("pad_token_id", "[PAD]"), ("cls_token_id", "[CLS]"), ("sep_token_id", "[SEP]"),
            ("bos_token_id", "[CLS]"), ("eos_token_id", "[SEP]")]}
    write(root, "modernbert", ModernBertForMaskedLM,
          ModernBertConfig(vocab_size=mtok.get_vocab_size(), hidden_size=64, num_hidden_layers=3,
                           num_attention_heads=4, intermediate_size=96, max_position_embeddings=64,
                           global_attn_every_n_layers=3, local_attention=8, classifier_pooling="mean",
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 160000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                           **ids),
          mtok, msp, seed=27, attn="eager", cls_token="[CLS]")

    def old_modernbert_keys(c):
        # As transformers < 5 wrote them (the published checkpoints).
        c.pop("layer_types")
        rope = c.pop("rope_parameters")
        c.update(global_attn_every_n_layers=2, global_rope_theta=rope["full_attention"]["rope_theta"],
                 local_rope_theta=rope["sliding_attention"]["rope_theta"], transformers_version="4.48.0",
                 torch_dtype=c.pop("dtype"))

    write(root, "modernbert-odd", ModernBertForSequenceClassification,
          ModernBertConfig(vocab_size=mtok.get_vocab_size(), hidden_size=48, num_hidden_layers=3,
                           num_attention_heads=3, intermediate_size=64, max_position_embeddings=64,
                           global_attn_every_n_layers=2, local_attention=4, norm_bias=True,
                           attention_bias=True, mlp_bias=True, classifier_bias=True,
                           classifier_pooling="cls", classifier_activation="silu",
                           rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                            "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}},
                           id2label={0: "bad", 1: "good"}, **ids),
          mtok, msp, seed=28, attn="eager", cls_token="[CLS]", edit_config=old_modernbert_keys)
