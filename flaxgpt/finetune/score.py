"""Scoring model responses with an LLM judge served by Ollama (book chapter 7, section 7.8).

The book asks a local ``llama3`` (through Ollama's ``/api/chat``) to rate each test-set response from 0 to
100 against the correct output, with a fixed judge prompt and deterministic options (seed 123,
temperature 0, context 2048). :func:`judge_prompt` is that prompt exactly, :func:`query_model` the
book's streaming request, and :func:`score_responses` the book's ``generate_model_scores`` with its
outcome kept: the integer scores, the replies that were not integers (logged and counted, not a crash)
and their average.

Only the standard library talks to the server (``urllib``); no server answering is a one-line
:class:`ConnectionError` saying how to start one.
"""

from __future__ import annotations

import json
import logging
import math
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_URL",
    "JUDGE_OPTIONS",
    "OllamaError",
    "ScoreResult",
    "judge_prompt",
    "parse_score",
    "query_model",
    "score_responses",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "llama3"
DEFAULT_URL = "http://localhost:11434/api/chat"
DEFAULT_TIMEOUT = 120.0  # seconds per request (a cold model load on CPU takes a while)
# The book's request options: reproducible, greedy judging.
JUDGE_OPTIONS: dict[str, int] = {"seed": 123, "temperature": 0, "num_ctx": 2048}
_FIELDS = ("instruction", "output")  # "input" may be absent or empty, as in flaxgpt.data.instructions


class OllamaError(RuntimeError):
    """The Ollama server answered, but not with a usable reply (an HTTP error such as an unknown model, an
    ``error`` line in the stream, or a line that is not JSON)."""


def judge_prompt(entry: Mapping[str, Any], json_key: str = "model_response") -> str:
    """The book's judge prompt for one entry.

    Args:
      entry: an instruction record with ``instruction``, ``input``, ``output`` and ``json_key``.
      json_key: the key holding the model's response.

    Returns:
      The prompt text, exactly as the book's ``generate_model_scores`` builds it.
    """
    from flaxgpt.data.instructions import format_input

    return (
        f"Given the input `{format_input(entry)}` "
        f"and correct output `{entry['output']}`, "
        f"score the model response `{entry[json_key]}`"
        f" on a scale from 0 to 100, where 100 is the best score. "
        f"Respond with the integer number only."
    )


def _request(prompt: str, model: str, url: str) -> urllib.request.Request:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError(f"url must be an http:// or https:// address, got {url!r}")
    if not isinstance(model, str) or not model:
        raise ValueError(f"model must be a non-empty name such as {DEFAULT_MODEL!r}, got {model!r}")
    data = {"model": model, "messages": [{"role": "user", "content": prompt}], "options": dict(JUDGE_OPTIONS)}
    request = urllib.request.Request(url, data=json.dumps(data).encode("utf-8"), method="POST")
    request.add_header("Content-Type", "application/json")
    return request


def _http_error(error: urllib.error.HTTPError, url: str) -> OllamaError:
    """An HTTP error status as one line, with Ollama's own ``error`` message when it sent one."""
    try:
        body = error.read().decode("utf-8", "replace")
        detail = json.loads(body).get("error", body) if body.strip().startswith("{") else body
    except (OSError, ValueError, AttributeError):
        detail = ""
    detail = " ".join(str(detail).split())[:200]
    return OllamaError(f"Ollama at {url} answered HTTP {error.code}" + (f": {detail}" if detail else ""))


def _read_stream(response: Any, url: str) -> str:
    """Concatenates ``message.content`` over Ollama's streamed JSON lines, as the book."""
    reply = ""
    while True:
        line = response.readline().decode("utf-8")
        if not line:
            break
        if not line.strip():
            continue
        try:
            chunk = json.loads(line)
        except json.JSONDecodeError as e:
            raise OllamaError(f"{url} answered a line that is not JSON: {line.strip()[:100]!r}") from e
        if not isinstance(chunk, dict):
            raise OllamaError(f"{url} answered a JSON line that is not an object: {line.strip()[:100]!r}")
        if "error" in chunk:
            raise OllamaError(f"Ollama at {url} answered an error: {chunk['error']}")
        message = chunk.get("message")
        reply += str(message.get("content", "")) if isinstance(message, dict) else ""
    return reply


def query_model(
    prompt: str, model: str = DEFAULT_MODEL, url: str = DEFAULT_URL, timeout: float = DEFAULT_TIMEOUT
) -> str:
    """Sends one chat message to an Ollama server and returns its whole (streamed) reply, as the book.

    The request is the book's: POST ``{"model", "messages": [{"role": "user", "content": prompt}],
    "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}`` as ``application/json``; the reply's
    JSON lines are read to the end and their ``message.content`` concatenated.

    Args:
      prompt: the user message.
      model: the Ollama model name.
      url: the chat endpoint.
      timeout: seconds to wait for the connection and for each read.

    Returns:
      The reply text.

    Raises:
      ConnectionError: no server answers at ``url`` (refused, unreachable, or silent past ``timeout``).
      OllamaError: the server answered with an error or with something that is not Ollama's stream.
      ValueError: ``url`` is not an http(s) address or ``model`` is empty.
    """
    request = _request(prompt, model, url)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return _read_stream(response, url)
    except urllib.error.HTTPError as e:
        raise _http_error(e, url) from e
    except TimeoutError as e:
        raise ConnectionError(f"the Ollama server at {url} did not answer within {timeout:g} s") from e
    except (urllib.error.URLError, ConnectionError) as e:
        if isinstance(getattr(e, "reason", None), TimeoutError):
            raise ConnectionError(f"the Ollama server at {url} did not answer within {timeout:g} s") from e
        raise ConnectionError(
            f"no Ollama server answers at {url} (start it with `ollama serve` and `ollama pull {model}`)"
        ) from e


def parse_score(reply: str) -> int | None:
    """The judge's score, parsed as the book (``int(reply)``: an integer, surrounding spaces allowed).

    Args:
      reply: the judge's raw reply.

    Returns:
      The integer, or None when the reply is not one.
    """
    try:
        return int(reply)
    except ValueError:
        return None


@dataclass
class ScoreResult:
    """The outcome of scoring a list of responses.

    Attributes:
      scores: the integer scores, in entry order (entries whose reply was not an integer are absent).
      failures: ``(index, raw reply)`` of each entry whose reply was not an integer.
      entry_scores: one item per entry: its score, or None for a failure.
      replies: the judge's raw reply per entry.
    """

    scores: list[int] = field(default_factory=list)
    failures: list[tuple[int, str]] = field(default_factory=list)
    entry_scores: list[int | None] = field(default_factory=list)
    replies: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The number of entries scored (successes and failures)."""
        return len(self.entry_scores)

    @property
    def average(self) -> float:
        """The mean of :attr:`scores`; NaN when no reply was an integer."""
        return sum(self.scores) / len(self.scores) if self.scores else math.nan


def _check_entries(entries: Sequence[Mapping[str, Any]], json_key: str) -> None:
    """Every entry is a mapping with ``instruction``, ``output`` and ``json_key``, before any request is sent."""
    if isinstance(entries, (str, bytes, Mapping)) or not isinstance(entries, Sequence):
        raise ValueError(f"entries must be a list of instruction records, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ValueError(f"entry {i} must be a JSON object, got {type(entry).__name__}")
        missing = [k for k in (*_FIELDS, json_key) if k not in entry]
        if missing:
            raise ValueError(f"entry {i} lacks {', '.join(repr(k) for k in missing)} (has {sorted(entry)})")


def score_responses(
    entries: Sequence[Mapping[str, Any]],
    json_key: str = "model_response",
    model: str = DEFAULT_MODEL,
    url: str = DEFAULT_URL,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = False,
) -> ScoreResult:
    """Scores each entry's response with the judge, as the book's ``generate_model_scores``.

    Every entry is checked before the first request. A reply that is not an integer is logged ("Could
    not convert score: ...", as the book prints) and recorded in :attr:`ScoreResult.failures`.

    Args:
      entries: instruction records with ``instruction``, ``output``, ``json_key`` and (optionally) ``input``.
      json_key: the key holding the model's response.
      model: the Ollama model name.
      url: the chat endpoint.
      timeout: seconds per request (see :func:`query_model`).
      progress: show a tqdm progress bar ("Scoring entries") on stderr, from the first reply on (so that
        no server answering leaves no half-drawn bar before the error).

    Returns:
      The scores, failures and average.

    Raises:
      ValueError: an entry is not an object or lacks a field (its index named).
      ConnectionError: no server answers at ``url``.
      OllamaError: the server answered with an error.
    """
    from tqdm import tqdm

    _check_entries(entries, json_key)
    result = ScoreResult()
    bar = None
    try:
        for i, entry in enumerate(entries):
            reply = query_model(judge_prompt(entry, json_key), model=model, url=url, timeout=timeout)
            if bar is None:
                bar = tqdm(total=len(entries), desc="Scoring entries", disable=not progress)
            _record(result, i, reply)
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return result


def _record(result: ScoreResult, i: int, reply: str) -> None:
    """Adds entry ``i``'s reply to ``result``: its score, or a logged failure."""
    score = parse_score(reply)
    result.replies.append(reply)
    result.entry_scores.append(score)
    if score is None:
        logger.warning("Could not convert score: %s (entry %d)", reply, i)
        result.failures.append((i, reply))
    else:
        result.scores.append(score)
