"""flaxgpt.text.bpe: GPT-2's byte-pair encoding built from local files, checked against tiktoken's own."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest
import tiktoken
import tiktoken.registry
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxgpt.text.bpe import GPT2_BPE_DIR_ENV, gpt2_tokenizer
from flaxgpt.text.tokenizers import (
    ENDOFTEXT,
)

_TIKTOKEN_GPT2_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


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
