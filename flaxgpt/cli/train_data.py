"""``flaxgpt train``'s text and tokenizer (flaxgpt/cli/train.py): the training tokenizer ("auto": GPT-2's BPE,
or offline a BPE learned from the corpus), the text with its hash, and the checked training and validation
loaders."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any

from flaxgpt.cli import CLIError, write_errors

__all__ = ["LEARNED_VOCAB", "TrainData", "load_data", "read_text", "tokenizer_words", "training_tokenizer"]

LEARNED_VOCAB = 4096  # tokens of the BPE that `--tokenizer learned` (or auto, offline) learns from the corpus


def training_tokenizer(name: str, train_text: str | None = None, out: Path | None = None) -> tuple[Any, str]:
    """The training tokenizer and its name. "auto" takes GPT-2's BPE when it can be loaded (local files or
    tiktoken's cache/download), else learns a BPE from ``train_text``, so that the default run works offline
    and still trains on words; a learned one is saved as ``out/tokenizer.json`` (and in the cache)."""
    from flaxgpt.text.tokenizers import ByteTokenizer, get_tokenizer

    log = logging.getLogger(__name__)
    if name == "bytes":
        return ByteTokenizer(), name
    if name in ("gpt2", "auto"):
        try:
            return get_tokenizer("gpt2"), "gpt2"
        except RuntimeError as e:
            if name == "gpt2":
                raise CLIError("GPT-2's BPE files are not available (set FLAXGPT_GPT2_BPE_DIR to a folder with "
                               "encoder.json and vocab.bpe, or go online; or use --tokenizer learned)") from e
            log.info("tokenizer: GPT-2's BPE files are not available offline (set FLAXGPT_GPT2_BPE_DIR or go "
                     "online for them); learning a %d-token BPE from the training text instead", LEARNED_VOCAB)
    if name.startswith("bpe-"):  # a resumed run's learned tokenizer
        try:
            return get_tokenizer(name, near=out), name
        except ValueError as e:
            raise CLIError(str(e)) from e
    return _learn(train_text or "", out)


def tokenizer_words(name: str) -> str:
    """A tokenizer's name as the summary lines show it."""
    if name.startswith("bpe-"):
        return f"{name} (BPE learned from the corpus)"
    return {"gpt2": "gpt2 (GPT-2's BPE)", "bytes": "bytes (UTF-8 bytes)"}.get(name, name)


def _learn(train_text: str, out: Path | None) -> tuple[Any, str]:
    """Learns the run's BPE from its training text; saves it in the run folder and the cache."""
    from flaxgpt.text.corpora import cache_dir
    from flaxgpt.text.learned_bpe import TOKENIZER_FILE, learned_name, learned_tokenizer, save_learned, train_bpe

    t0 = time.perf_counter()
    tokens = train_bpe(train_text, LEARNED_VOCAB)
    name = learned_name(tokens)
    with write_errors(out or Path(".")):
        if out is not None:
            save_learned(out / TOKENIZER_FILE, tokens)
    with contextlib.suppress(OSError):  # the cache is a convenience: a read-only home is fine
        save_learned(cache_dir() / "tokenizers" / f"{name}.json", tokens)
    logging.getLogger(__name__).info("tokenizer: %s, a %d-token BPE learned from the training text in %.1fs",
                                     name, len(tokens) + 1, time.perf_counter() - t0)
    return learned_tokenizer(tokens, name), name


@dataclasses.dataclass
class TrainData:
    """The tokenized text, its loaders and its hash."""

    train_loader: Any
    val_loader: Any
    train_tokens: int
    val_tokens: int
    text_sha: str


def read_text(s: dict[str, Any], saved_sha: str | None) -> tuple[str, str]:
    """The run's text and its SHA-256, with one-line errors (a missing file, a changed text on resume)."""
    from flaxgpt.text.corpora import load_text

    try:
        text = load_text(s["text"])
    except ConnectionError as e:
        raise CLIError(str(e).splitlines()[0]) from e
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if saved_sha not in (None, text_sha):
        raise CLIError(f"the text {s['text']!r} differs from the one the checkpoint was trained on")
    return text, text_sha


def load_data(s: dict[str, Any], cfg: Any, tok: Any, text: str, text_sha: str) -> TrainData:
    """Splits and tokenizes the text into the training and validation loaders, with one-line errors."""
    from flaxgpt.data.windows import DataLoader, train_val_split
    from flaxgpt.text.tokenizers import text_to_token_ids

    stride = s["stride"] or cfg.context_length
    if cfg.vocab_size < tok.n_vocab:
        raise CLIError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tok.n_vocab} tokens")
    train_text, val_text = train_val_split(text, 1.0 - s["val_ratio"])
    train_ids = text_to_token_ids(train_text, tok)[0]  # (N,)
    val_ids = text_to_token_ids(val_text, tok)[0]  # (M,)
    need = cfg.context_length + 1
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if ids.size < need:
            raise CLIError(
                f"the {name} split has {ids.size} tokens; one window needs context length + 1 = {need} "
                "(use more text, a shorter --context-length or another --val-ratio)"
            )
    windows = len(range(0, train_ids.size - cfg.context_length, stride))
    if windows < s["batch_size"]:
        raise CLIError(
            f"the training split gives {windows} windows of {cfg.context_length} tokens, fewer than "
            f"--batch-size {s['batch_size']} (use more text, or a smaller --batch-size, --stride or "
            "--context-length)"
        )
    train_loader = DataLoader.from_token_ids(
        train_ids, s["batch_size"], cfg.context_length, stride, shuffle=True, drop_last=True, seed=s["seed"]
    )
    val_loader = DataLoader.from_token_ids(
        val_ids, s["batch_size"], cfg.context_length, stride, shuffle=False, drop_last=False
    )
    return TrainData(train_loader, val_loader, train_ids.size, val_ids.size, text_sha)
