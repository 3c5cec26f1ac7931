"""``flaxgpt generate``: continue a prompt with pretrained GPT-2 weights or a training checkpoint."""

from __future__ import annotations

import argparse
import logging
import sys
import time

from flaxgpt.dtypes import WEIGHT_DTYPES

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)
DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_NEW_TOKENS = 0.8, 40, 50


_EPILOG = """\
weights (--pretrained): a GPT-2 model name (gpt2, gpt2-medium, gpt2-large, gpt2-xl; downloaded once into
the Hugging Face cache), a Hugging Face folder with config.json + model.safetensors, or a book-style
.safetensors file. --checkpoint: a flaxgpt training run or one of its checkpoint folders.

Sampling by default: temperature 0.8 and top-k 40, the draw fixed by --seed; --temperature 0 is greedy
(then --top-k / --top-p are refused: they would do nothing). --max-new-tokens defaults to 50, or fewer
when the prompt leaves less room in the model's context. The speed (tokens/s) goes to stderr. The GPT-2
tokenizer comes from $FLAXGPT_GPT2_BPE_DIR (encoder.json + vocab.bpe) or tiktoken's cache/download; a
training run uses the tokenizer it was trained with (a learned BPE from its tokenizer.json).

examples:
  flaxgpt generate --pretrained gpt2 --prompt "Every effort moves you"
  flaxgpt generate --pretrained ./gpt2-dir --prompt "Hello" --temperature 0.8 --top-k 50 --seed 1
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="continue a prompt with GPT-2 weights or a checkpoint",
        description="Print a prompt and the model's continuation of it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--pretrained", metavar="NAME_OR_PATH", help="GPT-2 name, HF folder or book .safetensors"
    )
    src.add_argument("--checkpoint", metavar="DIR", help="a flaxgpt run or checkpoint folder")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                   help="tokens to add (default 50, or what fits the context)")
    p.add_argument("--temperature", type=float, default=None, metavar="T",
                   help=f"sampling temperature (default {DEFAULT_TEMPERATURE}); 0 = greedy")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=f"sample among the K most likely (default {DEFAULT_TOP_K} when sampling)")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="PRNG seed for sampling (default 0)")
    p.add_argument("--eos", action="store_true", help="stop at <|endoftext|> (id 50256)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=None, help="parameter/compute dtype")
    p.add_argument("--int8", action="store_true",
                   help="int8 weight-only decoding (per-channel scales): a quarter of the weight bytes, for "
                        "memory-bound batch-1 generation; logits move slightly (see the README)")
    p.add_argument(
        "--allow-non-finite", action="store_true", help="load weights holding NaN or inf instead of refusing"
    )
    p.add_argument(
        "--n-heads", type=int, default=None, metavar="H", help="heads of a book file of non-GPT-2 width"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import jax

    from flaxgpt.cli import CLIError
    from flaxgpt.generation.decode import generate
    from flaxgpt.io.checkpoint import load_model_from_checkpoint
    from flaxgpt.io.pretrained import detect_format, load_any
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.text.tokenizers import get_tokenizer, text_to_token_ids

    source = args.pretrained if args.pretrained is not None else args.checkpoint
    fmt = detect_format(source)
    if args.checkpoint is not None and fmt != "checkpoint":
        raise CLIError(f"{source} is not a flaxgpt run or checkpoint folder (use --pretrained for weights)")
    if not args.prompt:
        raise CLIError("--prompt is empty")
    tokenizer = "gpt2"  # published weights use GPT-2's; a training run records its own
    try:
        if fmt == "checkpoint":
            cfg, params, info = load_model_from_checkpoint(
                source, dtype=args.dtype, allow_non_finite=args.allow_non_finite
            )
            tokenizer = info["tokenizer"]
        else:
            cfg, params, fmt = load_any(
                source, n_heads=args.n_heads, dtype=args.dtype, allow_non_finite=args.allow_non_finite
            )
    except ImportError as e:
        raise CLIError(str(e)) from e
    logger.debug("loaded %s weights from %s", fmt, source)
    try:
        tok = get_tokenizer(tokenizer, near=source if fmt == "checkpoint" else None)
    except (RuntimeError, ValueError) as e:
        raise CLIError(str(e).strip().splitlines()[0]) from e
    ids = text_to_token_ids(args.prompt, tok)[0]  # (T,)
    if args.int8:
        if args.dtype not in (None, "float32"):
            raise CLIError("--int8 quantises float32 weights: leave out --dtype")
        from flaxgpt.nn.quant import quantize_int8

        params = quantize_int8(params, cfg)
    temperature, top_k, n_new = _sampling(args, ids.size, cfg.context_length)
    t0 = time.perf_counter()
    out = generate(
        GPTModel(cfg),
        params,
        ids,
        max_new_tokens=n_new,
        temperature=temperature,
        top_k=top_k,
        top_p=args.top_p,
        eos_id=tok.eot_token if args.eos else None,
        key=jax.random.key(args.seed),
    )  # (T + new,)
    wall = time.perf_counter() - t0
    print(tok.decode([int(i) for i in out]))
    made = len(out) - ids.size
    print(f"{made} tokens in {wall:.2f}s ({made / max(wall, 1e-9):.1f} tokens/s, compile included); "
          f"temperature {temperature:g}{f', top-k {top_k}' if top_k else ''}{f', top-p {args.top_p:g}' if args.top_p else ''}",
          file=sys.stderr)
    return 0


def _sampling(args: argparse.Namespace, prompt_len: int, context: int) -> tuple[float, int | None, int]:
    """(temperature, top_k, max_new_tokens) from the options and their defaults."""
    from flaxgpt.cli import CLIError

    temperature = DEFAULT_TEMPERATURE if args.temperature is None else args.temperature
    if temperature == 0 and (args.top_k is not None or args.top_p is not None):
        raise CLIError("--top-k / --top-p sample among likely tokens; with --temperature 0 (greedy) they do nothing")
    top_k = args.top_k if args.top_k is not None else (DEFAULT_TOP_K if temperature > 0 and args.top_p is None else None)
    room = context - prompt_len
    if args.max_new_tokens is not None:
        return temperature, top_k, args.max_new_tokens  # generate() names a prompt + N beyond the context
    if room < 1:
        raise CLIError(f"the prompt has {prompt_len} tokens; the model's context is {context}: shorten the prompt")
    return temperature, top_k, min(DEFAULT_NEW_TOKENS, room)
