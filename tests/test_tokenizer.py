"""Tests for flaxgpt.text.tokenizers: the book's regex tokenizers and the GPT-2 BPE."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import tiktoken.registry
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxgpt.text.bpe import GPT2_BPE_DIR_ENV, gpt2_tokenizer
from flaxgpt.text.tokenizers import (
    ENDOFTEXT,
    UNK,
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    text_to_token_ids,
    token_ids_to_text,
)

# The URLs tiktoken_ext/openai_public.py reads for "gpt2"; tiktoken's cache key is their SHA-1.
_TIKTOKEN_GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}

BOOK_V1_TEXT = (
    '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
)
BOOK_V1_IDS = [1, 56, 2, 850, 988, 602, 533, 746, 5, 1126, 596, 5, 1, 67, 7, 38, 851, 1108,
               754, 793, 7]
BOOK_V2_TEXT = (
    "Hello, do you like tea? <|endoftext|> In the sunlit terraces of the palace."
)
BOOK_V2_IDS = [1131, 5, 355, 1126, 628, 975, 10, 1130, 55, 988, 956, 984, 722, 988, 1131, 7]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiktoken_cache(tmp_path_factory: pytest.TempPathFactory, gpt2_bpe_dir: Path) -> Path:
    """A TIKTOKEN_CACHE_DIR pre-filled with the GPT-2 files under tiktoken's cache keys."""
    cache = tmp_path_factory.mktemp("tiktoken_cache")
    for name, url in _TIKTOKEN_GPT2_URLS.items():
        shutil.copyfile(gpt2_bpe_dir / name, cache / hashlib.sha1(url.encode()).hexdigest())
    return cache


def _tiktoken_own_gpt2(mp: pytest.MonkeyPatch, cache: Path) -> tiktoken.Encoding:
    """Has tiktoken's own constructor build "gpt2" afresh from the pre-filled cache."""
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    mp.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    return tiktoken.get_encoding("gpt2")


@pytest.fixture(scope="session")
def tiktoken_gpt2(tiktoken_cache: Path) -> tiktoken.Encoding:
    """tiktoken.get_encoding("gpt2"), built by tiktoken itself (it verifies the hashes)."""
    with pytest.MonkeyPatch.context() as mp:
        return _tiktoken_own_gpt2(mp, tiktoken_cache)


@pytest.fixture(scope="session")
def verdict_vocab(verdict_text: str) -> dict[str, int]:
    return build_vocab(verdict_text)


# --------------------------------------------------------------------------- regex tokenizers


def test_build_vocab_small() -> None:
    vocab = build_vocab("Hello, world. Is this-- a test?")
    tokens = [",", "--", ".", "?", "Hello", "Is", "a", "test", "this", "world"]
    assert list(vocab) == sorted(tokens) + [ENDOFTEXT, UNK]
    assert list(vocab.values()) == list(range(len(vocab)))


def test_build_vocab_special_tokens_in_text_are_not_duplicated() -> None:
    vocab = build_vocab("a <|endoftext|> b <|unk|>")
    assert vocab == {"a": 0, "b": 1, ENDOFTEXT: 2, UNK: 3}


def test_build_vocab_rejects_non_str() -> None:
    with pytest.raises(ValueError, match="text must be a str"):
        build_vocab(b"bytes")  # type: ignore[arg-type]


def test_verdict_vocab_size(verdict_vocab: dict[str, int]) -> None:
    assert len(verdict_vocab) == 1132
    assert verdict_vocab[ENDOFTEXT] == 1130
    assert verdict_vocab[UNK] == 1131


def test_v1_book_sentence(verdict_vocab: dict[str, int]) -> None:
    tok = SimpleTokenizerV1(verdict_vocab)
    ids = tok.encode(BOOK_V1_TEXT)
    assert ids == BOOK_V1_IDS
    # The book's decode removes the space before the apostrophe but not after it.
    assert tok.decode(ids) == (
        '" It\' s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    )


def test_v1_rejects_unknown_word(verdict_vocab: dict[str, int]) -> None:
    tok = SimpleTokenizerV1(verdict_vocab)
    with pytest.raises(ValueError, match="'Hello'"):
        tok.encode("Hello, do you like tea?")


def test_v1_decode_rejects_unknown_id() -> None:
    tok = SimpleTokenizerV1(build_vocab("a b"))
    with pytest.raises(ValueError, match="unknown token id 99"):
        tok.decode([0, 99])


def test_v1_rejects_vocab_with_repeated_ids() -> None:
    with pytest.raises(ValueError, match="distinct ids"):
        SimpleTokenizerV1({"a": 0, "b": 0})


def test_v2_book_sentence(verdict_vocab: dict[str, int]) -> None:
    tok = SimpleTokenizerV2(verdict_vocab)
    ids = tok.encode(BOOK_V2_TEXT)
    assert ids == BOOK_V2_IDS
    assert tok.decode(ids) == (
        "<|unk|>, do you like tea? <|endoftext|> In the sunlit terraces of the <|unk|>."
    )


def test_v2_decode_handles_colon_and_semicolon() -> None:
    tok = SimpleTokenizerV2(build_vocab("a: b; c"))
    assert tok.decode(tok.encode("a: b; c")) == "a: b; c"
    assert SimpleTokenizerV1(build_vocab("a: b; c")).decode(tok.encode("a: b; c")) == "a : b ; c"


def test_v2_needs_unk() -> None:
    with pytest.raises(ValueError, match="<\\|unk\\|>"):
        SimpleTokenizerV2({"a": 0})


# --------------------------------------------------------------------------- GPT-2 BPE


def test_gpt2_sizes(gpt2_tok: tiktoken.Encoding) -> None:
    assert gpt2_tok.n_vocab == 50257
    assert gpt2_tok.eot_token == 50256
    assert gpt2_tok.encode(ENDOFTEXT, allowed_special={ENDOFTEXT}) == [50256]


def test_verdict_figures(verdict_text: str, gpt2_tok: tiktoken.Encoding) -> None:
    assert len(verdict_text) == 20479
    assert len(gpt2_tok.encode(verdict_text)) == 5145


def test_gpt2_identical_to_tiktoken(
    gpt2_tok: tiktoken.Encoding, tiktoken_gpt2: tiktoken.Encoding, verdict_text: str
) -> None:
    assert gpt2_tok is not tiktoken_gpt2
    assert gpt2_tok._mergeable_ranks == tiktoken_gpt2._mergeable_ranks
    assert gpt2_tok._special_tokens == tiktoken_gpt2._special_tokens
    assert gpt2_tok._pat_str == tiktoken_gpt2._pat_str
    assert gpt2_tok.n_vocab == tiktoken_gpt2.n_vocab
    samples = [
        verdict_text,
        "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace.",
        "Akwirw ier",
        "  spaces\t\ttabs\n\nnewlines 12345 ünïcödé 中文 🙂 it's we'll",
    ]
    for text in samples:
        ours = gpt2_tok.encode(text, allowed_special={ENDOFTEXT})
        assert ours == tiktoken_gpt2.encode(text, allowed_special={ENDOFTEXT})
        assert gpt2_tok.decode(ours) == text


def test_gpt2_cached_per_directory(gpt2_bpe_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = gpt2_tokenizer(gpt2_bpe_dir)
    assert gpt2_tokenizer(str(gpt2_bpe_dir)) is first
    monkeypatch.setenv(GPT2_BPE_DIR_ENV, str(gpt2_bpe_dir))
    assert gpt2_tokenizer() is first


def _copy_bpe_files(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(src / name, dst / name)
    return dst


def test_gpt2_hash_mismatch(gpt2_bpe_dir: Path, tmp_path: Path) -> None:
    bad = _copy_bpe_files(gpt2_bpe_dir, tmp_path / "bad")
    with open(bad / "vocab.bpe", "ab") as f:
        f.write(b"x")
    with pytest.raises(ValueError, match=r"SHA-256 mismatch for .*vocab\.bpe.*expected 1ce1664"):
        gpt2_tokenizer(bad)


def test_gpt2_missing_dir_falls_through_to_env(
    gpt2_bpe_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(GPT2_BPE_DIR_ENV, str(gpt2_bpe_dir))
    assert gpt2_tokenizer(tmp_path).n_vocab == 50257


def test_gpt2_nothing_worked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> tiktoken.Encoding:
        raise ConnectionError("no network")

    monkeypatch.delenv(GPT2_BPE_DIR_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError) as info:
        gpt2_tokenizer()
    message = str(info.value)
    assert "bpe_dir argument: not set" in message
    assert f"${GPT2_BPE_DIR_ENV}: not set" in message
    assert 'tiktoken.get_encoding("gpt2"): ConnectionError: no network' in message
    assert "encoder.json and vocab.bpe" in message

    with pytest.raises(RuntimeError, match="missing encoder.json, vocab.bpe"):
        gpt2_tokenizer(tmp_path)


def test_gpt2_falls_back_to_tiktoken(
    tiktoken_cache: Path, gpt2_tok: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(GPT2_BPE_DIR_ENV, raising=False)
    expected = _tiktoken_own_gpt2(monkeypatch, tiktoken_cache)
    enc = gpt2_tokenizer()
    assert enc is expected
    assert enc.encode("Hello world") == gpt2_tok.encode("Hello world") == [15496, 995]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=200))
def test_gpt2_round_trip(gpt2_tok: tiktoken.Encoding, text: str) -> None:
    ids = gpt2_tok.encode(text, disallowed_special=())
    assert all(0 <= i < 50256 for i in ids)
    assert gpt2_tok.decode(ids) == text


# --------------------------------------------------------------------------- text <-> ids


def test_text_to_token_ids(gpt2_tok: tiktoken.Encoding) -> None:
    ids = text_to_token_ids("Hello world<|endoftext|>", gpt2_tok)
    assert ids.shape == (1, 3) and ids.dtype == np.int32
    assert ids.tolist() == [[15496, 995, 50256]]


def test_token_ids_to_text_shapes(gpt2_tok: tiktoken.Encoding) -> None:
    import jax.numpy as jnp

    ids = text_to_token_ids("Every effort moves you", gpt2_tok)
    for form in (ids, ids[0], ids.tolist(), ids[0].tolist(), jnp.asarray(ids)):
        assert token_ids_to_text(form, gpt2_tok) == "Every effort moves you"
    with pytest.raises(ValueError, match=r"shape \(2, 4\)"):
        token_ids_to_text(np.concatenate([ids, ids]), gpt2_tok)
    with pytest.raises(ValueError, match="shape"):
        token_ids_to_text(np.int32(5), gpt2_tok)
    with pytest.raises(ValueError, match="dtype float"):
        token_ids_to_text([1.5, 2.0], gpt2_tok)


def test_text_ids_with_regex_tokenizer() -> None:
    tok = SimpleTokenizerV2(build_vocab("the cat sat."))
    ids = text_to_token_ids("the dog sat.", tok)
    assert ids.shape == (1, 4)
    assert token_ids_to_text(ids, tok) == "the <|unk|> sat."
    with pytest.raises(ValueError, match="text must be a str"):
        text_to_token_ids(["not", "text"], tok)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- byte tokenizer


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_byte_tokenizer_round_trips_unicode(text: str) -> None:
    from flaxgpt.text.tokenizers import ByteTokenizer

    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_vocab for i in ids)
    assert tok.decode(ids) == text


def test_byte_tokenizer_endoftext_and_errors() -> None:
    from flaxgpt.text.tokenizers import ByteTokenizer, get_tokenizer

    tok = get_tokenizer("bytes")
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode("a<|endoftext|>é") == [97, 256, 0xC3, 0xA9]
    assert tok.decode([97, 256, 0xC3, 0xA9]) == "a<|endoftext|>é"
    assert tok.decode([0xC3]) == "\ufffd"  # a cut multi-byte character
    with pytest.raises(ValueError, match="outside the byte vocabulary"):
        tok.decode([257])
    with pytest.raises(ValueError, match="unknown tokenizer 'sentencepiece'"):
        get_tokenizer("sentencepiece")
