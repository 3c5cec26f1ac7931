"""``flaxgpt convert SRC DST``: move GPT weights between Hugging Face, the book's names and flaxgpt runs."""

from __future__ import annotations

import argparse

from flaxgpt.dtypes import WEIGHT_DTYPES

__all__ = ["add_parser", "run"]

_EPILOG = """\
SRC (detected):
  a Hugging Face GPT-2 folder   config.json + model.safetensors (or a sharded checkpoint with its index)
  a .safetensors file           Hugging Face names with config.json beside it, or the book's GPTModel
                                names (tok_emb.weight, trf_blocks.N.att.W_query.weight, ...; sizes from
                                the shapes, --n-heads unless the width is a GPT-2 preset's)
  a flaxgpt run/checkpoint      a training run folder (its newest valid checkpoint) or a step_* folder
  a GPT-2 model name            gpt2, gpt2-medium, gpt2-large, gpt2-xl (downloaded once)
DST (--to, by default "book" when DST ends in .safetensors, else "hf"):
  hf    a folder with model.safetensors + config.json that transformers.GPT2LMHeadModel loads
  book  one .safetensors file the book's PyTorch GPTModel loads with load_state_dict(load_file(DST))

Pickle files (pytorch_model.bin, *.pt, *.pth) are never read: convert them to safetensors first.

examples:
  flaxgpt convert gpt2 ./gpt2-hf
  flaxgpt convert runs/my-run ./my-model --to hf
  flaxgpt convert ./book-model.safetensors ./hf-dir --n-heads 4
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert weights between Hugging Face, book and flaxgpt formats",
        description="Convert GPT weights from SRC to DST.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", metavar="SRC", help="weights to read (see below)")
    p.add_argument("dst", metavar="DST", help="folder (hf) or .safetensors file (book) to write")
    p.add_argument("--to", choices=("hf", "book"), default=None, help="output format")
    p.add_argument(
        "--n-heads", type=int, default=None, metavar="H", help="heads of a book file of non-GPT-2 width"
    )
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=None, help="cast the weights")
    p.add_argument(
        "--allow-non-finite", action="store_true", help="convert weights holding NaN or inf instead of refusing"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from flaxgpt.cli import CLIError
    from flaxgpt.io.pretrained import load_any, save_book, save_pretrained
    from flaxgpt.nn.params import count_params

    to = args.to or ("book" if str(args.dst).endswith(".safetensors") else "hf")
    try:
        cfg, params, fmt = load_any(
            args.src, n_heads=args.n_heads, dtype=args.dtype, allow_non_finite=args.allow_non_finite
        )
    except ImportError as e:
        raise CLIError(str(e)) from e
    if to == "book":
        out = save_book(cfg, params, args.dst)
    else:
        out = save_pretrained(cfg, params, args.dst)
    print(f"converted {args.src} ({fmt}) -> {out} ({to}): {count_params(params):,} parameters")
    return 0
