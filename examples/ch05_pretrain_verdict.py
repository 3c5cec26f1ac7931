"""Chapter 5, "Pretraining on unlabeled data": the book's training run on "The Verdict".

The book's settings: the 124M architecture with context 256 (163M parameters: untied output head, no
qkv bias, dropout 0.1, PyTorch-style init), a 90/10 character split, windows of 256 with stride 256,
batch 2 (train shuffled with drop_last, validation in order), AdamW(lr=4e-4, weight_decay=0.1),
10 epochs, evaluation of 5 batches every 5 steps, and a greedy sample of "Every effort moves you"
after each epoch. The book reports a first evaluation of 9.781 / 9.933 (train / val) and, after 10
epochs, a train loss well under 1 with a validation loss around 6.4: the model memorises the story.

    FLAXGPT_DATA_DIR=... FLAXGPT_GPT2_BPE_DIR=... python examples/ch05_pretrain_verdict.py

About 90 steps of a 163M-parameter model: 8 to 14 minutes on 2 CPU cores depending on the CPU and its load
(measured: 8.2 min on an AMD EPYC at load ~4, 13.6 min on an Intel Xeon at load 3.5), a minute on a GPU. Random initialisation and
shuffling use JAX's generators, so the numbers are close to, not equal to, the book's. Everything goes under
``--out`` (default ``runs/ch05-verdict``): metrics.jsonl, a checkpoint that ``flaxgpt generate --checkpoint``
can use, and the loss figure (the book's Figure 5.12) as ``loss.png``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import jax

from flaxgpt.config import GPTConfig
from flaxgpt.data.windows import DataLoader, train_val_split
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import count_params, init_params
from flaxgpt.text.bpe import gpt2_tokenizer
from flaxgpt.text.corpora import load_text
from flaxgpt.text.tokenizers import text_to_token_ids
from flaxgpt.training.loop import fit, greedy_sample
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.plotting import plot_losses
from flaxgpt.training.state import create_train_state
from flaxgpt.training.tasks import PretrainTask

BOOK_FIRST_EVAL = (9.781, 9.933)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--out", default="runs/ch05-verdict", help="run folder: metrics.jsonl, checkpoint, loss.png")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # fit logs the book's lines

    cfg = GPTConfig.preset("gpt2-small", context_length=256, drop_rate=0.1, qkv_bias=False)
    key = jax.random.key(123)  # the book's torch.manual_seed(123)
    init_key, train_key = jax.random.split(key)
    tok = gpt2_tokenizer()

    text = load_text("verdict")
    train_text, val_text = train_val_split(text, train_ratio=0.9)
    train_ids = text_to_token_ids(train_text, tok)[0]  # (N,)
    val_ids = text_to_token_ids(val_text, tok)[0]  # (M,)
    train_loader = DataLoader.from_token_ids(train_ids, 2, 256, 256, shuffle=True, drop_last=True, seed=123)
    val_loader = DataLoader.from_token_ids(val_ids, 2, 256, 256, shuffle=False, drop_last=False)
    print(f"characters {len(text):,}, tokens {train_ids.size + val_ids.size:,}; "
          f"train loader {len(train_loader)} batches, val loader {len(val_loader)} batches")

    model = GPTModel(cfg)
    params = init_params(cfg, init_key)
    print(f"model: {count_params(params):,} parameters")
    state = create_train_state(model, params, make_optimizer(4e-4, weight_decay=0.1))

    t0 = time.perf_counter()
    result = fit(
        state, train_loader, val_loader, key=train_key, num_epochs=args.epochs, eval_freq=5, eval_iter=5,
        tokenizer=tok, start_context="Every effort moves you", run_dir=args.out,
        task=PretrainTask(),  # the default: next-token cross-entropy; chapters 6-7 pass their own task
    )
    minutes = (time.perf_counter() - t0) / 60
    print(f"\nTraining completed in {minutes:.2f} minutes ({jax.devices()[0].device_kind}).")
    print(f"first evaluation: train {result.train_losses[0]:.3f}, val {result.val_losses[0]:.3f} "
          f"(book: {BOOK_FIRST_EVAL[0]} / {BOOK_FIRST_EVAL[1]})")
    print(f"final evaluation: train {result.train_losses[-1]:.3f}, val {result.val_losses[-1]:.3f} "
          "(book: well under 1 / about 6.4)")
    print("sample:", greedy_sample(result.state, tok, "Every effort moves you", 25))

    n = len(train_loader)
    epochs_seen = [(s * 1.0) / n for s in result.eval_steps]  # updates -> epochs
    plot_path = Path(args.out) / "loss.png"
    plot_losses(epochs_seen, result.track_tokens_seen, result.train_losses, result.val_losses, plot_path)
    print(f"wrote {plot_path}")


if __name__ == "__main__":
    main()
