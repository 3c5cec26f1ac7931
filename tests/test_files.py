"""flaxgpt.files: atomic writes (old file kept on error, no temporary left), JSON, SHA-256, renames."""

from __future__ import annotations

import hashlib
import os

import pytest

from flaxgpt.files import atomic_file, read_json, rename_durably, sha256_file, write_json


def test_atomic_file_replaces_on_success(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with atomic_file(path) as f:
        f.write(b"new")
        assert path.read_bytes() == b"old"  # not visible before the block ends
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["f.bin"]
    with atomic_file(tmp_path / "t.txt", "w") as f:
        f.write("é")
    assert (tmp_path / "t.txt").read_text(encoding="utf-8") == "é"


def test_atomic_file_keeps_the_old_file_on_an_exception(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_file(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left behind
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "absent.bin") as f:
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["f.bin"]


def test_write_and_read_json(tmp_path):
    obj = {"b": [1, 2.5, None], "a": {"x": "y"}}
    path = write_json(tmp_path / "o.json", obj)
    assert read_json(path) == obj
    assert path.read_text().startswith('{\n  "a"')  # indented, keys sorted, newline-terminated
    assert path.read_text().endswith("}\n")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON"):
        read_json(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        read_json(tmp_path / "list.json")
    (tmp_path / "latin.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(ValueError, match="latin.json is not valid JSON"):
        read_json(tmp_path / "latin.json")


@pytest.mark.parametrize("size", [0, 1, (1 << 22) + 3])  # empty, tiny, more than one read chunk
def test_sha256_file_matches_hashlib(tmp_path, size):
    data = os.urandom(size)
    (tmp_path / "d").write_bytes(data)
    assert sha256_file(tmp_path / "d") == hashlib.sha256(data).hexdigest()
    assert sha256_file(tmp_path / "d", fsync=True) == hashlib.sha256(data).hexdigest()


def test_rename_durably_moves_folders(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x").write_text("1")
    rename_durably(tmp_path / "a", tmp_path / "b")
    assert not (tmp_path / "a").exists() and (tmp_path / "b" / "x").read_text() == "1"


def test_atomic_file_gives_the_usual_mode_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from flaxgpt.files import atomic_file

    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "f.json") as f:
            f.write(b"{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
