"""``flaxgpt respond``: the fine-tuned model's responses to instruction records (book chapter 7.7)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from flaxgpt.dtypes import WEIGHT_DTYPES

__all__ = ["add_parser", "run", "load_run"]

logger = logging.getLogger(__name__)

_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}

_EPILOG = """\
--data: test, val or train (the book's 85/10/5 split of instruction-data.json, found in $FLAXGPT_DATA_DIR
or downloaded once; --source splits another file instead), or a JSON/JSONL file of
instruction/input/output records (all of them are answered).

Greedy decoding, stopping at <|endoftext|>, in batches through the compiled decode. Each record gets
min(--max-new-tokens, context_length - prompt length) new tokens (the book's generate crops the context
instead; for GPT-2 and the book's prompts nothing is capped). The file is the book's
instruction-data-with-response.json: the records plus "model_response", indent 4.

examples:
  flaxgpt respond --checkpoint runs/sft --data test
  flaxgpt respond --checkpoint runs/sft --data my-records.json --out answers.json --batch-size 16
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "respond",
        help="write a fine-tuned model's responses to instruction records",
        description="Generate responses to instruction records and write instruction-data-with-response.json.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="a flaxgpt run or checkpoint folder")
    p.add_argument("--data", default="test", metavar="SPLIT|FILE", help="test, val, train or a JSON file")
    p.add_argument("--source", metavar="FILE", help="records to split for --data test/val/train")
    p.add_argument("--out", metavar="FILE", help="default: RUN/instruction-data-with-response.json")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default 256")
    p.add_argument("--batch-size", type=int, default=8, metavar="B", help="prompts per batch (default 8)")
    p.add_argument("--show", type=int, default=3, metavar="K", help="responses to print (default 3)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=None, help="parameter/compute dtype")
    p.set_defaults(func=run)


def load_run(checkpoint: str, dtype: str | None = None) -> tuple[Any, Any, Any, Path]:
    """Loads a run's model for generation.

    Args:
      checkpoint: a flaxgpt run directory, its ``checkpoints`` folder, or a ``step_*`` folder.
      dtype: optional parameter/compute dtype name.

    Returns:
      ``(model, params, tokenizer, run_dir)``.
    """
    from flaxgpt.cli import CLIError
    from flaxgpt.io.checkpoint import CHECKPOINTS, META_FILE, load_model_from_checkpoint
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.text.tokenizers import get_tokenizer
    from flaxgpt.validation import check_language_model

    try:
        cfg, params, info = load_model_from_checkpoint(checkpoint, dtype=dtype)
    except ImportError as e:
        raise CLIError(str(e)) from e
    try:
        check_language_model(cfg)
    except ValueError as e:
        raise CLIError(f"{checkpoint}: {e}") from e
    path = Path(checkpoint)
    run_dir = path.parent.parent if (path / META_FILE).is_file() else path.parent if path.name == CHECKPOINTS else path
    logger.debug("loaded %s (step %s, tokenizer %s)", info["path"], info["step"], info["tokenizer"])
    try:
        tok = get_tokenizer(info["tokenizer"], near=checkpoint)
    except (RuntimeError, ValueError) as e:
        raise CLIError(str(e).strip().splitlines()[0]) from e
    return GPTModel(cfg), params, tok, run_dir


def _records(data: str, source: str | None) -> list[dict[str, Any]]:
    """The records --data names."""
    from flaxgpt.cli import CLIError
    from flaxgpt.data.instructions import book_split, load_instruction_data, read_instructions

    if data in _SPLITS:
        return book_split(load_instruction_data(source))[_SPLITS[data]]
    if source is not None:
        raise CLIError(f"--source splits records for --data test/val/train; --data is the file {data!r}")
    if not Path(data).is_file():
        raise CLIError(f"--data {data!r} is neither test, val, train nor an existing file")
    return read_instructions(data)


def run(args: argparse.Namespace) -> int:
    from flaxgpt.cli import CLIError
    from flaxgpt.data.instructions import format_input
    from flaxgpt.finetune.respond import RESPONSES_FILE, generate_responses, write_responses

    model, params, tok, run_dir = load_run(args.checkpoint, args.dtype)  # a classifier is refused first
    records = _records(args.data, args.source)
    if not records:
        raise CLIError(f"--data {args.data} holds no records")
    out = Path(args.out) if args.out else run_dir / RESPONSES_FILE
    if not out.parent.is_dir():
        raise CLIError(f"--out: no such folder {out.parent}")
    print(f"generating {len(records)} responses in batches of {args.batch_size} (greedy, "
          f"at most {args.max_new_tokens} new tokens)", flush=True)
    responses = generate_responses(
        model, params, records, tok, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    write_responses(records, responses, out)
    for entry, response in list(zip(records, responses))[: max(args.show, 0)]:  # as the book prints them
        print(format_input(entry))
        print(f"\nCorrect response:\n>> {entry['output']}")
        print(f"\nModel response:\n>> {response.strip()}")
        print("-------------------------------------")
    print(f"wrote {len(responses)} responses to {out}")
    return 0
