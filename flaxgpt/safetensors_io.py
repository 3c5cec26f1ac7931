"""Safe tensor files: read safetensors lazily (tensor by tensor), write them streaming and atomically.

Only safetensors and JSON are ever read: no pickle, so loading a file cannot run code. Files that
only PyTorch's pickle format holds (``pytorch_model.bin``, ``.pt``, ``.pth``, ...) are refused with a note
on how to convert them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

import numpy as np
from safetensors import SafetensorError, safe_open

from flaxgpt.weight_mapping import OutTensor

__all__ = [
    "PICKLE_SUFFIXES",
    "SafetensorsReader",
    "pickle_error",
    "read_json",
    "write_json",
    "write_safetensors",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def pickle_error(path: Path) -> ValueError:
    """The error for a PyTorch pickle file, with how to convert it to safetensors."""
    return ValueError(
        f"{path} is a PyTorch pickle file; flaxgpt reads only safetensors and JSON because unpickling can "
        "run arbitrary code. Convert it once, in an environment you trust: for a Hugging Face directory "
        "`GPT2LMHeadModel.from_pretrained(dir).save_pretrained(out_dir)` (writes model.safetensors); for "
        "the book's model `safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`"
    )


def read_json(path: Path) -> dict[str, Any]:
    """Reads a JSON object, turning a malformed file into a ValueError that names it."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(obj).__name__}")
    return obj


class SafetensorsReader(Mapping[str, np.ndarray]):
    """A read-only mapping name -> numpy array over one or more safetensors files (a sharded checkpoint).

    Only the headers are read on open; ``reader[name]`` reads that one tensor. Use as a context manager::

        with SafetensorsReader([path]) as st:
            st.shapes["wte.weight"], st["wte.weight"]
    """

    def __init__(self, files: Sequence[str | os.PathLike[str]], weight_map: Mapping[str, str] | None = None):
        """Args:
        files: the safetensors files.
        weight_map: a sharded checkpoint's index (tensor name -> file name), checked against the files.
        """
        self.files = [Path(f) for f in files]
        self.weight_map = weight_map
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        self._where: dict[str, Any] = {}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "SafetensorsReader":
        try:
            for path in self.files:
                if path.suffix.lower() in PICKLE_SUFFIXES:
                    raise pickle_error(path)
                if not path.is_file():
                    raise FileNotFoundError(f"no such safetensors file: {path}")
                try:
                    handle = self._stack.enter_context(safe_open(str(path), framework="numpy"))
                    names = list(handle.keys())
                    for name in names:
                        meta = handle.get_slice(name)
                        shape, dtype = tuple(int(s) for s in meta.get_shape()), str(meta.get_dtype())
                        if name in self._where:
                            raise ValueError(f"tensor {name!r} is in both {self._where[name][1]} and {path}")
                        self._where[name] = (handle, path)
                        self.shapes[name], self.dtypes[name] = shape, dtype
                except (SafetensorError, OSError) as e:
                    raise ValueError(
                        f"{path} is not a readable safetensors file (truncated or corrupt?): {e}"
                    ) from e
            if self.weight_map is not None:
                for name, file_name in self.weight_map.items():
                    if name not in self._where or self._where[name][1].name != file_name:
                        raise ValueError(
                            f"the index maps tensor {name!r} to {file_name}, which does not hold it"
                        )
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def __getitem__(self, name: str) -> np.ndarray:
        handle, path = self._where[name]
        try:
            return handle.get_tensor(name)
        except SafetensorError as e:
            raise ValueError(f"{path}: cannot read tensor {name!r}: {e}") from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def write_safetensors(
    path: str | os.PathLike[str], tensors: Sequence[OutTensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Writes a safetensors file one tensor at a time (never all of them in memory), atomically.

    Args:
      path: the file to write (replaced only once the new file is complete).
      tensors: the tensors, each read on demand; their declared shapes and dtypes go in the header.
      metadata: string -> string ``__metadata__`` (``{"format": "pt"}`` lets ``transformers`` load it).

    Returns:
      The path written.
    """
    path = Path(path)
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    start = 0
    for t in tensors:
        if t.dtype.name not in _DTYPE_CODES:
            raise ValueError(
                f"tensor {t.name!r} has dtype {t.dtype}; safetensors export supports {list(_DTYPE_CODES)}"
            )
        size = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        header[t.name] = {
            "dtype": _DTYPE_CODES[t.dtype.name],
            "shape": list(t.shape),
            "data_offsets": [start, start + size],
        }
        start += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # pad the header to 8 bytes, as the reference writer does
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors:
            arr = np.ascontiguousarray(t.read())
            if arr.shape != tuple(t.shape) or arr.dtype != t.dtype:
                raise ValueError(
                    f"tensor {t.name!r} is {arr.dtype}{arr.shape}, declared {t.dtype}{tuple(t.shape)}"
                )
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False).reshape(-1)
            f.write(arr.view(np.uint8).data)
    return path


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
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


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
