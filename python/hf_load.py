"""What the check scripts share: a model folder loaded as its users load it, with every key
accounted for."""

import sys

import torch
from transformers import AutoTokenizer


def load_exactly(auto_class, model_dir):
    """`auto_class.from_pretrained(model_dir)` in fp32, eval mode, with its tokenizer; exits when
    transformers reports a missing, unexpected or mis-shaped key."""
    model, info = auto_class.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        sys.exit(f"transformers reports {bad}")
    model.eval()
    return model, AutoTokenizer.from_pretrained(model_dir)
