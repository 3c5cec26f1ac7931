"""Tests for flaxgpt/text/learned_bpe.py: a byte-level BPE learned from a corpus, encoded by tiktoken."""

from __future__ import annotations

from pathlib import Path

import pytest
import regex

from flaxgpt.text.learned_bpe import (
    GPT2_PATTERN,
    learned_name,
    learned_tokenizer,
    load_learned,
    save_learned,
    train_bpe,
)

TEXT = ("The for statement is used to iterate over the elements of a sequence. " * 30
        + "The while statement is used for repeated execution as long as an expression is true. " * 20
        + "Über naïve café — 日本語 text, tabs\tand\nnewlines. ")


def _apply_merges(word: str, tokens: list[bytes]) -> list[bytes]:
    """The textbook BPE: apply the learned merges to one pre-token, in the order they were learned."""
    seq = [bytes([b]) for b in word.encode("utf-8")]
    for merged in tokens[256:]:
        i, out = 0, []
        while i < len(seq):
            if i + 1 < len(seq) and seq[i] + seq[i + 1] == merged:
                out.append(merged)
                i += 2
            else:
                out.append(seq[i])
                i += 1
        seq = out
    return seq


@pytest.fixture(scope="module")
def tokens() -> list[bytes]:
    return train_bpe(TEXT, 400)


def test_tokens_are_the_bytes_then_the_merges(tokens) -> None:
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    assert len(tokens) == len(set(tokens)) and 256 < len(tokens) <= 399
    assert b" statement" in tokens and b" the" in tokens  # frequent words become one token


def test_tiktoken_replays_the_learned_merges(tokens) -> None:
    enc = learned_tokenizer(tokens)
    for word in regex.findall(GPT2_PATTERN, TEXT)[:200]:
        want = _apply_merges(word, tokens)
        assert [enc.decode_single_token_bytes(i) for i in enc.encode_ordinary(word)] == want


def test_round_trip_any_text_and_the_end_of_text_token(tokens) -> None:
    enc = learned_tokenizer(tokens)
    for text in (TEXT, "unseen wörds 🙂 and 123456", ""):
        assert enc.decode(enc.encode(text)) == text
    assert enc.n_vocab == len(tokens) + 1 and enc.eot_token == len(tokens)
    assert enc.encode("a<|endoftext|>b", allowed_special="all")[1] == enc.eot_token


def test_save_and_load_give_the_same_ids_and_check_the_name(tokens, tmp_path: Path) -> None:
    path = save_learned(tmp_path / "tokenizer.json", tokens)
    name = learned_name(tokens)
    assert name == learned_name(train_bpe(TEXT, 400))  # a function of the corpus
    again = load_learned(path, name)
    assert again.name == name and again.encode(TEXT) == learned_tokenizer(tokens).encode(TEXT)
    with pytest.raises(ValueError, match="holds tokenizer"):
        load_learned(path, "bpe-000000000000")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a flaxgpt learned-BPE file"):
        load_learned(tmp_path / "bad.json")


def test_get_tokenizer_finds_a_runs_tokenizer(tokens, tmp_path: Path, monkeypatch) -> None:
    from flaxgpt.text.tokenizers import find_learned_file, get_tokenizer

    monkeypatch.setenv("FLAXGPT_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    save_learned(run / "tokenizer.json", tokens)
    name = learned_name(tokens)
    ckpt = run / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    assert find_learned_file(name, ckpt) == run / "tokenizer.json"  # found from a checkpoint folder too
    assert get_tokenizer(name, near=ckpt).encode("The for statement") == learned_tokenizer(tokens).encode(
        "The for statement")
    with pytest.raises(ValueError, match="is not found"):
        get_tokenizer(name, near=tmp_path / "elsewhere")
    with pytest.raises(ValueError, match="unknown tokenizer"):
        get_tokenizer("gpt3")
