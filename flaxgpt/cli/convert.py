"""``flaxgpt convert SRC DST``: move GPT weights between Hugging Face, the book's names and flaxgpt runs."""

from __future__ import annotations

import argparse
from typing import Any

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
        (a LoRA run's adapters are merged into the weights)
  book  one .safetensors file the book's PyTorch GPTModel loads with load_state_dict(load_file(DST))
  lora  a LoRA run's adapters alone (adapters.safetensors + lora.json; flaxgpt.io.adapters.load_lora)
  peft  a LoRA run's adapters in Hugging Face PEFT's format (adapter_config.json +
        adapter_model.safetensors) for peft.PeftModel.from_pretrained(GPT2LMHeadModel of the base, DST)

Pickle files (pytorch_model.bin, *.pt, *.pth) are never read: convert them to safetensors first.

examples:
  flaxgpt convert gpt2 ./gpt2-hf
  flaxgpt convert runs/my-run ./my-model --to hf
  flaxgpt convert runs/instruct-lora ./my-adapter --to peft
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
    p.add_argument("--to", choices=("hf", "book", "lora", "peft"), default=None, help="output format")
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
    if to in ("lora", "peft"):
        return _convert_adapters(args, to)
    try:
        cfg, params, fmt = load_any(
            args.src, n_heads=args.n_heads, dtype=args.dtype, allow_non_finite=args.allow_non_finite
        )
    except ImportError as e:
        raise CLIError(str(e)) from e
    tokenizer = _run_tokenizer(args.src) if fmt == "checkpoint" else "gpt2"
    if tokenizer != "gpt2" and to == "hf":
        raise CLIError(f"{args.src} was trained with the {tokenizer} tokenizer, not GPT-2's: a Hugging Face GPT-2 "
                       "folder would decode its ids with GPT-2's BPE, into the wrong text. Keep the flaxgpt run "
                       "(generate / respond read it), or export the weights alone with --to book")
    if to == "book":
        out = save_book(cfg, params, args.dst)
    else:
        out = save_pretrained(cfg, params, args.dst)
        note = _write_gpt2_tokenizer(out)
    print(f"converted {args.src} ({fmt}) -> {out} ({to}): {count_params(params):,} parameters; tokenizer {tokenizer}"
          + ("" if to == "book" else f"; {note}"))
    return 0


def _run_tokenizer(src: str) -> str:
    from flaxgpt.io.checkpoint import resolve_checkpoint

    return str(resolve_checkpoint(src)[1].get("tokenizer", "gpt2"))


def _write_gpt2_tokenizer(folder: Any) -> str:
    """Copies GPT-2's BPE files into an exported folder as transformers names them (vocab.json, merges.txt),
    when they are on this machine ($FLAXGPT_GPT2_BPE_DIR); returns what was done, in words."""
    import os
    import shutil
    from pathlib import Path

    src = os.environ.get("FLAXGPT_GPT2_BPE_DIR")
    pairs = (("encoder.json", "vocab.json"), ("vocab.bpe", "merges.txt"))
    if not src or not all((Path(src) / a).is_file() for a, _ in pairs):
        return ("no tokenizer files written (GPT-2's encoder.json + vocab.bpe are not in $FLAXGPT_GPT2_BPE_DIR): "
                "load the tokenizer with GPT2TokenizerFast.from_pretrained('gpt2')")
    for a, b in pairs:
        shutil.copyfile(Path(src) / a, Path(folder) / b)
    return "GPT-2's tokenizer files written (vocab.json, merges.txt)"


def _convert_adapters(args: argparse.Namespace, to: str) -> int:
    """``--to lora|peft``: a LoRA run's adapters alone."""
    from flaxgpt.cli import CLIError
    from flaxgpt.io.adapters import save_lora
    from flaxgpt.io.checkpoint import load_lora_from_checkpoint
    from flaxgpt.io.peft import save_peft
    from flaxgpt.io.pretrained import detect_format
    from flaxgpt.nn.params import count_params

    if detect_format(args.src) != "checkpoint":
        raise CLIError(f"--to {to} exports a LoRA fine-tuning run's adapters; {args.src} is not a flaxgpt run")
    cfg, _, lora, info = load_lora_from_checkpoint(args.src, allow_non_finite=args.allow_non_finite)
    settings = info["lora"]
    if to == "lora":
        out = save_lora(args.dst, lora, targets=settings.get("targets"),
                        base={"config": cfg.to_dict(), "source": settings.get("base")})
    else:
        out = save_peft(args.dst, cfg, lora, base_model_name_or_path=str(settings.get("base") or "gpt2"))
    print(f"converted {args.src} (LoRA rank {lora.rank}) -> {out} ({to}): {count_params(lora):,} adapter parameters")
    return 0
