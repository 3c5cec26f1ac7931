"""Appendix E, "Parameter-efficient fine-tuning with LoRA": the chapter-6 spam classifier trained through
low-rank adapters only, end to end.

The book's set-up: GPT-2 124M with the chapter-6 2-class head, every base parameter frozen, a LoRA adapter
(rank 16, alpha 16) on every linear layer (Q, K, V, the attention output, both feed-forward layers, the head):
2,666,528 trainable parameters. AdamW(lr=5e-5, weight_decay=0.1), 5 epochs, batches of 8. The book reports
100.00% / 96.64% / 97.33% train / validation / test accuracy. (flaxgpt scales the adapters by alpha / rank as
the book's current code; its first printing multiplied by alpha alone, 16 times more with these numbers.)

    python examples/appendix_e_lora.py --pretrained gpt2              # online, or a local HF folder
    python examples/appendix_e_lora.py --checkpoint runs/pydoc       # offline: a `flaxgpt train` run
    python examples/appendix_e_lora.py --checkpoint runs/pydoc --compare   # also the book's last-block run

The same run from the command line: ``flaxgpt finetune classify --pretrained gpt2 --lora-rank 16 --lora-alpha 16``.
Writes the run (metrics, checkpoints, figures) to ``--out``, and the adapters alone to ``--out/adapters``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.data.classification import classification_loaders
from flaxgpt.data.sms_spam import load_sms_spam
from flaxgpt.finetune.classify import ClassificationTask, classify, to_classifier
from flaxgpt.finetune.lora_train import lora_train_state
from flaxgpt.finetune.trainable import count_by_label, label_params, partition_optimizer, trainable_patterns
from flaxgpt.io.adapters import load_lora, save_lora
from flaxgpt.io.checkpoint import resolve_checkpoint
from flaxgpt.io.pretrained import load_any
from flaxgpt.nn.lora import init_lora, merge_lora
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import convert_layout, param_bytes
from flaxgpt.text.tokenizers import get_tokenizer
from flaxgpt.training.evaluation import evaluate_metrics
from flaxgpt.training.loop import fit
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state

BOOK_ACCURACY = {"train": 1.0, "validation": 0.9664, "test": 0.9733}


def _train(state: Any, labels: Any, loaders: dict[str, Any], epochs: int, out: Path) -> dict[str, Any]:
    """Trains with the book's chapter-6 loop settings; returns accuracies, sizes and timing."""
    task = ClassificationTask("last")
    counts = count_by_label(state.params, labels)
    opt_bytes = param_bytes(state.opt_state)
    t0 = time.perf_counter()
    result = fit(state, loaders["train"], loaders["validation"], key=jax.random.key(123), num_epochs=epochs,
                 eval_freq=50, eval_iter=5, task=task, run_dir=out, sample_tokens=0)
    seconds = time.perf_counter() - t0
    accuracy = {name: evaluate_metrics(result.state, loader, task)["accuracy"] for name, loader in loaders.items()}
    return {"state": result.state, "trainable": counts["trainable"], "optimizer_MiB": opt_bytes / 2**20,
            "minutes": seconds / 60, "step_ms": 1000 * seconds / max(result.updates, 1), "accuracy": accuracy}


def _report(name: str, r: dict[str, Any]) -> None:
    acc = ", ".join(f"{k} {100 * v:.2f}%" for k, v in r["accuracy"].items())
    print(f"{name:10s} {r['trainable']:>11,} trainable, optimizer state {r['optimizer_MiB']:7.1f} MiB, "
          f"{r['step_ms']:6.0f} ms/step ({r['minutes']:.1f} min): {acc}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument("--pretrained", help="gpt2 (downloads once) or a Hugging Face folder")
    base.add_argument("--checkpoint", help="a flaxgpt train run")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--compare", action="store_true", help="also fine-tune the last block, as chapter 6")
    parser.add_argument("--out", default="runs/appendix-e", help="run folder (metrics, checkpoints, figures)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    source = args.pretrained or args.checkpoint
    cfg, params, fmt = load_any(source)
    tok = get_tokenizer(resolve_checkpoint(source)[1].get("tokenizer", "gpt2") if fmt == "checkpoint" else "gpt2")
    splits = load_sms_spam()  # 1,045 / 149 / 300 rows, as the book's CSVs
    longest = max(len(tok.encode(t)) for t in splits["train"].texts)
    width = min(longest, cfg.context_length)
    loaders = classification_loaders(splits, tok, batch_size=8, seed=123, max_length=width, pad_token_id=tok.eot_token)
    if cfg.scan_layers:  # the last-block comparison needs one entry per block
        cfg = cfg.replace(scan_layers=False)
        params = convert_layout(params, cfg)
    cfg, params = to_classifier(cfg.replace(drop_rate=0.0), params, 2, jax.random.key(123))
    model = GPTModel(cfg)
    adam = make_optimizer(5e-5, weight_decay=0.1)

    # The train step donates its state: keep a host copy of the base to compare with and to start again from.
    host = jax.tree.map(np.asarray, params)
    fresh = lambda: jax.tree.map(jnp.asarray, host)  # noqa: E731

    # LoRA: every linear layer, the base frozen (bit-identical after training).
    lora = init_lora(host, jax.random.key(123), rank=args.rank, alpha=args.alpha, targets="all")
    state, labels = lora_train_state(model, fresh(), lora, adam)
    runs = {"LoRA": _train(state, labels, loaders, args.epochs, Path(args.out) / "lora")}
    trained = runs["LoRA"]["state"].params
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(trained["base"])))
    folder = save_lora(Path(args.out) / "adapters", trained["lora"], targets="all")
    print(f"adapters alone: {sum(f.stat().st_size for f in folder.iterdir()) / 2**20:.1f} MiB in {folder}")

    if args.compare:  # chapter 6: the last block, the final norm and the head
        labels = label_params(host, trainable_patterns("last_block", cfg.n_layers))
        state = create_train_state(model, fresh(), partition_optimizer(adam, labels))
        runs["last block"] = _train(state, labels, loaders, args.epochs, Path(args.out) / "last-block")
    for name, r in runs.items():
        _report(name, r)
    print("book (GPT-2 124M, LoRA):", ", ".join(f"{k} {100 * v:.2f}%" for k, v in BOOK_ACCURACY.items()))

    merged = merge_lora(fresh(), load_lora(folder, host))  # plain weights: any flaxgpt tool takes them
    for text in ("You are a winner you have been specially selected to receive $1000 cash or a $2000 award.",
                 "Hey, just wanted to check if we're still on for dinner tonight? Let me know!"):
        label = classify(model, merged, text, tok, max_length=width, pad_token_id=tok.eot_token,
                         labels=("not spam", "spam"))
        print(f"{label!r:12s} {text}")


if __name__ == "__main__":
    main()
