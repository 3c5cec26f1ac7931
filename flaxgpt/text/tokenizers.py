"""Tokenizers of chapter 2: the book's regex word tokenizers, UTF-8 bytes, lookup by name, text <-> ids.

The regex tokenizers (`SimpleTokenizerV1`, `SimpleTokenizerV2`) are the book's teaching tokenizers;
GPT-2's BPE is in :mod:`flaxgpt.text.bpe`.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tiktoken

from flaxgpt.text.bpe import ENDOFTEXT, gpt2_tokenizer
from flaxgpt.validation import check_token_ids

__all__ = [
    "ENDOFTEXT",
    "UNK",
    "Tokenizer",
    "build_vocab",
    "SimpleTokenizerV1",
    "SimpleTokenizerV2",
    "ByteTokenizer",
    "TOKENIZERS",
    "find_learned_file",
    "get_tokenizer",
    "text_to_token_ids",
    "token_ids_to_text",
]


UNK = "<|unk|>"


# The book's split pattern (chapter 2) and the decode clean-ups of V1 and V2.
_SPLIT_RE = re.compile(r'([,.:;?_!"()\']|--|\s)')
_V1_DECODE_RE = re.compile(r'\s+([,.?!"()\'])')
_V2_DECODE_RE = re.compile(r'\s+([,.:;?!"()\'])')


class Tokenizer(Protocol):
    """Anything with `encode(str) -> list[int]` and `decode(list[int]) -> str`."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def _split(text: str) -> list[str]:
    """Splits text as the book does: on punctuation, '--' and whitespace; drops blanks."""
    return [item.strip() for item in _SPLIT_RE.split(text) if item.strip()]


def build_vocab(text: str) -> dict[str, int]:
    """Builds the book's word-level vocabulary from a text.

    Args:
      text: the training text.

    Returns:
      A mapping token -> id: the sorted unique tokens of `text`, then `<|endoftext|>` and
      `<|unk|>` as the last two ids.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    words = sorted(set(_split(text)) - {ENDOFTEXT, UNK})
    words.extend([ENDOFTEXT, UNK])
    return {token: i for i, token in enumerate(words)}


class SimpleTokenizerV1:
    """The book's first regex tokenizer: every word must be in the vocabulary.

    Args:
      vocab: a mapping token -> id, e.g. from `build_vocab`.
    """

    def __init__(self, vocab: Mapping[str, int]) -> None:
        self.str_to_int: dict[str, int] = dict(vocab)
        self.int_to_str: dict[int, str] = {i: s for s, i in self.str_to_int.items()}
        if len(self.int_to_str) != len(self.str_to_int):
            raise ValueError(
                f"vocab maps {len(self.str_to_int)} tokens to only {len(self.int_to_str)} "
                "distinct ids; expected one id per token"
            )

    def _lookup(self, token: str) -> int:
        try:
            return self.str_to_int[token]
        except KeyError:
            raise ValueError(
                f"unknown token {token!r}: not in the vocabulary of {len(self.str_to_int)} "
                "tokens (SimpleTokenizerV2 maps unknown words to <|unk|>)"
            ) from None

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids.

        Args:
          text: the text to encode.

        Returns:
          The token ids.

        Raises:
          ValueError: a word of `text` is not in the vocabulary (the message names it).
        """
        return [self._lookup(token) for token in _split(text)]

    def _join(self, ids: Iterable[int]) -> str:
        words = []
        for i in ids:
            try:
                words.append(self.int_to_str[int(i)])
            except KeyError:
                raise ValueError(
                    f"unknown token id {int(i)}: expected an id of this vocabulary "
                    f"(0..{len(self.int_to_str) - 1})"
                ) from None
        return " ".join(words)

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text, removing the spaces before punctuation as the book does.

        Args:
          ids: token ids.

        Returns:
          The text.
        """
        return _V1_DECODE_RE.sub(r"\1", self._join(ids))


class SimpleTokenizerV2(SimpleTokenizerV1):
    """The book's second regex tokenizer: unknown words become `<|unk|>`.

    Args:
      vocab: a mapping token -> id that contains `<|unk|>` (and usually `<|endoftext|>`).
    """

    def __init__(self, vocab: Mapping[str, int]) -> None:
        super().__init__(vocab)
        if UNK not in self.str_to_int:
            raise ValueError(f"vocab has no {UNK!r} token; SimpleTokenizerV2 needs one")

    def encode(self, text: str) -> list[int]:
        """Encodes text to ids, mapping words outside the vocabulary to `<|unk|>`.

        Args:
          text: the text to encode.

        Returns:
          The token ids.
        """
        unk = self.str_to_int[UNK]
        return [self.str_to_int.get(token, unk) for token in _split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids to text (the book's V2 clean-up, which also handles ':' and ';').

        Args:
          ids: token ids.

        Returns:
          The text.
        """
        return _V2_DECODE_RE.sub(r"\1", self._join(ids))


# --------------------------------------------------------------------------- bytes, and by name


class ByteTokenizer:
    """UTF-8 bytes as tokens (ids 0-255) plus `<|endoftext|>` (256): needs no files at all.

    The fallback of `flaxgpt train` when GPT-2's BPE files cannot be found offline; also handy for tiny
    models, whose output head would otherwise be dominated by GPT-2's 50,257-token vocabulary.
    """

    name = "bytes"
    n_vocab = 257
    eot_token = 256

    def encode(self, text: str, **_: Any) -> list[int]:
        """Encodes text; the literal string `<|endoftext|>` becomes id 256."""
        ids: list[int] = []
        for i, part in enumerate(text.split(ENDOFTEXT)):
            if i:
                ids.append(self.eot_token)
            ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decodes ids; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
        out, chunk = [], bytearray()
        for i in ids:
            i = int(i)
            if not 0 <= i < self.n_vocab:
                raise ValueError(f"token id {i} is outside the byte vocabulary [0, {self.n_vocab})")
            if i == self.eot_token:
                out.append(chunk.decode("utf-8", errors="replace") + ENDOFTEXT)
                chunk = bytearray()
            else:
                chunk.append(i)
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)


TOKENIZERS = ("gpt2", "bytes", "bpe-<hash>")


def get_tokenizer(name: str, near: str | os.PathLike[str] | None = None) -> Any:
    """Returns a tokenizer by the name stored in checkpoints: "gpt2" (see `gpt2_tokenizer`), "bytes", or a
    BPE learned from a run's corpus ("bpe-<12 hex digits>", :mod:`flaxgpt.text.learned_bpe`).

    A learned tokenizer is read from the ``tokenizer.json`` of ``near`` (a run folder, a checkpoint folder
    or a file in one, and the folders above it), else from flaxgpt's cache (``<cache>/tokenizers/``).

    Args:
      name: the tokenizer's name.
      near: where the run lives, to find a learned tokenizer's file.

    Returns:
      An object with `encode`, `decode`, `n_vocab` and `eot_token`.

    Raises:
      ValueError: an unknown name, or a learned tokenizer whose file is not found.
    """
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "bytes":
        return ByteTokenizer()
    from flaxgpt.text.learned_bpe import LEARNED_PREFIX, load_learned

    if not str(name).startswith(LEARNED_PREFIX):
        raise ValueError(f"unknown tokenizer {name!r}; expected one of {TOKENIZERS}")
    path = find_learned_file(name, near)
    if path is not None:
        return load_learned(path, name)
    raise ValueError(f"the run's tokenizer {name} (a BPE learned from its corpus) is not found: its "
                     f"{'tokenizer.json'} should be in the run folder{f' ({near})' if near else ''}")


def find_learned_file(name: str, near: str | os.PathLike[str] | None = None) -> Path | None:
    """The file of the learned tokenizer ``name``: the ``tokenizer.json`` of ``near`` or of one of the three
    folders above it that holds this tokenizer, else the cache's copy; None when there is none.

    Args:
      name: a learned tokenizer's name ("bpe-<12 hex digits>").
      near: a run folder, checkpoint folder or file in a run.

    Returns:
      The file, or None.
    """
    from flaxgpt.text.corpora import cache_dir
    from flaxgpt.text.learned_bpe import TOKENIZER_FILE, load_learned

    places = []
    if near is not None:
        p = Path(near).expanduser()
        places += [q / TOKENIZER_FILE for q in (p, *list(p.parents)[:3])]
    for path in [*places, cache_dir() / "tokenizers" / f"{name}.json"]:
        if path.is_file():
            with contextlib.suppress(ValueError):  # another run's tokenizer: keep looking
                load_learned(path, name)
                return path
    return None


# --------------------------------------------------------------------------- text <-> ids


def text_to_token_ids(text: str, tokenizer: Any) -> np.ndarray:
    """Encodes text to a batch of one sequence, allowing `<|endoftext|>`.

    Args:
      text: the text to encode.
      tokenizer: a tiktoken `Encoding` or any `Tokenizer`.

    Returns:
      int32 array of shape (1, T).
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if isinstance(tokenizer, tiktoken.Encoding):
        ids = tokenizer.encode(text, allowed_special={ENDOFTEXT})
    else:
        ids = tokenizer.encode(text)
    return np.asarray(ids, dtype=np.int32).reshape(1, -1)  # (1, T)


def token_ids_to_text(ids: Any, tokenizer: Any) -> str:
    """Decodes a sequence of token ids to text.

    Args:
      ids: shape (T,) or (1, T); a list, numpy array or jax array of ints.
      tokenizer: a tiktoken `Encoding` or any `Tokenizer`.

    Returns:
      The decoded text.

    Raises:
      ValueError: an id is outside the tokenizer's vocabulary (``n_vocab``; the regex tokenizers check
        their own id table), naming the id.
    """
    arr = np.asarray(ids)
    if arr.ndim == 2:
        if arr.shape[0] != 1:
            raise ValueError(
                f"ids has shape {arr.shape}: expected (T,) or (1, T); decode a batch row by row"
            )
        arr = arr[0]
    elif arr.ndim != 1:
        raise ValueError(f"ids has shape {arr.shape}: expected (T,) or (1, T)")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        big = [i for i in arr.tolist() if isinstance(i, int) and not isinstance(i, bool)]
        if arr.dtype != object or len(big) != arr.size:  # object: ints too large for int64
            raise ValueError(f"ids has dtype {arr.dtype}: expected integer token ids")
        bad = next(i for i in big if not -(2**63) <= i < 2**63)
        raise ValueError(f"token ids contain {bad}, outside {_vocab_text(tokenizer)}")
    n_vocab = getattr(tokenizer, "n_vocab", None)
    if n_vocab is not None:
        check_token_ids(arr, int(n_vocab))
    return tokenizer.decode([int(i) for i in arr])


def _vocab_text(tokenizer: Any) -> str:
    n_vocab = getattr(tokenizer, "n_vocab", None)
    return f"the vocabulary [0, {n_vocab})" if n_vocab is not None else "the tokenizer's vocabulary"
