"""The chapter-7 data: Alpaca-style instruction/input/output records, the book's prompt, and padded batches.

:func:`instruction_data_path` finds ``instruction-data.json`` offline (``$FLAXGPT_DATA_DIR``, then the cache)
or downloads it once from the book's repository into the cache and checks its SHA-256.
:func:`read_instructions` reads any JSON list or JSONL file of such records; :func:`book_split` splits them
as the book (first 85% train, next 10% test, last 5% validation: 935 / 110 / 55 of the book's 1,100).
:func:`format_input` is the book's Alpaca prompt. :class:`InstructionDataset` batches as the book's
``custom_collate_fn`` and then pads the width up to a bucket, so that training compiles a handful of programs
rather than one per batch width; :class:`flaxgpt.data.windows.DataLoader` serves its batches (resumable).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flaxgpt.data.windows import DataLoader
from flaxgpt.text.corpora import checked_data_file, download_file
from flaxgpt.validation import check_int

__all__ = [
    "INSTRUCTION_DATA_URL",
    "INSTRUCTION_DATA_SHA256",
    "INSTRUCTION_DATA_FILE",
    "IGNORE_INDEX",
    "PROMPT_PREAMBLE",
    "RESPONSE_HEADER",
    "DEFAULT_BUCKET",
    "instruction_data_path",
    "read_instructions",
    "load_instruction_data",
    "book_split",
    "format_input",
    "format_response",
    "collate",
    "bucket_width",
    "InstructionDataset",
    "instruction_loaders",
]

INSTRUCTION_DATA_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
)
INSTRUCTION_DATA_SHA256 = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"
INSTRUCTION_DATA_FILE = "instruction-data.json"
IGNORE_INDEX = -100  # PyTorch's cross_entropy default, the book's ignore_index
PAD_TOKEN_ID = 50256  # GPT-2's <|endoftext|>, the book's pad_token_id
DEFAULT_BUCKET = 16  # batch widths rounded up to multiples of 16: 3 programs for the book's 2-epoch run
PROMPT_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
RESPONSE_HEADER = "\n\n### Response:\n"
_FIELDS = ("instruction", "input", "output")


# --------------------------------------------------------------------------- files


def instruction_data_path(url: str = INSTRUCTION_DATA_URL) -> Path:
    """The book's ``instruction-data.json``: ``$FLAXGPT_DATA_DIR/instruction-data.json``, else the cached copy,
    else downloaded once into the cache (SHA-256 checked).

    Args:
      url: where to download it from (any URL urllib opens; tests use file://).

    Returns:
      The path of the JSON file.

    Raises:
      ConnectionError: nothing local and the download failed.
      ValueError: the file's SHA-256 is not the book's.
    """
    return checked_data_file(INSTRUCTION_DATA_FILE, INSTRUCTION_DATA_SHA256, "the book's instruction-data.json",
                             lambda dest: download_file(url, dest))


def _parse(path: Path, text: str) -> list[Any]:
    """The records of a JSON list or of JSON lines (one object per non-blank line)."""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from e
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not a JSON object (JSONL): {e.msg}") from e
    return records


def _record(rec: Any, i: int, where: str) -> dict[str, Any]:
    """One checked record: instruction and output strings; a missing or null input becomes ""."""
    if not isinstance(rec, Mapping):
        raise ValueError(f"{where} record {i} is a {type(rec).__name__}, expected an object with {list(_FIELDS)}")
    out = dict(rec)
    if out.get("input") is None:
        out["input"] = ""
    for field in _FIELDS:
        if field not in out:
            raise ValueError(f"{where} record {i} has no {field!r} field (its fields: {sorted(rec)})")
        if not isinstance(out[field], str):
            raise ValueError(f"{where} record {i}: {field!r} is a {type(out[field]).__name__}, expected a string")
    return out


def read_instructions(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads instruction records from a JSON list or a JSONL file.

    Each record needs string ``instruction`` and ``output`` fields; ``input`` may be missing, null or empty
    (all read as ""). Other fields (e.g. an earlier ``model_response``) are kept.

    Args:
      path: the file.

    Returns:
      The records in file order, as new dicts.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not JSON/JSONL, holds no records, or a record (named by its 0-based index)
        lacks a field or has a non-string one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such instruction data file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.start})") from e
    records = _parse(path, text)
    if not isinstance(records, list):
        raise ValueError(f"{path} holds a JSON {type(records).__name__}, expected a list of records")
    if not records:
        raise ValueError(f"{path} holds no records")
    return [_record(r, i, str(path)) for i, r in enumerate(records)]


def load_instruction_data(path: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """The book's 1,100 records (or those of ``path``).

    Args:
      path: a JSON/JSONL file (default: :func:`instruction_data_path`).

    Returns:
      The records.
    """
    return read_instructions(instruction_data_path() if path is None else path)


def book_split(
    data: Sequence[Any], train_frac: float = 0.85, test_frac: float = 0.1
) -> dict[str, list[Any]]:
    """The book's split, in order (no shuffle): the first ``int(n * 0.85)`` records train, the next
    ``int(n * 0.1)`` test, the rest validation (935 / 110 / 55 for 1,100 records).

    Args:
      data: the records.
      train_frac: the training fraction.
      test_frac: the test fraction.

    Returns:
      ``{"train": ..., "validation": ..., "test": ...}`` (lists).
    """
    if not (0.0 < train_frac <= 1.0 and 0.0 <= test_frac <= 1.0 - train_frac):
        raise ValueError(f"need 0 < train_frac <= 1 and 0 <= test_frac <= 1 - train_frac, got {train_frac}, "
                         f"{test_frac}")
    n = len(data)
    train_end = int(n * train_frac)
    test_end = train_end + int(n * test_frac)
    return {"train": list(data[:train_end]), "validation": list(data[test_end:]), "test": list(data[train_end:test_end])}


# --------------------------------------------------------------------------- prompt


def format_input(entry: Mapping[str, Any]) -> str:
    """The book's Alpaca prompt: the preamble, the instruction, and the input when it is not empty.

    The response header (:data:`RESPONSE_HEADER`, ``"\\n\\n### Response:\\n"``) is not part of it, as in the
    book: training texts append it with the output (:func:`format_response`) and generation strips it.

    Args:
      entry: a record with "instruction" and (possibly empty or missing) "input".

    Returns:
      The prompt text.
    """
    instruction_text = f"{PROMPT_PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return instruction_text + input_text


def format_response(entry: Mapping[str, Any]) -> str:
    """The book's ``response_text``: ``"\\n\\n### Response:\\n" + output``.

    Args:
      entry: a record with "output".

    Returns:
      The text appended to :func:`format_input` to make a training text.
    """
    return f"{RESPONSE_HEADER}{entry['output']}"


# --------------------------------------------------------------------------- batches


def collate(
    items: Sequence[Sequence[int]],
    pad_token_id: int = PAD_TOKEN_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    prompt_lengths: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The book's ``custom_collate_fn`` in numpy (and its exercise 7.2 when ``prompt_lengths`` is given).

    Each item gets one ``pad_token_id`` appended and is padded with it to the longest item + 1; inputs are
    all but the last position, targets all but the first; every pad target after the first is
    ``ignore_index``; with ``prompt_lengths``, ``targets[:prompt_length - 1]`` too (the prompt is not
    trained on); then both are cut to ``allowed_max_length``.

    Args:
      items: token id lists (each non-empty).
      pad_token_id: the end-of-text / padding id.
      ignore_index: the target value the loss ignores.
      allowed_max_length: the widest batch (None: no limit).
      prompt_lengths: per item, the token count of its prompt (None: train on the prompt too, the book).

    Returns:
      ``(inputs, targets)``, int32 of shape (B, W) with ``W = min(longest item, allowed_max_length)``.
    """
    if not items or any(len(it) == 0 for it in items):
        raise ValueError("collate needs at least one item and every item needs at least one token")
    width = max(len(it) for it in items) + 1
    padded = np.full((len(items), width), pad_token_id, np.int64)  # (B, W + 1)
    for row, it in zip(padded, items):
        row[: len(it)] = it
    inputs, targets = padded[:, :-1].copy(), padded[:, 1:].copy()  # (B, W), (B, W)
    for b in range(len(items)):
        pads = np.flatnonzero(targets[b] == pad_token_id)  # as the book, pad ids inside an item count too
        targets[b, pads[1:]] = ignore_index
        if prompt_lengths is not None:
            targets[b, : max(int(prompt_lengths[b]) - 1, 0)] = ignore_index
    if allowed_max_length is not None:
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs.astype(np.int32), targets.astype(np.int32)


def bucket_width(width: int, bucket: int | None, cap: int | None = None) -> int:
    """The padded width of a batch: ``width`` rounded up to a multiple of ``bucket``, at most ``cap``.

    Args:
      width: the batch's exact width.
      bucket: the multiple (None or 0: exact widths).
      cap: the largest width (e.g. the context length; None: no cap).

    Returns:
      The width, >= ``width`` unless ``cap`` is smaller.
    """
    out = width if not bucket else -(-width // bucket) * bucket
    return min(out, cap) if cap is not None else out


class InstructionDataset:
    """Instruction records as token ids, batched as the book's ``custom_collate_fn`` with bucketed widths.

    Attributes:
      encoded_texts: per record, the ids of ``format_input(entry) + format_response(entry)`` (the book's).
      prompt_lengths: per record, the token count of ``tokenizer.encode(format_input(entry))``.
      token_ids: every id the batches can hold (checked against the vocabulary by the training loop).
      pad_token_id, allowed_max_length, bucket, mask_instruction: as given.
    """

    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        tokenizer: Any,
        pad_token_id: int | None = None,
        allowed_max_length: int | None = None,
        bucket: int | None = DEFAULT_BUCKET,
        mask_instruction: bool = False,
    ) -> None:
        """Args:
        data: the records (see :func:`read_instructions`).
        tokenizer: encodes the texts (tiktoken Encoding or any tokenizer with ``encode``).
        pad_token_id: the padding id (default: the tokenizer's ``eot_token``, 50256 for GPT-2, else 50256).
        allowed_max_length: cut batches to this width (the book: 1024; use the model's context length).
        bucket: pad batch widths up to multiples of this (None or 0: the book's exact widths).
        mask_instruction: also ignore the targets of the prompt (the book's exercise 7.2).
        """
        if pad_token_id is None:
            pad_token_id = int(getattr(tokenizer, "eot_token", PAD_TOKEN_ID))
        self.pad_token_id = check_int("pad_token_id", pad_token_id, 0)
        self.allowed_max_length = None if allowed_max_length is None else check_int(
            "allowed_max_length", allowed_max_length, 1)
        self.bucket = None if not bucket else check_int("bucket", bucket, 1)
        self.mask_instruction = bool(mask_instruction)
        self.encoded_texts: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        for i, entry in enumerate(data):
            entry = _record(entry, i, "data")
            prompt = format_input(entry)
            self.encoded_texts.append(list(tokenizer.encode(prompt + format_response(entry))))
            self.prompt_lengths.append(len(tokenizer.encode(prompt)))
        flat = [t for ids in self.encoded_texts for t in ids] + [self.pad_token_id]
        self.token_ids = np.asarray(flat, np.int64)  # (N,)

    def __len__(self) -> int:
        return len(self.encoded_texts)

    def width(self, indices: Sequence[int] | np.ndarray) -> int:
        """The (bucketed) width of the batch of ``indices``."""
        exact = max(len(self.encoded_texts[int(i)]) for i in indices)
        if self.allowed_max_length is not None:
            exact = min(exact, self.allowed_max_length)
        return bucket_width(exact, self.bucket, self.allowed_max_length)

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The records ``indices`` collated as the book, then padded to the bucket width.

        Args:
          indices: record indices, shape (B,).

        Returns:
          ``(inputs, targets)`` int32 (B, W); the bucket padding holds ``pad_token_id`` inputs and
          ``IGNORE_INDEX`` targets, so the loss is the exact-width batch's.
        """
        idx = [int(i) for i in np.asarray(indices).reshape(-1)]
        if not idx:
            raise ValueError("get_batch needs at least one index")
        prompts = [self.prompt_lengths[i] for i in idx] if self.mask_instruction else None
        inputs, targets = collate([self.encoded_texts[i] for i in idx], self.pad_token_id, IGNORE_INDEX,
                                  self.allowed_max_length, prompts)  # (B, W0), (B, W0)
        extra = self.width(idx) - inputs.shape[1]
        if extra > 0:
            inputs = np.pad(inputs, ((0, 0), (0, extra)), constant_values=self.pad_token_id)  # (B, W)
            targets = np.pad(targets, ((0, 0), (0, extra)), constant_values=IGNORE_INDEX)  # (B, W)
        return inputs, targets


def instruction_loaders(
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
    tokenizer: Any,
    batch_size: int = 8,
    seed: int = 123,
    **dataset_kwargs: Any,
) -> dict[str, DataLoader]:
    """The book's loaders: train shuffled with ``drop_last``; validation and test in order, keeping the last
    partial batch.

    Args:
      splits: ``{"train", "validation", "test"}`` -> records (e.g. from :func:`book_split`).
      tokenizer: encodes the texts.
      batch_size: records per batch (the book: 8).
      seed: the training loader's shuffle seed.
      **dataset_kwargs: :class:`InstructionDataset` options (pad_token_id, allowed_max_length, bucket,
        mask_instruction).

    Returns:
      ``{"train", "validation", "test"}`` -> :class:`DataLoader` (116 / 7 / 14 batches for the book's data).
    """
    missing = [k for k in ("train", "validation", "test") if k not in splits]
    if missing:
        raise ValueError(f"splits lacks {missing}")
    loaders = {}
    for name in ("train", "validation", "test"):
        ds = InstructionDataset(splits[name], tokenizer, **dataset_kwargs)
        train = name == "train"
        loaders[name] = DataLoader(ds, batch_size, shuffle=train, drop_last=train, seed=seed)
    return loaders
