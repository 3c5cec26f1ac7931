"""Command-line front end: ``flaxgpt <command> ...``.

Each subcommand lives in its own module exposing ``add_parser(subparsers)`` and ``run(args) -> int``.
This module only assembles them and turns expected failures (bad input) into a one-line message and a
non-zero exit status, never a traceback. ``-v/--verbose`` (before or after the command) logs at DEBUG
level, e.g. why each checkpoint of a run failed verification.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

# Subcommand modules, in the order ``--help`` lists them.
_COMMANDS = ("info", "train", "generate", "convert", "finetune", "classify", "respond", "score", "chat")


class CLIError(Exception):
    """An error caused by the user's input; printed as one line, exit status 2."""


@contextlib.contextmanager
def write_errors(out: Path) -> Iterator[None]:
    """Turns a failed write into the run folder (read-only, full disk) into one line (exit status 2);
    the writers have removed what they had started, and a run folder created here and left empty goes.

    Args:
      out: the run folder the block writes into.

    Raises:
      CLIError: the write failed (the reason in one line).
    """
    from safetensors import SafetensorError

    from flaxgpt.training.run_dir import RunDirError

    created = not out.exists()
    try:
        yield
    except RunDirError as e:
        raise CLIError(str(e)) from e
    except (OSError, SafetensorError) as e:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        reason = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise CLIError(f"cannot write the run folder {out}: {reason}") from e


def build_parser() -> argparse.ArgumentParser:
    """Returns the top-level parser with every available subcommand registered."""
    from flaxgpt import __version__

    parser = argparse.ArgumentParser(
        prog="flaxgpt",
        description="GPT models from first principles in JAX/Flax: train, generate, convert weights.",
    )
    parser.add_argument("--version", action="version", version=f"flaxgpt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMANDS:
        try:
            module = importlib.import_module(f"flaxgpt.cli.{name}")
        except ModuleNotFoundError as e:  # a subcommand that is not built yet
            if e.name == f"flaxgpt.cli.{name}":
                continue
            raise
        module.add_parser(sub)
        # also after the command (`flaxgpt generate ... --verbose`); SUPPRESS keeps a global -v when absent
        sub.choices[name].add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages"
        )
    return parser


def _error_line(command: str, error: BaseException, verbose: bool) -> str:
    """The one line printed for an expected failure; errors with per-item reasons (e.g. every
    checkpoint of a run is corrupt) say where to find them."""
    hint = "; run with --verbose for the reasons" if getattr(error, "reasons", ()) and not verbose else ""
    message = str(error)  # one line, whatever the error embeds (a download's "tried ..." list, orbax's text)
    parts = [re.sub(r"^- ", "", p.strip()) for p in message.splitlines() if p.strip()]  # bullets: their text
    message = "".join(p if i == 0 else (" " if parts[i - 1].endswith(":") else "; ") + p for i, p in enumerate(parts))
    return f"flaxgpt {command}: error: {message}{hint}"


def plain(doc: str | None) -> str:
    """A module docstring as ``--help`` text: reST's ``double backquotes`` and :role:`refs` made plain."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", doc or "")
    return text.replace("``", "")


def _oom_line(message: str) -> str:
    """XLA's RESOURCE_EXHAUSTED message as one line: the size asked for and what to shrink."""
    asked = re.search(r"allocat\w*\s+([0-9.]+\s*[KMGT]?i?B)|([0-9]+) bytes", message)
    size = (asked.group(1) or f"{int(asked.group(2)) / 2**30:.1f} GiB") if asked else "more memory than there is"
    return (f"out of memory: XLA asked for {size}; use a smaller --batch-size, --context-length or model "
            "(--preset / --emb-dim / --n-layers), or --dtype bfloat16")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flaxgpt`` console script.

    Args:
      argv: arguments without the program name; ``sys.argv[1:]`` when None.

    Returns:
      The process exit status.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
    )
    if not args.verbose:  # JAX logs backend probing (e.g. "Unable to initialize backend 'tpu'") at INFO
        logging.getLogger("jax").setLevel(logging.WARNING)
        logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every save and restore at INFO
    if args.command is None:  # a command is needed: the help, on stderr, and status 2 (as argparse's errors)
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, NotADirectoryError, UnicodeDecodeError, ConnectionError) as e:
        print(_error_line(args.command, e, args.verbose), file=sys.stderr)
        return 2
    except BrokenPipeError:  # `flaxgpt info RUN | head`: the reader left; stop quietly
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - Python flushes stdout at exit
        return 0
    except RuntimeError as e:  # XLA's out-of-memory: one line with what to shrink
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        print(f"flaxgpt {args.command}: error: {_oom_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"flaxgpt {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
