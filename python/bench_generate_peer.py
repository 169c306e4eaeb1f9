#!/usr/bin/env python3
"""The peer of `tuna-trainer bench-generate`: transformers' `generate` on the same model folder,
prompts and settings (greedy, KV cache, exactly `new_tokens` new tokens: no end token stops a
row), timed the same way.

    bench_generate_peer.py prepare --case gpt2|llama --out DIR [--prompt-len P] [--count C]
        writes DIR/model (a randomly initialised GPT-2 124M, or a SmolLM-135M-shaped Llama) and
        DIR/prompts.json: C prompts of random tokens, lengths P, P-8, P-16, ... (different
        lengths, so a batch is padded on the left).
    bench_generate_peer.py run --model-dir DIR --prompts FILE --batch B --new-tokens N
        [--rounds R] [--device cpu|cuda] [--threads T]
        prints one JSON line with the keys of tuna's (`ttft_s`, `decode_tokens_per_s`, ...).

Each round runs `generate` with max_new_tokens 1 (the time to first token) and N; the decode
speed is B * (N - 1) / (t_N - t_1) tokens per second; medians after one warm-up round. CPU
weights in fp32, CUDA in bf16 (tuna's `auto`), SDPA attention.
"""

import argparse
import json
import os
import random
import resource
import statistics
import sys
import time


def prepare(a):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    os.makedirs(a.out, exist_ok=True)
    model_dir = os.path.join(a.out, "model")
    torch.manual_seed(a.seed)
    if a.case == "llama":
        cfg = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                          intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                          tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0, bos_token_id=0,
                          eos_token_id=0, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = GPT2Config()
        model = GPT2LMHeadModel(cfg)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        model.save_pretrained(model_dir)
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(1, cfg.vocab_size) for _ in range(max(8, a.prompt_len - 8 * (i % 4)))]
               for i in range(a.count)]
    with open(os.path.join(a.out, "prompts.json"), "w") as f:
        json.dump({"prompts": prompts}, f)


def run(a):
    import torch
    from transformers import AutoModelForCausalLM

    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with open(a.prompts) as f:
        prompts = json.load(f)["prompts"][: a.batch]
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=dtype, attn_implementation="sdpa").to(device)
    model.eval()
    load_s = time.perf_counter() - t
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)

    def timed(n):
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        secs = time.perf_counter() - t
        assert out.shape[1] == width + n, out.shape
        return secs

    ttft, total = [], []
    for r in range(a.rounds + 1):
        x, y = timed(1), timed(a.new_tokens)
        if r > 0:
            ttft.append(x)
            total.append(y)
    rates = [a.batch * (a.new_tokens - 1) / max(y - x, 1e-9) for x, y in zip(ttft, total)]
    print(json.dumps({
        "impl": "transformers", "batch": a.batch, "prompt_tokens": [len(p) for p in prompts],
        "new_tokens": a.new_tokens, "device": a.device, "load_s": load_s,
        "ttft_s": statistics.median(ttft), "decode_tokens_per_s": statistics.median(rates),
        "ttft_times_s": ttft, "total_times_s": total,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--case", choices=["gpt2", "llama"], required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("--model-dir", required=True)
    r.add_argument("--prompts", required=True)
    r.add_argument("--batch", type=int, default=1)
    r.add_argument("--new-tokens", type=int, default=64)
    r.add_argument("--rounds", type=int, default=3)
    r.add_argument("--device", default="cpu")
    r.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    prepare(a) if a.cmd == "prepare" else run(a)


if __name__ == "__main__":
    sys.exit(main())
