"""LoRA adapters alone on disk: a small folder that holds the adapters and nothing of the base model.

:func:`save_lora` writes ``adapters.safetensors`` (one tensor per adapter leaf, named by its '/'-joined path,
e.g. ``trf_blocks_0/att/W_query/A``; a leading layer axis in the scanned layout) and ``lora.json`` (format
"flaxgpt-lora", version 1: rank, alpha, dropout, targets, the layers with their shapes, the tensor file's
SHA-256 and size, and an optional description of the base model). Both files are written atomically, the
tensors first and the JSON last, so the JSON always describes a complete tensor file. :func:`load_lora`
reads them back (checking format, version, checksum, names and shapes) and, given the base params, checks
that the adapters fit them. Only safetensors and JSON are read or written: no pickle.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from flaxgpt.files import read_json, sha256_file, write_json
from flaxgpt.io.safetensors_io import OutTensor, SafetensorsReader, check_finite, write_safetensors
from flaxgpt.nn.lora import LoRA, check_lora
from flaxgpt.pytree import flat_dict, unflatten_dict

__all__ = ["LORA_FORMAT", "LORA_VERSION", "INFO_FILE", "TENSORS_FILE", "save_lora", "load_lora", "read_lora_info"]

PathLike = str | os.PathLike[str]
LORA_FORMAT = "flaxgpt-lora"
LORA_VERSION = 1
INFO_FILE = "lora.json"
TENSORS_FILE = "adapters.safetensors"


def _layer_entries(lora: LoRA) -> list[dict[str, Any]]:
    """The ``layers`` list of lora.json: path, A and B shapes, dtype of every adapted layer."""
    out = []
    for path, ab in lora.layers.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path!r} must hold exactly 'A' and 'B', got {sorted(ab)}")
        out.append(
            {
                "path": path,
                "A": [int(s) for s in ab["A"].shape],
                "B": [int(s) for s in ab["B"].shape],
                "dtype": str(np.dtype(ab["A"].dtype)),
            }
        )
    return out


def _finite_tensors(lora: LoRA) -> list[OutTensor]:
    """The adapter leaves as tensors to write, refusing any that holds NaN or inf (named)."""
    tensors = []
    for name, leaf in flat_dict(lora.adapters).items():
        arr = np.asarray(leaf)
        if not (np.issubdtype(arr.dtype, np.floating) or arr.dtype.name == "bfloat16"):
            raise ValueError(f"LoRA adapter tensor {name!r} has dtype {arr.dtype}, expected a float dtype")
        bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise ValueError(
                f"LoRA adapter tensor {name!r} holds {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf) "
                f"of {arr.size}; refusing to save it (training diverged?)"
            )
        tensors.append(OutTensor(name, tuple(arr.shape), arr.dtype, lambda arr=arr: arr))
    return tensors


def save_lora(
    path: PathLike,
    lora: LoRA,
    *,
    targets: str | Sequence[str] | None = None,
    base: Mapping[str, Any] | None = None,
) -> Path:
    """Writes only the adapters: ``adapters.safetensors`` + ``lora.json`` in the folder ``path``.

    Args:
      path: the output folder (created if needed; the two files in it are replaced atomically).
      lora: the adapters (either layer layout).
      targets: what they were made for (a preset name or path patterns), recorded in lora.json.
      base: an optional JSON-serialisable description of the base model, e.g.
        ``{"config": cfg.to_dict(), "source": "gpt2-medium"}``.

    Returns:
      The folder.

    Raises:
      ValueError: not a LoRA, no adapters, a tensor holding NaN or inf (named), a ``base`` that is not a
        JSON-serialisable dict, ``path`` being a file.
    """
    if not isinstance(lora, LoRA):
        raise ValueError(f"save_lora expects a flaxgpt LoRA, got {type(lora).__name__}")
    if not lora.layers:
        raise ValueError("the LoRA holds no adapters; nothing to save")
    if base is not None:
        if not isinstance(base, Mapping):
            raise ValueError(f"base must be a dict describing the base model, got {type(base).__name__}")
        try:
            base = json.loads(json.dumps(dict(base)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"base must be JSON-serialisable: {e}") from e
    if targets is not None and not isinstance(targets, str):
        targets = [str(t) for t in targets]
    layers = _layer_entries(lora)
    tensors = _finite_tensors(lora)
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file; save_lora writes a folder")
    folder.mkdir(parents=True, exist_ok=True)
    file = write_safetensors(folder / TENSORS_FILE, tensors, {"format": LORA_FORMAT})
    info = {
        "format": LORA_FORMAT,
        "version": LORA_VERSION,
        "rank": lora.rank,
        "alpha": float(lora.alpha),
        "dropout": float(lora.dropout),
        "targets": targets,
        "layers": layers,
        "n_params": int(sum(math.prod(t.shape) for t in tensors)),
        "tensors": {"file": TENSORS_FILE, "sha256": sha256_file(file, fsync=True), "bytes": file.stat().st_size},
        "base": base,
    }
    write_json(folder / INFO_FILE, info)
    return folder


def _info_path(path: PathLike) -> Path:
    """lora.json of a folder (or the file itself when given)."""
    p = Path(path).expanduser()
    if p.is_file() and p.name == INFO_FILE:
        return p
    if not p.exists():
        raise FileNotFoundError(f"no LoRA adapters at {p}: no such folder (expected {INFO_FILE} + {TENSORS_FILE})")
    if not p.is_dir():
        raise ValueError(f"{p} is not a LoRA adapter folder (expected a folder with {INFO_FILE} + {TENSORS_FILE})")
    if not (p / INFO_FILE).is_file():
        raise FileNotFoundError(f"{p / INFO_FILE} is missing: {p} is not a flaxgpt LoRA adapter folder")
    return p / INFO_FILE


def read_lora_info(path: PathLike) -> dict[str, Any]:
    """Reads and checks ``lora.json`` (no tensor is read).

    Args:
      path: the adapter folder (or its lora.json).

    Returns:
      The parsed lora.json.

    Raises:
      FileNotFoundError: no such folder, or no lora.json in it.
      ValueError: invalid JSON, another format or version, missing or malformed fields (each named).
    """
    file = _info_path(path)
    info = read_json(file)
    if info.get("format") != LORA_FORMAT:
        raise ValueError(f"{file}: format is {info.get('format')!r}, expected {LORA_FORMAT!r}")
    if info.get("version") != LORA_VERSION:
        raise ValueError(
            f"{file}: version {info.get('version')!r} is not supported (this flaxgpt reads version {LORA_VERSION})"
        )
    rank, alpha, dropout = info.get("rank"), info.get("alpha"), info.get("dropout")
    checks = {
        "rank": isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1,
        "alpha": isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0,
        "dropout": isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1,
        "layers": isinstance(info.get("layers"), list) and len(info["layers"]) > 0,
        "tensors": isinstance(info.get("tensors"), dict)
        and isinstance(info["tensors"].get("sha256"), str)
        and isinstance(info["tensors"].get("bytes"), int),
    }
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"{file}: missing or invalid field(s) {bad} ({ {k: info.get(k) for k in bad} })")
    for entry in info["layers"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("path"), str) and isinstance(entry.get("A"), list)
                and isinstance(entry.get("B"), list)):
            raise ValueError(f"{file}: malformed layer entry {entry!r} (expected path, A and B shapes)")
    return info


def _check_tensor_file(file: Path, info: Mapping[str, Any], info_file: Path) -> None:
    """Size and SHA-256 of the tensor file against lora.json."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {info_file} describes adapters that are not there")
    want = info["tensors"]
    size = file.stat().st_size
    if size != want["bytes"]:
        raise ValueError(
            f"{file} has {size} bytes but {info_file.name} records {want['bytes']} (truncated or replaced?)"
        )
    digest = sha256_file(file)
    if digest != want["sha256"]:
        raise ValueError(
            f"{file} is corrupt or was replaced: its sha256 is {digest}, {info_file.name} records {want['sha256']}"
        )


def load_lora(path: PathLike, params: Any = None, *, allow_non_finite: bool = False) -> LoRA:
    """Reads adapters written by :func:`save_lora`, checking them against lora.json (and the base).

    Args:
      path: the adapter folder (or its lora.json).
      params: the base params (arrays or ``jax.eval_shape`` leaves); when given, every adapter must fit one
        of its linear layers (:func:`flaxgpt.nn.lora.check_lora`).
      allow_non_finite: load tensors holding NaN or inf instead of refusing them.

    Returns:
      The adapters as JAX arrays, with lora.json's alpha and dropout.

    Raises:
      FileNotFoundError: no such folder, or a missing file (named).
      ValueError: another format or version, a checksum, size, name or shape that disagrees with lora.json,
        a tensor holding NaN or inf, adapters that do not fit ``params`` (naming the layer and both shapes).
    """
    info = read_lora_info(path)
    info_file = _info_path(path)
    file = info_file.parent / str(info["tensors"].get("file", TENSORS_FILE))
    _check_tensor_file(file, info, info_file)
    rank = info["rank"]
    expected: dict[str, tuple[int, ...]] = {}
    for entry in info["layers"]:
        a, b = tuple(entry["A"]), tuple(entry["B"])
        if not a or not b or a[-1] != rank or b[-2:-1] != (rank,):
            raise ValueError(f"{info_file}: layer {entry['path']!r} has A {a} and B {b}, not of rank {rank}")
        expected[f"{entry['path']}/A"], expected[f"{entry['path']}/B"] = a, b
    flat: dict[str, Any] = {}
    with SafetensorsReader([file]) as st:
        missing, extra = sorted(set(expected) - set(st)), sorted(set(st) - set(expected))
        if missing or extra:
            raise ValueError(f"{file} does not match {info_file.name}: missing tensors {missing}, unexpected {extra}")
        for name, shape in expected.items():
            if st.shapes[name] != shape:
                raise ValueError(f"{file}: tensor {name!r} has shape {st.shapes[name]}, {info_file.name} records {shape}")
            arr = st[name]
            if not allow_non_finite:
                check_finite(arr, name, str(file))
            flat[name] = jnp.asarray(arr)
    lora = LoRA(unflatten_dict(flat), alpha=float(info["alpha"]), dropout=float(info["dropout"]))
    if params is not None:
        try:
            check_lora(params, lora)
        except ValueError as e:
            made_for = info.get("base") or {}
            source = made_for.get("source") if isinstance(made_for, dict) else None
            note = f" (saved for base {source!r})" if source else ""
            raise ValueError(f"{file.parent}: adapters do not fit the given base params{note}: {e}") from e
    return lora
