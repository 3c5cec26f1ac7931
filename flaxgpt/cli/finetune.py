"""``flaxgpt finetune classify|instruct``: book chapters 6 and 7, a pretrained GPT fine-tuned as a text
classifier or on instruction/response pairs.

Both start from GPT-2 weights (``--pretrained gpt2-medium`` or a local folder), a ``flaxgpt train`` run
(``--checkpoint RUN``) or, for experiments, a fresh model (``--from-scratch``), and train the chosen parameters
(``--trainable``) through the same training loop as ``flaxgpt train`` (checkpoints, exact ``--resume``,
SIGINT/SIGTERM, NaN stop). Each writes ``OUT/metrics.jsonl``, ``OUT/loss.png``, ``OUT/checkpoints/``,
``OUT/config.json`` and ``OUT/results.json`` (with the trainable count and the optimizer state's bytes).

LoRA (book appendix E): ``--lora-rank R`` trains only rank-R adapters on the ``--lora-targets`` layers (default
every linear layer, the book's), scaled by ``--lora-alpha`` / R, the base frozen bit for bit; the adapters alone
are also written to ``OUT/adapters/``, and ``flaxgpt convert OUT DIR --to peft`` exports them for Hugging Face
PEFT. Every command that loads the run gets the adapters merged into the weights.

classify: swaps the head for a ``num_classes`` linear layer; also writes ``OUT/accuracy.png`` (the book's
figures 6.16 and 6.17); results are the final train / validation / test accuracy.

instruct: the book's instruction-data.json (or ``--data FILE``, a JSON list or JSONL of
instruction/input/output records) split 85/10/5, batched as the book's ``custom_collate_fn`` with widths padded
up to multiples of ``--bucket`` (one compiled program per bucket, not per width), the masked cross-entropy
(``--mask-instruction``: the prompt's tokens are not trained on, the book's exercise 7.2), the book's greedy
sample of the first validation prompt after each epoch; results are the initial and final losses.

This module holds the options and the dispatch; finetune_job.py the steps both tasks share, and
finetune_classify.py / finetune_instruct.py each task's data and report.
"""

from __future__ import annotations

import argparse
from typing import Any

from flaxgpt.cli import plain

__all__ = ["add_parser", "run"]

_COMMON: dict[str, Any] = {"max_steps": 0, "batch_size": 8, "lr": 5e-5, "weight_decay": 0.1, "eval_iter": 5,
                           "keep_checkpoints": 3, "drop_rate": 0.0, "seed": 123,
                           "lora_rank": 0, "lora_alpha": 16.0, "lora_targets": "all", "lora_dropout": 0.0}
DEFAULTS: dict[str, Any] = {  # classify (book chapter 6)
    "data": "sms-spam", "num_classes": 2, "trainable": "last_block", "pool": "last", "epochs": 5,
    "eval_freq": 50, "checkpoint_every": 200, **_COMMON,
}
INSTRUCT_DEFAULTS: dict[str, Any] = {  # instruct (book chapter 7)
    "data": "book", "trainable": "all", "epochs": 2, "eval_freq": 5, "checkpoint_every": 100, "bucket": 16,
    "max_length": 0, "sample_tokens": 50, **_COMMON,
}
SMS_LABELS = ("not spam", "spam")  # the book's classify_review answers
_NUMBERS = (("epochs", int), ("max-steps", int), ("batch-size", int), ("lr", float), ("weight-decay", float),
            ("eval-freq", int), ("eval-iter", int), ("checkpoint-every", int), ("keep-checkpoints", int),
            ("drop-rate", float), ("seed", int), ("lora-rank", int), ("lora-alpha", float), ("lora-dropout", float))



# --------------------------------------------------------------------------- parsers


def _add_common(c: argparse.ArgumentParser, d: dict[str, Any], out: str) -> None:
    """The options both tasks share: the base model, output, resume, trainable set and training numbers."""
    base = c.add_mutually_exclusive_group(required=True)
    base.add_argument("--pretrained", metavar="NAME|DIR", help="GPT-2 weights: gpt2, gpt2-medium, ... or a folder")
    base.add_argument("--checkpoint", metavar="RUN", help="a flaxgpt train run (or one of its checkpoints)")
    base.add_argument("--from-scratch", action="store_true",
                      help="a fresh model of flaxgpt train's default size (no pretraining: a baseline)")
    c.add_argument("--trainable", help="'last_block' (last block, final norm, head), 'head', 'all', or "
                   f"comma-separated path patterns such as 'trf_blocks_11/,out_head/' (default {d['trainable']})")
    c.add_argument("--lora-targets", metavar="all|attention|feed_forward|PATTERNS",
                   help="with --lora-rank: the linear layers that get adapters, a preset or comma-separated path "
                   "patterns searched in each layer's path such as 'W_query,W_value' (default all: the book's)")
    c.add_argument("--out", metavar="DIR", help=f"run directory (default {out})")
    c.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    helps = {"lora-rank": "LoRA (book appendix E): adapters of this rank on the --lora-targets, the rest frozen; "
             "0 = no LoRA (default 0)", "lora-alpha": "LoRA alpha; the adapters are scaled by alpha / rank (default 16)",
             "lora-dropout": "dropout on the adapters' input (default 0, the book)"}
    for flag, kind in _NUMBERS:
        c.add_argument(f"--{flag}", type=kind, help=helps.get(flag, f"default {d[flag.replace('-', '_')]}"))
    from flaxgpt.cli.processes import add_process_args

    add_process_args(c)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a GPT (book chapters 6 and 7: classification, instructions)",
                       description="Fine-tune a pretrained GPT through flaxgpt's one training loop.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    c = tasks.add_parser("classify", help="a text classifier (book chapter 6)", description=plain(__doc__),
                         formatter_class=fmt)
    d = DEFAULTS
    c.add_argument("--data", metavar="sms-spam|FILE",
                   help="'sms-spam' (the book's data, split 70/10/20 as the book) or a CSV/TSV with text and "
                   f"label columns, split the same way (default {d['data']})")
    c.add_argument("--num-classes", type=int, help=f"classes of a --data file (default {d['num_classes']})")
    c.add_argument("--pool", choices=("last", "last_nonpad"),
                   help="classify from the last position (the book) or each text's last real token")
    _add_common(c, d, "runs/classify")
    c.set_defaults(func=run)
    i = tasks.add_parser("instruct", help="instruction following (book chapter 7)", description=plain(__doc__),
                         formatter_class=fmt)
    d = INSTRUCT_DEFAULTS
    i.add_argument("--data", metavar="book|FILE",
                   help="'book' (instruction-data.json, 1,100 records) or a JSON list / JSONL file of instruction, "
                   "input and output records; split 85/10/5 train/test/validation as the book (default book)")
    i.add_argument("--mask-instruction", action="store_true",
                   help="ignore the prompt's target tokens too (the book's exercise 7.2)")
    i.add_argument("--bucket", type=int, help="pad batch widths up to multiples of this, 0 = the book's exact "
                   f"widths (one compile per width) (default {d['bucket']})")
    i.add_argument("--max-length", type=int,
                   help="cut batches to this many tokens (the book's allowed_max_length), 0 = the context length")
    i.add_argument("--sample-tokens", type=int,
                   help=f"tokens of the greedy per-epoch sample, 0 = none (default {d['sample_tokens']})")
    _add_common(i, d, "runs/instruct")
    i.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Runs ``flaxgpt finetune classify`` or ``flaxgpt finetune instruct``.

    Args:
      args: the parsed arguments.

    Returns:
      The exit status (0; 1 after a non-finite loss; 130/143 after SIGINT/SIGTERM).
    """
    from flaxgpt.cli.processes import start_processes

    args.multi = start_processes(args)  # before any other JAX call
    if getattr(args, "task", "classify") == "instruct":
        from flaxgpt.cli.finetune_instruct import run_instruct

        return run_instruct(args)
    from flaxgpt.cli.finetune_classify import run_classify

    return run_classify(args)
