"""Safe tensor files: read safetensors lazily (tensor by tensor), write them streaming and atomically,
and refuse tensors holding NaN or inf.

Only safetensors and JSON are ever read: no pickle, so loading a file cannot run code. Files that
only PyTorch's pickle format holds (``pytorch_model.bin``, ``.pt``, ``.pth``, ...) are refused with a note
on how to convert them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from flaxgpt.dtypes import SAFETENSORS_CODES
from flaxgpt.files import atomic_file

__all__ = [
    "PICKLE_SUFFIXES",
    "SafetensorsReader",
    "pickle_error",
    "check_finite",
    "OutTensor",
    "write_safetensors",
]

Shape = tuple[int, ...]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def pickle_error(path: Path) -> ValueError:
    """The error for a PyTorch pickle file, with how to convert it to safetensors."""
    return ValueError(
        f"{path} is a PyTorch pickle file; flaxgpt reads only safetensors and JSON because unpickling can "
        "run arbitrary code. Convert it once, in an environment you trust: for a Hugging Face directory "
        "`GPT2LMHeadModel.from_pretrained(dir).save_pretrained(out_dir)` (writes model.safetensors); for "
        "the book's model `safetensors.torch.save_file(model.state_dict(), 'model.safetensors')`"
    )


def check_finite(arr: np.ndarray, name: str, source: str) -> None:
    """Refuses a float tensor that holds NaN or inf (integer tensors always pass).

    Args:
      arr: the tensor.
      name: its name, for the message.
      source: where it was read from (a file name), for the message.

    Raises:
      ValueError: naming the tensor and how many of its values are not finite.
    """
    if not (np.issubdtype(arr.dtype, np.inexact) or arr.dtype.name == "bfloat16"):
        return
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise ValueError(
            f"{source}: tensor {name!r} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) "
            f"of {arr.size}; pass allow_non_finite=True (--allow-non-finite) to load it anyway"
        )


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

    def __enter__(self) -> SafetensorsReader:
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
        if t.dtype.name not in SAFETENSORS_CODES:
            raise ValueError(
                f"tensor {t.name!r} has dtype {t.dtype}; safetensors export supports {list(SAFETENSORS_CODES)}"
            )
        size = int(np.prod(t.shape, dtype=np.int64)) * t.dtype.itemsize
        header[t.name] = {
            "dtype": SAFETENSORS_CODES[t.dtype.name],
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
            arr = np.require(t.read(), requirements="C")  # (ascontiguousarray would make 0-d 1-d)
            if arr.shape != tuple(t.shape) or arr.dtype != t.dtype:
                raise ValueError(
                    f"tensor {t.name!r} is {arr.dtype}{arr.shape}, declared {t.dtype}{tuple(t.shape)}"
                )
            arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False).reshape(-1)
            f.write(arr.view(np.uint8).data)
    return path


@dataclasses.dataclass(frozen=True)
class OutTensor:
    """A tensor to export, produced on demand so that a writer holds one tensor at a time."""

    name: str
    shape: Shape
    dtype: np.dtype
    read: Callable[[], np.ndarray]
