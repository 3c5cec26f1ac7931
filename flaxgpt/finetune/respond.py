"""Book chapter 7.7: the fine-tuned model's responses to instruction records, and their JSON file.

:func:`generate_responses` decodes greedily with EOS = the tokenizer's ``<|endoftext|>`` (50256 for
GPT-2), batched through the compile-once :func:`flaxgpt.generation.decode.generate`: ragged prompts go in
as a list, and the last short batch is filled up with copies of a prompt of the same batch, so a test
set compiles one program per prompt bucket, not one per batch. Greedy rows of a batch come out as if
generated alone, so batched responses equal one-by-one responses.

**Context length.** The book's ``generate`` crops the running context to the last ``context_length``
tokens and keeps going; flaxgpt's ``generate`` never crops. Here each record gets
``min(max_new_tokens, context_length - prompt length)`` new tokens (the same cap whichever batch it is
in: records are batched with others of the same cap), and a prompt of ``context_length`` tokens or more
is an error naming the record. For GPT-2 (1,024 tokens) and the book's prompts (under 200 tokens) with
256 new tokens nothing is capped, and the responses are the book's.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxgpt.files import atomic_file
from flaxgpt.generation.decode import generate
from flaxgpt.nn.model import GPTModel, Params
from flaxgpt.text.tokenizers import text_to_token_ids, token_ids_to_text
from flaxgpt.validation import check_int

__all__ = ["RESPONSE_KEY", "RESPONSES_FILE", "extract_response", "generate_responses", "write_responses"]

RESPONSE_KEY = "model_response"  # the book's key for the model's answer
RESPONSES_FILE = "instruction-data-with-response.json"  # the book's file name


def extract_response(generated_text: str, input_text: str) -> str:
    """The book's response extraction: the text after the prompt, ``"### Response:"`` removed, stripped.

    Args:
      generated_text: the decoded prompt + generated tokens.
      input_text: the prompt (``format_input(entry)``).

    Returns:
      ``generated_text[len(input_text):].replace("### Response:", "").strip()``.
    """
    return generated_text[len(input_text) :].replace("### Response:", "").strip()


def _plan(lengths: list[int], max_new_tokens: int, context_length: int) -> list[int]:
    """Per-record new-token caps; raises on prompts that leave no room."""
    caps = []
    for i, n in enumerate(lengths):
        if n >= context_length:
            raise ValueError(
                f"record {i}: its prompt is {n} tokens, the model's context_length is {context_length}; "
                "no room for a response (shorten the instruction or input)"
            )
        caps.append(min(max_new_tokens, context_length - n))
    return caps


def generate_responses(
    model: GPTModel,
    params: Params,
    entries: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    max_new_tokens: int = 256,
    batch_size: int = 8,
    eos_id: int | None = None,
) -> list[str]:
    """Greedy responses to instruction records, as the book's chapter-7 loop, batched.

    Args:
      model: the (fine-tuned) model.
      params: its parameters.
      entries: records with "instruction" and "input" (see :func:`flaxgpt.data.instructions.format_input`).
      tokenizer: the model's tokenizer (``encode``/``decode``/``eot_token``).
      max_new_tokens: at most this many tokens per response (capped per record at
        ``context_length - prompt length``; see the module docstring).
      batch_size: prompts decoded together.
      eos_id: stop token; None: the tokenizer's ``eot_token`` (50256 for GPT-2).

    Returns:
      One response string per entry, in order (see :func:`extract_response`).

    Raises:
      ValueError: bad sizes, no EOS id, or a record whose prompt fills the context (named by index).
    """
    from flaxgpt.data.instructions import format_input

    n_new = check_int("max_new_tokens", max_new_tokens, 0)
    batch_size = check_int("batch_size", batch_size, 1)
    eos = getattr(tokenizer, "eot_token", None) if eos_id is None else eos_id
    if eos is None:
        raise ValueError("the tokenizer has no eot_token; pass eos_id")
    prompts = [format_input(e) for e in entries]
    ids = [text_to_token_ids(p, tokenizer)[0] for p in prompts]  # each (T_i,)
    caps = _plan([len(x) for x in ids], n_new, model.cfg.context_length)
    responses: list[str | None] = [None] * len(entries)
    for cap in sorted(set(caps), reverse=True):  # one group per cap (all records, unless near the context)
        group = [i for i, c in enumerate(caps) if c == cap]
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            rows = [ids[i] for i in chunk]
            rows += [rows[0]] * (batch_size - len(rows))  # fill: one batch size, one program
            out = generate(model, params, rows, max_new_tokens=cap, eos_id=int(eos))  # B x (T_i + new,)
            for i, row in zip(chunk, out):
                text = token_ids_to_text(np.asarray(row), tokenizer)
                responses[i] = extract_response(text, prompts[i])
    return [r for r in responses if r is not None]


def write_responses(
    entries: Sequence[Mapping[str, Any]], responses: Sequence[str], path: str | os.PathLike[str]
) -> Path:
    """Writes the book's ``instruction-data-with-response.json``: the records plus ``"model_response"``.

    The file is ``json.dump(records, f, indent=4)`` as the book writes it, written atomically (a crash
    leaves the old file or the new one).

    Args:
      entries: the records.
      responses: one response per record.
      path: the output file.

    Returns:
      The path written.

    Raises:
      ValueError: the counts differ.
    """
    if len(entries) != len(responses):
        raise ValueError(f"{len(entries)} records but {len(responses)} responses")
    records = [{**dict(e), RESPONSE_KEY: r} for e, r in zip(entries, responses)]
    path = Path(path)
    with atomic_file(path, "w") as f:
        json.dump(records, f, indent=4)
    return path
