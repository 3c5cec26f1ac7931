"""Files that are either complete or absent: atomic writes with fsync, durable renames, JSON, SHA-256.

Every file flaxgpt writes (weights, checkpoints, metrics, configs, downloads) goes through
:func:`atomic_file`: a temporary file beside the destination, fsynced, renamed over it, the folder
fsynced. A crash leaves the old file or the new one, never half of one. Folders (checkpoints) are
published and retired with :func:`rename_durably`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_file", "fsync_dir", "rename_durably", "write_json", "read_json", "sha256_file"]

_CHUNK = 1 << 22  # bytes hashed per read


def read_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads a JSON object.

    Args:
      path: the file.

    Returns:
      The parsed object.

    Raises:
      ValueError: the file is not valid UTF-8 JSON or does not hold an object (named in the message).
    """
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Flushes a folder's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO[Any]]:
    """Opens a temporary file beside ``path``; on success it is fsynced and renamed over ``path`` and
    the folder fsynced, on any error it is removed. Readers never see a half-written ``path``.

    Args:
      path: the destination file.
      mode: "wb" or "w" (UTF-8 text).

    Yields:
      The open temporary file.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the usual mode
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def _read_umask() -> int:
    """The process umask, read once at import (reading it means setting it, which must not race with threads
    creating files later)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _umask() -> int:
    return _UMASK


def rename_durably(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Renames ``src`` to ``dst`` (a file or a folder, replacing an empty or absent ``dst``) and fsyncs
    ``dst``'s folder, so that the rename survives a crash.

    Args:
      src: the current path.
      dst: the new path, in the same file system.
    """
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Writes ``obj`` as indented JSON, atomically: a fsynced temporary file, a rename, a fsynced folder.

    Args:
      path: destination file.
      obj: a JSON-serialisable object.

    Returns:
      The destination as a Path.
    """
    path = Path(path)
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    return path


def sha256_file(path: str | os.PathLike[str], fsync: bool = False) -> str:
    """SHA-256 hex digest of a file, read in 4 MiB chunks.

    Args:
      path: the file.
      fsync: also flush the file to disk (a writer calls this once the file is complete).

    Returns:
      The lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()
