"""GPT-2's byte-pair encoding (book section 2.5) through tiktoken, built from local files when given.

:func:`gpt2_tokenizer` returns tiktoken's "gpt2" encoding; from a folder holding ``encoder.json`` and
``vocab.bpe`` (checked against the SHA-256 digests tiktoken expects) it needs no network.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import tiktoken

from flaxgpt.files import sha256_file

ENDOFTEXT = "<|endoftext|>"

__all__ = ["GPT2_BPE_DIR_ENV", "GPT2_FILE_SHA256", "GPT2_N_VOCAB", "gpt2_tokenizer"]

GPT2_BPE_DIR_ENV = "FLAXGPT_GPT2_BPE_DIR"


# The SHA-256 digests tiktoken itself expects (tiktoken_ext/openai_public.py, "gpt2").
GPT2_FILE_SHA256: dict[str, str] = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}


GPT2_N_VOCAB = 50257


# tiktoken's pattern for "gpt2" (r50k_pat_str); taken from tiktoken when it is exposed there.
_R50K_PAT_STR_FALLBACK = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


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
        actual = sha256_file(root / name)
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
        f"GPT-2's BPE files are not available: put encoder.json and vocab.bpe in a folder named by "
        f"${GPT2_BPE_DIR_ENV} (or pass bpe_dir), or let tiktoken download them (network access, or a "
        f"pre-filled TIKTOKEN_CACHE_DIR). Tried: " + "; ".join(tried)
    )
