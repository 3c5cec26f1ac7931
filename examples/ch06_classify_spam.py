"""Chapter 6, "Fine-tuning for classification": a spam classifier from a pretrained GPT, end to end.

The book's pipeline: the SMS Spam Collection balanced to 747 + 747 messages and split 70/10/20
(1,045 / 149 / 300), padded with 50256 to the longest training message (120 tokens), batches of 8; GPT-2
124M with its head replaced by a 2-class linear layer; only the last block, the final LayerNorm and the
head trained with AdamW(lr=5e-5, weight_decay=0.1) for 5 epochs, evaluating 5 batches every 50 steps.
The book reports 97.21% / 97.32% / 95.67% train / validation / test accuracy.

    python examples/ch06_classify_spam.py --pretrained gpt2              # online, or a local HF folder
    python examples/ch06_classify_spam.py --checkpoint runs/pydoc       # offline: a `flaxgpt train` run

The same run from the command line: ``flaxgpt finetune classify --pretrained gpt2 --out runs/spam``.
Offline, ``$FLAXGPT_DATA_DIR/sms_spam_collection/SMSSpamCollection.tsv`` is read; online it is downloaded
once into the cache. Writes the book's loss and accuracy figures (6.16, 6.17) next to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import jax

from flaxgpt.data.classification import classification_loaders
from flaxgpt.data.sms_spam import load_sms_spam
from flaxgpt.finetune.classify import ClassificationTask, classify, to_classifier
from flaxgpt.finetune.trainable import count_by_label, label_params, partition_optimizer, trainable_patterns
from flaxgpt.io.checkpoint import resolve_checkpoint
from flaxgpt.io.pretrained import load_any
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import convert_layout
from flaxgpt.text.tokenizers import get_tokenizer
from flaxgpt.training.evaluation import evaluate_metrics
from flaxgpt.training.loop import fit
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.plotting import plot_metrics
from flaxgpt.training.state import create_train_state

BOOK_ACCURACY = {"train": 0.9721, "validation": 0.9732, "test": 0.9567}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument("--pretrained", help="gpt2 (downloads once) or a Hugging Face folder")
    base.add_argument("--checkpoint", help="a flaxgpt train run")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--pool", choices=("last", "last_nonpad"), default="last")
    parser.add_argument("--out", default="runs/ch06-spam", help="run folder (metrics, checkpoints, figures)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    source = args.pretrained or args.checkpoint
    cfg, params, fmt = load_any(source)
    tok = get_tokenizer(resolve_checkpoint(source)[1].get("tokenizer", "gpt2") if fmt == "checkpoint" else "gpt2")
    splits = load_sms_spam()  # 1,045 / 149 / 300 rows, as the book's CSVs
    longest = max(len(tok.encode(t)) for t in splits["train"].texts)
    loaders = classification_loaders(splits, tok, batch_size=8, seed=123, max_length=min(longest, cfg.context_length),
                                     pad_token_id=tok.eot_token)
    print({k: len(v) for k, v in loaders.items()}, "batches; width", loaders["train"].dataset.max_length)

    if cfg.scan_layers:  # "last_block" needs one entry per block
        cfg = cfg.replace(scan_layers=False)
        params = convert_layout(params, cfg)
    cfg, params = to_classifier(cfg.replace(drop_rate=0.0), params, 2, jax.random.key(123))
    labels = label_params(params, trainable_patterns("last_block", cfg.n_layers))
    print("parameters:", count_by_label(params, labels))
    tx = partition_optimizer(make_optimizer(5e-5, weight_decay=0.1), labels)
    state = create_train_state(GPTModel(cfg), params, tx)
    task = ClassificationTask(args.pool)

    t0 = time.perf_counter()
    result = fit(state, loaders["train"], loaders["validation"], key=jax.random.key(123), num_epochs=args.epochs,
                 eval_freq=50, eval_iter=5, task=task, run_dir=args.out, sample_tokens=0)
    print(f"training took {(time.perf_counter() - t0) / 60:.2f} minutes")
    for name, loader in loaders.items():
        acc = evaluate_metrics(result.state, loader, task)["accuracy"]
        print(f"{name:10s} accuracy {100 * acc:6.2f}%   (book, GPT-2 124M: {100 * BOOK_ACCURACY[name]:.2f}%)")
    records = result.history
    out = Path(args.out)
    plot_metrics(records, out / "loss.png", "loss", "Examples seen")  # the book's figure 6.16
    plot_metrics(records, out / "accuracy.png", "accuracy", "Examples seen")  # figure 6.17
    model = GPTModel(cfg)
    for text in ("You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
                 "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"):
        label = classify(model, result.state.params, text, tok, max_length=loaders["train"].dataset.max_length,
                         pad_token_id=tok.eot_token, pool=args.pool, labels=("not spam", "spam"))
        print(f"{label!r:12s} {text}")


if __name__ == "__main__":
    main()
