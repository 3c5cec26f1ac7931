"""Tokenizers from chapter 2: regex word tokenizers and the GPT-2 byte-pair encoding.

The regex tokenizers (`SimpleTokenizerV1`, `SimpleTokenizerV2`) are the book's teaching
tokenizers; `gpt2_tokenizer` returns tiktoken's "gpt2" encoding, built from local files when
they are available so that nothing needs the network.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tiktoken

__all__ = [
    "ENDOFTEXT",
    "UNK",
    "GPT2_BPE_DIR_ENV",
    "GPT2_FILE_SHA256",
    "Tokenizer",
    "build_vocab",
    "SimpleTokenizerV1",
    "SimpleTokenizerV2",
    "gpt2_tokenizer",
    "ByteTokenizer",
    "TOKENIZERS",
    "get_tokenizer",
    "text_to_token_ids",
    "token_ids_to_text",
]

ENDOFTEXT = "<|endoftext|>"
UNK = "<|unk|>"
GPT2_BPE_DIR_ENV = "FLAXGPT_GPT2_BPE_DIR"

# The SHA-256 digests tiktoken itself expects (tiktoken_ext/openai_public.py, "gpt2").
GPT2_FILE_SHA256: dict[str, str] = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_N_VOCAB = 50257

# The book's split pattern (chapter 2) and the decode clean-ups of V1 and V2.
_SPLIT_RE = re.compile(r'([,.:;?_!"()\']|--|\s)')
_V1_DECODE_RE = re.compile(r'\s+([,.?!"()\'])')
_V2_DECODE_RE = re.compile(r'\s+([,.:;?!"()\'])')

# tiktoken's pattern for "gpt2" (r50k_pat_str); taken from tiktoken when it is exposed there.
_R50K_PAT_STR_FALLBACK = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


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


# --------------------------------------------------------------------------- GPT-2 BPE


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _data_gym_byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character stand-ins for bytes (as in tiktoken.load), in rank order."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    decoder = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            decoder[chr(256 + n)] = b
            n += 1
    return decoder


def _mergeable_ranks(vocab_bpe: str, encoder_json: str) -> dict[bytes, int]:
    """Converts GPT-2's vocab.bpe + encoder.json to tiktoken ranks (tiktoken's own algorithm).

    Reimplemented rather than calling `tiktoken.load.data_gym_to_mergeable_bpe_ranks`, which
    would also copy the local files into tiktoken's temp-dir download cache.
    """
    byte_of = _data_gym_byte_decoder()

    def decode(token: str) -> bytes:
        return bytes(byte_of[c] for c in token)

    # Single bytes first, ranked in the stand-in table's order (printable bytes first).
    ranks = {bytes([b]): i for i, b in enumerate(byte_of.values())}
    for line in vocab_bpe.split("\n")[1:-1]:
        first, second = line.split()
        ranks[decode(first) + decode(second)] = len(ranks)
    encoder = {decode(k): v for k, v in json.loads(encoder_json).items()}
    encoder.pop(ENDOFTEXT.encode(), None)
    encoder.pop(b"<|startoftext|>", None)
    if ranks != encoder:
        raise ValueError(
            "encoder.json does not match vocab.bpe: expected the merge ranks to equal the "
            "encoder ids, as in the GPT-2 release"
        )
    return ranks


def _r50k_pat_str() -> str:
    try:
        from tiktoken_ext.openai_public import r50k_pat_str
    except ImportError:
        return _R50K_PAT_STR_FALLBACK
    return str(r50k_pat_str)


@functools.lru_cache(maxsize=8)
def _gpt2_from_dir(directory: str, stamp: tuple[int, ...]) -> tiktoken.Encoding:
    """Builds (once per directory and file version) the "gpt2" encoding from local files."""
    del stamp  # Only part of the cache key: a changed file gives a new entry.
    root = Path(directory)
    for name, expected in GPT2_FILE_SHA256.items():
        actual = _sha256(root / name)
        if actual != expected:
            raise ValueError(
                f"SHA-256 mismatch for {root / name}: got {actual}, expected {expected} "
                "(the digest tiktoken expects for GPT-2); the file is corrupt or not GPT-2's"
            )
    ranks = _mergeable_ranks(
        (root / "vocab.bpe").read_text(encoding="utf-8"),
        (root / "encoder.json").read_text(encoding="utf-8"),
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=_r50k_pat_str(),
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: GPT2_N_VOCAB - 1},
        explicit_n_vocab=GPT2_N_VOCAB,
    )


def _missing_files(root: Path) -> list[str]:
    return [name for name in GPT2_FILE_SHA256 if not (root / name).is_file()]


def _load_dir(root: Path) -> tiktoken.Encoding:
    """The cached encoding of a folder, keyed by its real path and its files' mtime/size."""
    root = root.expanduser().resolve()
    stamp: tuple[int, ...] = ()
    for name in sorted(GPT2_FILE_SHA256):
        st = (root / name).stat()
        stamp += (st.st_mtime_ns, st.st_size)
    return _gpt2_from_dir(str(root), stamp)


def gpt2_tokenizer(bpe_dir: str | os.PathLike[str] | None = None) -> tiktoken.Encoding:
    """Returns tiktoken's "gpt2" encoding (50,257 tokens, `<|endoftext|>` = 50256).

    Places tried, in order: `bpe_dir`; the folder in the environment variable
    `FLAXGPT_GPT2_BPE_DIR`; tiktoken's own download/cache (`tiktoken.get_encoding("gpt2")`).
    A folder is used when it holds both `encoder.json` and `vocab.bpe`; their SHA-256 digests
    must match the ones tiktoken expects. Encodings built from a folder are cached per folder.

    Args:
      bpe_dir: optional folder with GPT-2's `encoder.json` and `vocab.bpe`.

    Returns:
      The encoding; identical to `tiktoken.get_encoding("gpt2")`.

    Raises:
      ValueError: a folder's files do not have the expected SHA-256 digests.
      RuntimeError: no place worked; the message lists the places tried.
    """
    tried: list[str] = []
    candidates: list[tuple[str, str | os.PathLike[str] | None]] = [
        ("bpe_dir argument", bpe_dir),
        (f"${GPT2_BPE_DIR_ENV}", os.environ.get(GPT2_BPE_DIR_ENV) or None),
    ]
    for label, value in candidates:
        if value is None:
            tried.append(f"{label}: not set")
            continue
        root = Path(value).expanduser()
        missing = _missing_files(root)
        if missing:
            tried.append(f"{label} = {str(root)!r}: missing {', '.join(missing)}")
            continue
        return _load_dir(root)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # noqa: BLE001 - any failure here is reported with the others.
        tried.append(f'tiktoken.get_encoding("gpt2"): {type(e).__name__}: {e}')
    raise RuntimeError(
        "could not load the GPT-2 tokenizer. Tried:\n  - "
        + "\n  - ".join(tried)
        + f"\nSupply a folder with GPT-2's encoder.json and vocab.bpe as `bpe_dir` or in "
        f"${GPT2_BPE_DIR_ENV}, or let tiktoken download them (network access, or a "
        "pre-filled TIKTOKEN_CACHE_DIR)."
    )


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


TOKENIZERS = ("gpt2", "bytes")


def get_tokenizer(name: str) -> Any:
    """Returns a tokenizer by the name stored in checkpoints: "gpt2" (see `gpt2_tokenizer`) or "bytes".

    Args:
      name: one of `TOKENIZERS`.

    Returns:
      An object with `encode`, `decode`, `n_vocab` and `eot_token`.
    """
    if name == "gpt2":
        return gpt2_tokenizer()
    if name == "bytes":
        return ByteTokenizer()
    raise ValueError(f"unknown tokenizer {name!r}; expected one of {TOKENIZERS}")


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
        raise ValueError(f"ids has dtype {arr.dtype}: expected integer token ids")
    return tokenizer.decode([int(i) for i in arr])
