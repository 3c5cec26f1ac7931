"""A byte-level BPE learned from a corpus (the book's chapter-2 bonus: BPE from scratch), for runs without
GPT-2's BPE files.

:func:`train_bpe` learns merges over the corpus' pre-tokens (GPT-2's regular expression, so words keep their
leading space) and returns the ranks that tiktoken encodes with: the 256 bytes, then each merged token in
the order it was learned, which is exactly what tiktoken's lowest-rank-first merging replays.
:func:`learned_tokenizer` wraps them in a ``tiktoken.Encoding`` with ``<|endoftext|>`` as the last id;
:func:`save_learned` / :func:`load_learned` keep them as one JSON file (the tokens base64-encoded), named by
the SHA-256 of its content, so a checkpoint records the name and any copy of the file gives the same ids.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import regex
import tiktoken

from flaxgpt.files import atomic_file
from flaxgpt.validation import check_int

__all__ = ["GPT2_PATTERN", "LEARNED_PREFIX", "TOKENIZER_FILE", "train_bpe", "learned_tokenizer", "learned_name",
           "save_learned", "load_learned"]

# GPT-2's pre-tokenizer (tiktoken's "gpt2" pat_str): contractions, letters, digits, other runs, spaces.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LEARNED_PREFIX = "bpe-"  # tokenizer names "bpe-<12 hex digits>" are learned ones
TOKENIZER_FILE = "tokenizer.json"
EOT = "<|endoftext|>"


def train_bpe(text: str, vocab_size: int = 4096) -> list[bytes]:
    """Learns byte-level BPE merges from ``text``.

    Args:
      text: the corpus.
      vocab_size: tokens in all, including the 256 bytes and ``<|endoftext|>`` (>= 258); fewer when the
        corpus runs out of pairs to merge.

    Returns:
      The tokens in rank order: the 256 single bytes, then the merged tokens in the order learned.
    """
    vocab_size = check_int("vocab_size", vocab_size, 258)
    words = Counter(regex.findall(GPT2_PATTERN, text))
    seqs = [[bytes([b]) for b in w.encode("utf-8")] for w in words]
    freqs = list(words.values())
    pairs: Counter = Counter()
    where: defaultdict = defaultdict(set)
    for i, seq in enumerate(seqs):
        for pair in zip(seq, seq[1:]):
            pairs[pair] += freqs[i]
            where[pair].add(i)
    tokens = [bytes([b]) for b in range(256)]
    while len(tokens) < vocab_size - 1 and pairs:
        (a, b), count = max(pairs.items(), key=lambda kv: kv[1])
        if count < 2:
            break
        merged = a + b
        tokens.append(merged)
        for i in where.pop((a, b), ()):
            seq, f = seqs[i], freqs[i]
            for pair in zip(seq, seq[1:]):  # take the word's old pairs out
                pairs[pair] -= f
                if pairs[pair] <= 0:
                    del pairs[pair]
            out, j = [], 0
            while j < len(seq):
                if j + 1 < len(seq) and seq[j] == a and seq[j + 1] == b:
                    out.append(merged)
                    j += 2
                else:
                    out.append(seq[j])
                    j += 1
            seqs[i] = out
            for pair in zip(out, out[1:]):  # and its new ones in
                pairs[pair] += f
                where[pair].add(i)
    return tokens


def learned_name(tokens: list[bytes]) -> str:
    """The tokenizer's name: ``bpe-`` and 12 hex digits of the SHA-256 of its tokens."""
    digest = hashlib.sha256(b"\0".join(base64.b64encode(t) for t in tokens)).hexdigest()
    return f"{LEARNED_PREFIX}{digest[:12]}"


def learned_tokenizer(tokens: list[bytes], name: str | None = None) -> tiktoken.Encoding:
    """A tiktoken encoding over learned tokens, ``<|endoftext|>`` last (``n_vocab = len(tokens) + 1``).

    Args:
      tokens: from :func:`train_bpe` (rank order).
      name: the encoding's name (default :func:`learned_name`).

    Returns:
      The encoding (``encode``, ``decode``, ``n_vocab``, ``eot_token`` as GPT-2's).
    """
    if len(tokens) < 256 or tokens[:256] != [bytes([b]) for b in range(256)]:
        raise ValueError("a learned BPE starts with the 256 single bytes, in order")
    ranks = {t: i for i, t in enumerate(tokens)}
    if len(ranks) != len(tokens):
        raise ValueError("a learned BPE has a repeated token")
    return tiktoken.Encoding(name=name or learned_name(tokens), pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={EOT: len(tokens)})


def save_learned(path: str | os.PathLike[str], tokens: list[bytes]) -> Path:
    """Writes the tokens as JSON (atomically): ``{"name", "pattern", "special", "tokens": [base64, ...]}``.

    Args:
      path: the file.
      tokens: from :func:`train_bpe`.

    Returns:
      The file.
    """
    path = Path(path)
    data = {"format": "flaxgpt-learned-bpe", "version": 1, "name": learned_name(tokens), "pattern": GPT2_PATTERN,
            "special": {EOT: len(tokens)}, "tokens": [base64.b64encode(t).decode("ascii") for t in tokens]}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        f.write(json.dumps(data).encode("utf-8"))
    return path


def load_learned(path: str | os.PathLike[str], name: str | None = None) -> tiktoken.Encoding:
    """Reads a file of :func:`save_learned`, checking that its tokens give ``name`` when one is expected.

    Args:
      path: the file.
      name: the expected tokenizer name (e.g. a checkpoint's), or None.

    Returns:
      The encoding.

    Raises:
      ValueError: the file is not a learned BPE, or is another one than ``name``.
    """
    try:
        data: Any = json.loads(Path(path).read_text(encoding="utf-8"))
        tokens = [base64.b64decode(t) for t in data["tokens"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a flaxgpt learned-BPE file: {e}") from e
    found = learned_name(tokens)
    if name is not None and found != name:
        raise ValueError(f"{path} holds tokenizer {found}, not {name}")
    return learned_tokenizer(tokens, found)
