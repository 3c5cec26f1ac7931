"""``flaxgpt score FILE``: rate each response in FILE from 0 to 100 with an Ollama judge (book chapter 7).

FILE is the responses file ``flaxgpt respond`` writes (the book's ``instruction-data-with-response.json``):
a JSON list (or JSON Lines) of records with ``instruction``, ``input``, ``output`` and the response under
``--key``. Each is sent with the book's judge prompt to ``--model`` at ``--url`` (start a server with
``ollama serve`` and ``ollama pull llama3``). Prints the number of integer scores and their average, as
the book; ``--out`` writes every entry's score and the judge's raw reply as JSON. Exit status 0, or 1
when no reply was an integer.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from flaxgpt.cli import CLIError, plain

__all__ = ["add_parser", "read_entries", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``flaxgpt score``.

    Args:
      sub: the top-level subparsers.
    """
    from flaxgpt.finetune.score import DEFAULT_MODEL, DEFAULT_TIMEOUT, DEFAULT_URL

    p = sub.add_parser("score", help="score responses with an Ollama judge (book chapter 7)",
                       description=plain(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="the responses JSON (e.g. instruction-data-with-response.json)")
    p.add_argument("--key", default="model_response", help="the key holding each response (default model_response)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the Ollama judge model (default {DEFAULT_MODEL})")
    p.add_argument("--url", default=DEFAULT_URL, help=f"the Ollama chat endpoint (default {DEFAULT_URL})")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT,
                   help=f"seconds to wait for each reply (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--out", metavar="FILE", help="write each entry's score and the judge's reply as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def read_entries(path: str | Path) -> list[Any]:
    """Reads a JSON list of records, or JSON Lines (one record per line).

    Args:
      path: the file.

    Returns:
      The records (not yet checked: :func:`flaxgpt.finetune.score.score_responses` names a bad one).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is neither a JSON list nor JSON Lines.
    """
    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as first:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError:
            raise ValueError(f"{path} is neither a JSON list nor JSON Lines: {first}") from first
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records, got a {type(data).__name__}")
    return data


def _report(args: argparse.Namespace, result: Any) -> dict[str, Any]:
    """The ``--out`` JSON: settings, summary and one record per entry."""
    return {
        "file": str(args.file), "key": args.key, "model": args.model, "url": args.url,
        "number_of_scores": len(result.scores), "total": result.total,
        "average": None if math.isnan(result.average) else result.average,
        "entries": [{"index": i, "score": s, "reply": r}
                    for i, (s, r) in enumerate(zip(result.entry_scores, result.replies, strict=True))],
    }


def run(args: argparse.Namespace) -> int:
    """Scores the file's responses and prints the book's summary lines.

    Args:
      args: the parsed ``flaxgpt score`` arguments.

    Returns:
      0, or 1 when no reply was an integer.
    """
    from flaxgpt.files import write_json
    from flaxgpt.finetune.score import OllamaError, score_responses

    if not args.timeout > 0:
        raise CLIError(f"--timeout must be > 0 seconds, got {args.timeout}")
    entries = read_entries(args.file)
    if not entries:
        raise CLIError(f"{args.file} holds no entries")
    try:
        result = score_responses(entries, json_key=args.key, model=args.model, url=args.url,
                                 timeout=args.timeout, progress=not args.no_progress)
    except (ConnectionError, OllamaError) as e:
        raise CLIError(str(e)) from e
    except ValueError as e:
        raise CLIError(f"{args.file}: {e}") from e
    print(f"Number of scores: {len(result.scores)} of {result.total}")
    print(f"Average score: {result.average:.2f}" if result.scores else "Average score: n/a (no integer scores)")
    if args.out:
        write_json(args.out, _report(args, result))
        print(f"Wrote {args.out}")
    return 0 if result.scores else 1
