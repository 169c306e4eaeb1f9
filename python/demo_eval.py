"""Accuracy of a sequence-classification model on held-out rows, measured with transformers.

Used by scripts/demo.sh to print the accuracy of the base model (its classification head freshly
initialised, as a fine-tune starts) and of the model tuna fine-tuned and the demo downloaded.

    python python/demo_eval.py --label before --model BASE_DIR --data dev.tsv
    python python/demo_eval.py --label after  --model DOWNLOADED_DIR --data dev.tsv
"""

import argparse
import csv

import torch
import transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--label", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="TSV with header sentence<TAB>label")
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    # The base model has no classification head yet: transformers' report about the freshly
    # initialised `classifier.*` weights is expected, so keep the output to the result line.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    with open(args.data, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    texts = [r["sentence"] for r in rows]
    gold = [int(r["label"]) for r in rows]

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    model.eval()
    id2label = model.config.id2label
    correct = 0
    with torch.no_grad():
        for i in range(0, len(texts), 64):
            enc = tok(texts[i : i + 64], padding=True, truncation=True, max_length=args.max_length, return_tensors="pt")
            pred = model(**enc).logits.argmax(-1).tolist()
            for p, g in zip(pred, gold[i : i + 64]):
                name = str(id2label.get(p, p))
                value = int(name) if name.lstrip("-").isdigit() else p
                correct += int(value == g)
    acc = correct / max(1, len(gold))
    print(f"accuracy {args.label} fine-tuning: {acc:.1%} on {len(gold)} held-out rows")


if __name__ == "__main__":
    main()
