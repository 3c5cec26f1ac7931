"""Tests for flaxgpt.text.corpora: corpus names, the cache, the checked download, text files."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

import flaxgpt.text.corpora as corpora
from flaxgpt.text.corpora import cache_dir, download_file, load_text


def test_cache_dir_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAXGPT_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("FLAXGPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "flaxgpt"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "flaxgpt"


def test_pydoc_corpus_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("pydoc corpus must not touch the network")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    text = load_text("pydoc")
    assert load_text("python-docs") is text
    assert len(text) > 100_000
    from pydoc_data.topics import topics

    keys = sorted(topics)

    def tidy(topic: str) -> str:  # each line's spacing collapsed, as load_text documents
        return "\n".join(" ".join(line.split()) for line in topic.strip("\n").splitlines())

    assert text.startswith(tidy(topics[keys[0]]) + "\n\n" + tidy(topics[keys[1]])[:50])
    assert "The \"assert\" statement" in text
    assert "  " not in text  # no runs of spaces left from the manual's indentation


def test_load_verdict_from_data_dir(verdict_text: str) -> None:
    assert load_text("verdict") == verdict_text


@pytest.fixture
def isolated_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No $FLAXGPT_DATA_DIR, an empty cache in tmp_path, and a file:// download URL."""
    source = tmp_path / "server" / "the-verdict.txt"
    source.parent.mkdir()
    source.write_text("I HAD always thought Jack Gisburn rather a cheap genius--\n",
                      encoding="utf-8")
    monkeypatch.delenv("FLAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("FLAXGPT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(corpora, "VERDICT_URL", source.as_uri())
    return source


def test_load_verdict_downloads_once_into_cache(isolated_verdict: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    text = load_text("verdict")
    assert text.startswith("I HAD always")
    assert (tmp_path / "cache" / "the-verdict.txt").read_text(encoding="utf-8") == text
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["the-verdict.txt"]

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    assert load_text("verdict") == text  # second call: from the cache


def test_load_verdict_prefers_data_dir(isolated_verdict: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    local = tmp_path / "data"
    local.mkdir()
    (local / "the-verdict.txt").write_text("local copy", encoding="utf-8")
    monkeypatch.setenv("FLAXGPT_DATA_DIR", str(local))
    assert load_text("verdict") == "local copy"
    assert not (tmp_path / "cache").exists()


def test_load_verdict_offline_error(isolated_verdict: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv("FLAXGPT_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConnectionError) as info:
        load_text("verdict")
    message = str(info.value)
    assert "$FLAXGPT_DATA_DIR" in message and "nowhere" in message
    assert str(tmp_path / "cache" / "the-verdict.txt") in message
    assert "Temporary failure in name resolution" in message
    assert not (tmp_path / "cache").exists()


def test_download_file(tmp_path: Path) -> None:
    source = tmp_path / "src.txt"
    source.write_bytes(b"payload \xe2\x9c\x93")
    dest = download_file(source.as_uri(), tmp_path / "deep" / "dir" / "out.txt")
    assert dest.read_bytes() == b"payload \xe2\x9c\x93"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["out.txt"]
    with pytest.raises(ConnectionError, match="could not download .*missing.txt"):
        download_file((tmp_path / "missing.txt").as_uri(), tmp_path / "x.txt")
    assert not (tmp_path / "x.txt").exists()


def test_load_text_paths(tmp_path: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("héllo\nworld\n", encoding="utf-8")
    assert load_text(str(good)) == load_text(good) == "héllo\nworld\n"

    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_text(missing)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        load_text(empty)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not valid UTF-8"):
        load_text(latin)
    with pytest.raises(ValueError, match="not a regular file"):
        load_text(tmp_path)
