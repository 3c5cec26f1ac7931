"""Training texts by name or path: the book's short story (checked download into the cache), the Python
reference manual that ships with Python (offline), or any UTF-8 file."""

from __future__ import annotations

import functools
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from flaxgpt.files import atomic_file, sha256_file

__all__ = ["VERDICT_URL", "DATA_DIR_ENV", "CACHE_DIR_ENV", "cache_dir", "download_file", "checked_data_file", "load_text"]

VERDICT_URL = (
    "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/"
    "01_main-chapter-code/the-verdict.txt"
)


VERDICT_FILE = "the-verdict.txt"


DATA_DIR_ENV = "FLAXGPT_DATA_DIR"


CACHE_DIR_ENV = "FLAXGPT_CACHE_DIR"


_PYDOC_NAMES = ("pydoc", "python-docs")


def cache_dir() -> Path:
    """flaxgpt's download cache: $FLAXGPT_CACHE_DIR, else $XDG_CACHE_HOME/flaxgpt, else
    ~/.cache/flaxgpt (not created here)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "flaxgpt"


def download_file(url: str, dest: str | os.PathLike[str], timeout: float = 30.0) -> Path:
    """Downloads `url` to `dest` atomically (see :func:`flaxgpt.files.atomic_file`).

    Args:
      url: any URL urllib opens (https://, file://, ...).
      dest: the destination file; its folder is created if needed.
      timeout: seconds before a network read gives up.

    Returns:
      `dest` as a Path.

    Raises:
      ConnectionError: the URL could not be read (offline, HTTP error, missing file).
    """
    dest = Path(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise ConnectionError(f"could not download {url} to {dest}: {e}") from e
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(dest, "wb") as f:
        f.write(data)
    return dest


def checked_data_file(relpath: str, sha256: str, what: str, fetch: Callable[[Path], None]) -> Path:
    """A data set's file: ``$FLAXGPT_DATA_DIR/relpath``, else the cached copy, else fetched once into the cache;
    its SHA-256 checked in every case (a wrong download is not kept).

    Args:
      relpath: the file's path below the data folder or the cache, e.g. "instruction-data.json".
      sha256: the expected hex digest.
      what: the data set's name, for messages.
      fetch: writes the file to the path it is given (e.g. a download); raises ConnectionError on failure.

    Returns:
      The verified path.

    Raises:
      ConnectionError: nothing local and ``fetch`` failed.
      ValueError: the file's SHA-256 is not ``sha256``.
    """
    def checked(path: Path) -> Path:
        digest = sha256_file(path)
        if digest != sha256:
            raise ValueError(f"{path} has SHA-256 {digest}, expected {sha256} ({what}); delete it to fetch it again")
        return path

    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir and (Path(data_dir).expanduser() / relpath).is_file():
        return checked(Path(data_dir).expanduser() / relpath)
    cached = cache_dir() / relpath
    if cached.is_file():
        return checked(cached)
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        fetch(cached)
    except ConnectionError as e:
        raise ConnectionError(f"{e}\nSet ${DATA_DIR_ENV} to a folder holding {relpath}.") from e
    try:
        return checked(cached)
    except ValueError:
        cached.unlink(missing_ok=True)
        raise


def _read_utf8(path: Path) -> str:
    if not path.exists():
        raise FileNotFoundError(f"no such text file: {path}")
    if not path.is_file():
        raise ValueError(f"{path} is not a regular file: expected a UTF-8 text file")
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines, as the book reads it
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not valid UTF-8 text (byte {e.start}): {e.reason}") from e
    if not text:
        raise ValueError(f"{path} is empty: expected a non-empty text file")
    return text


def _verdict_path() -> Path:
    tried = []
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        candidate = Path(data_dir).expanduser() / VERDICT_FILE
        if candidate.is_file():
            return candidate
        tried.append(f"${DATA_DIR_ENV}: {candidate} (missing)")
    else:
        tried.append(f"${DATA_DIR_ENV}: not set")
    cached = cache_dir() / VERDICT_FILE
    if cached.is_file():
        return cached
    tried.append(f"cache: {cached} (missing)")
    try:
        return download_file(VERDICT_URL, cached)
    except OSError as e:  # ConnectionError, or the cache folder is not writable
        tried.append(f"download: {e}")
        raise ConnectionError(
            f"could not get {VERDICT_FILE}. Tried:\n  - "
            + "\n  - ".join(tried)
            + f"\nSet ${DATA_DIR_ENV} to a folder holding {VERDICT_FILE}, or copy it to "
            f"{cached}."
        ) from e


@functools.lru_cache(maxsize=1)
def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    # The manual is indented for a terminal; runs of spaces would be ~18% of its GPT-2 tokens and
    # teach a small model little but whitespace, so each line's spacing is collapsed.
    def tidy(topic: str) -> str:
        return "\n".join(" ".join(line.split()) for line in topic.strip("\n").splitlines())

    return "\n\n".join(tidy(topics[key]) for key in sorted(topics)) + "\n"


def load_text(name_or_path: str | os.PathLike[str]) -> str:
    """Loads a training text by corpus name or file path.

    Names: "verdict" (the book's short story; from $FLAXGPT_DATA_DIR, else the cache, else
    downloaded once into the cache); "pydoc" / "python-docs" (the Python reference manual's
    topics from `pydoc_data.topics`, always offline). Anything else is a UTF-8 text file
    (use "./verdict" for a file named like a corpus).

    Args:
      name_or_path: a corpus name or a path.

    Returns:
      The text.

    Raises:
      FileNotFoundError: the path does not exist.
      ValueError: the file is empty or not UTF-8.
      ConnectionError: "verdict" is nowhere local and cannot be downloaded.
    """
    if isinstance(name_or_path, str) and name_or_path == "verdict":
        return _read_utf8(_verdict_path())
    if isinstance(name_or_path, str) and name_or_path in _PYDOC_NAMES:
        return _pydoc_text()
    return _read_utf8(Path(name_or_path).expanduser())
