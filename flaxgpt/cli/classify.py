"""``flaxgpt classify --checkpoint RUN TEXT ...``: the label a fine-tuned classifier gives each text (the book's
``classify_review``), with the width, pooling and label names recorded by ``flaxgpt finetune classify``."""

from __future__ import annotations

import argparse

from flaxgpt.cli import CLIError, plain

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify texts with a fine-tuned classifier (book chapter 6)",
                       description=plain(__doc__))
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="a flaxgpt finetune classify run or checkpoint")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="the texts to classify")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flaxgpt.finetune.classify import classify
    from flaxgpt.io.checkpoint import load_model_from_checkpoint, resolve_checkpoint
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.text.tokenizers import get_tokenizer

    _, meta = resolve_checkpoint(args.checkpoint)
    info = meta.get("extra", {}).get("classifier")
    if info is None:
        raise CLIError(f"{args.checkpoint} is not a classifier run (train one with flaxgpt finetune classify)")
    cfg, params, _ = load_model_from_checkpoint(args.checkpoint)
    try:
        tok = get_tokenizer(meta.get("tokenizer", "gpt2"), near=args.checkpoint)
    except (RuntimeError, ValueError) as e:
        raise CLIError(str(e).strip().splitlines()[0]) from e
    model = GPTModel(cfg)
    for text in args.texts:
        try:
            label = classify(model, params, text, tok, max_length=info["max_length"],
                             pad_token_id=info["pad_token_id"], pool=info["pool"], labels=info.get("labels"))
        except ValueError as e:
            raise CLIError(str(e)) from e
        print(f"{label}\t{text}" if len(args.texts) > 1 else label)
    return 0
