"""``flaxgpt chat``: talk to an instruction-fine-tuned run, its answers streamed as they are decoded."""

from __future__ import annotations

import argparse
import sys

from flaxgpt.dtypes import WEIGHT_DTYPES

__all__ = ["add_parser", "run", "strip_response_header", "HeaderStripper"]

_HEADER = "### Response:"
_EXIT = "exit"

_EPILOG = """\
Each line you type becomes the instruction of the book's Alpaca prompt (format_input, no input); the
model writes "### Response:" and its answer, which is streamed to the terminal token by token (without
the header) until <|endoftext|> or --max-new-tokens. Every message is answered on its own (no history).
An empty line, "exit" or end of input (Ctrl-D) ends the chat.

Greedy unless --temperature > 0; --seed fixes the draws (message i uses the seed's key folded with i).

example:
  flaxgpt chat --checkpoint runs/sft
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with an instruction-fine-tuned run (streamed)",
        description="An interactive loop: each line is answered by the model, streamed as it is decoded.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="RUN", help="a flaxgpt run or checkpoint folder")
    p.add_argument("--max-new-tokens", type=int, default=256, metavar="N", help="default 256")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample among the K most likely")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="PRNG seed for sampling (default 0)")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default=None, help="parameter/compute dtype")
    p.set_defaults(func=run)


def strip_response_header(text: str) -> str:
    """The reply shown for generated text: leading whitespace, then one leading ``"### Response:"``,
    then the whitespace after it, removed (what :class:`HeaderStripper` streams).

    Args:
      text: the decoded new tokens.

    Returns:
      The reply.
    """
    text = text.lstrip()
    if text.startswith(_HEADER):
        text = text[len(_HEADER) :]
    return text.lstrip()


class HeaderStripper:
    """:func:`strip_response_header` on a stream of text pieces: ``"".join(feed(p) for p in pieces) +
    flush()`` equals ``strip_response_header("".join(pieces))``."""

    def __init__(self) -> None:
        self._head = ""  # text held while it may still be (whitespace +) a prefix of the header
        self._in_head = True
        self._lstrip = False  # drop whitespace until the reply's first visible character

    def feed(self, piece: str) -> str:
        """Takes the next piece; returns the text that can be shown now."""
        if self._in_head:
            self._head += piece
            head = self._head.lstrip()
            if len(head) < len(_HEADER) and _HEADER.startswith(head):
                return ""  # maybe the header: wait
            self._in_head = False
            if head.startswith(_HEADER):
                piece, self._lstrip = head[len(_HEADER) :], True
            else:
                return head
        if self._lstrip:
            piece = piece.lstrip()
            self._lstrip = not piece
        return piece

    def flush(self) -> str:
        """Ends the stream; returns what was held back."""
        if self._in_head:
            self._in_head = False
            return strip_response_header(self._head)
        return ""


def run(args: argparse.Namespace) -> int:
    import jax

    from flaxgpt.cli import CLIError
    from flaxgpt.cli.respond import load_run
    from flaxgpt.data.instructions import format_input
    from flaxgpt.generation.sampling import check_sampling
    from flaxgpt.generation.stream import generate_stream, stream_text
    from flaxgpt.text.tokenizers import text_to_token_ids

    try:
        check_sampling(args.temperature, args.top_k, args.top_p)
    except ValueError as e:
        raise CLIError(str(e)) from e
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, params, tok, _ = load_run(args.checkpoint, args.dtype)
    ctx = model.cfg.context_length
    base_key = jax.random.key(args.seed)
    interactive = sys.stdin.isatty()
    print('type a message; an empty line, "exit" or Ctrl-D ends the chat', file=sys.stderr)
    for turn in range(sys.maxsize):
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        message = line.strip()
        if not message or message == _EXIT:
            break
        ids = text_to_token_ids(format_input({"instruction": message, "input": ""}), tok)[0]  # (T,)
        if len(ids) >= ctx:
            print(f"message too long: its prompt is {len(ids)} tokens, the context {ctx}", file=sys.stderr)
            continue
        stream = generate_stream(
            model, params, ids, min(args.max_new_tokens, ctx - len(ids)), args.temperature, args.top_k,
            args.top_p, eos_id=tok.eot_token, key=jax.random.fold_in(base_key, turn),
        )
        stripper = HeaderStripper()
        with stream:
            for piece in stream_text(stream, tok):
                sys.stdout.write(stripper.feed(piece))
                sys.stdout.flush()
        sys.stdout.write(stripper.flush() + "\n")
        sys.stdout.flush()
    return 0
