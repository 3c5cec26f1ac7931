"""Crash-safe checkpoints: safetensors tensors + a JSON sidecar, written atomically, newest-valid loaded.

A run directory holds ``checkpoints/step_00000100/`` folders, each with

- ``state.safetensors``: every array leaf of the train state (``step``, ``params/...``,
  ``opt_state/...``), keyed by its '/'-joined tree path;
- ``meta.json``: step, data position (epoch, batch index, shuffle seed), tokens seen, the PRNG key as
  integers, the model config, the tokenizer name, the leaf list (name, shape, dtype) and the SHA-256
  of ``state.safetensors``.

A checkpoint is first written as ``checkpoints/.tmp-step_00000100-<pid>/``; its files are fsynced, the
folder is renamed to its final name and the parent folder fsynced, so a crash leaves either the previous
checkpoints or the new complete one. Loaders ignore ``.tmp-*`` folders, verify the SHA-256, and fall back
to the previous checkpoint (with a warning) when the newest one fails verification. No pickle anywhere:
safetensors has no code execution on load.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from flaxgpt.config import GPTConfig
from flaxgpt.dtypes import STORED_AS
from flaxgpt.io.files import fsync_dir, sha256_file
from flaxgpt.pytree import flatten_with_names, unflatten_dict

__all__ = [
    "CheckpointError",
    "TENSORS_FILE",
    "META_FILE",
    "save_checkpoint",
    "restore_checkpoint",
    "load_model_from_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "read_meta",
]

logger = logging.getLogger(__name__)

FORMAT = "flaxgpt-checkpoint"
VERSION = 1
TENSORS_FILE = "state.safetensors"
META_FILE = "meta.json"
CHECKPOINTS = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^\.tmp-step_\d+-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the state it is restored into."""


# --------------------------------------------------------------------------- tree <-> flat names


def _to_storable(x: Any) -> tuple[np.ndarray, str]:
    arr = np.asarray(jax.device_get(x))
    dtype = str(arr.dtype)
    if dtype in STORED_AS:
        arr = arr.view(STORED_AS[dtype])
    return np.require(arr, requirements="C"), dtype  # (ascontiguousarray would make 0-d 1-d)


def _from_stored(arr: np.ndarray, dtype: str) -> np.ndarray:
    if dtype in STORED_AS:
        return arr.view(jnp.dtype(dtype))  # ml_dtypes' bfloat16, which JAX registers with NumPy
    return arr


# --------------------------------------------------------------------------- files


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _checkpoints_dir(run_dir: Path) -> Path:
    return run_dir if run_dir.name == CHECKPOINTS else run_dir / CHECKPOINTS


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Final-named checkpoint folders of a run, oldest first (``.tmp-*`` folders are never listed).

    Args:
      run_dir: the run directory (or its ``checkpoints`` folder).

    Returns:
      Paths of ``step_*`` folders that hold a meta.json, sorted by step.
    """
    ckpt_dir = _checkpoints_dir(Path(run_dir))
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and (p / META_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def read_meta(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and checks a checkpoint folder's meta.json (not the tensors).

    Args:
      ckpt: a ``step_*`` folder.

    Returns:
      The metadata dict.
    """
    path = Path(ckpt) / META_FILE
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} metadata file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('version')}, expected {VERSION}")
    return meta


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    try:
        return flatten_with_names(tree)
    except ValueError as e:
        raise CheckpointError(f"cannot checkpoint this state: {e}") from e


def _verify(ckpt: Path) -> dict[str, Any]:
    meta = read_meta(ckpt)
    tensors = ckpt / TENSORS_FILE
    if not tensors.is_file():
        raise CheckpointError(f"{tensors} is missing")
    digest = sha256_file(tensors)
    if digest != meta["tensors"]["sha256"]:
        raise CheckpointError(
            f"{tensors} is corrupt: SHA-256 {digest} does not match "
            f"{meta['tensors']['sha256']} recorded in {META_FILE}"
        )
    return meta


def resolve_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """Finds the checkpoint to load: ``path`` itself when it is a ``step_*`` folder, else the newest
    complete checkpoint of the run directory ``path`` that passes verification.

    Args:
      path: a checkpoint folder, a run directory, or a run's ``checkpoints`` folder.
      verify: check the SHA-256 of the tensor file.

    Returns:
      (checkpoint folder, its metadata).

    Raises:
      FileNotFoundError: ``path`` does not exist or holds no checkpoint.
      CheckpointError: the named checkpoint, or every checkpoint of the run, fails verification.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or run directory: {path}")
    if (path / META_FILE).is_file():
        return path, (_verify(path) if verify else read_meta(path))
    candidates = list_checkpoints(path)
    if not candidates:
        raise FileNotFoundError(f"no complete checkpoint in {path} (expected {CHECKPOINTS}/step_*/)")
    errors = []
    for ckpt in reversed(candidates):
        try:
            return ckpt, (_verify(ckpt) if verify else read_meta(ckpt))
        except CheckpointError as e:
            logger.warning("skipping checkpoint %s: %s", ckpt, e)
            errors.append(str(e))
    raise CheckpointError(f"every checkpoint in {path} failed verification: {'; '.join(errors)}")


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete, verified checkpoint folder of a run, or None when there is none."""
    try:
        return resolve_checkpoint(run_dir)[0]
    except (FileNotFoundError, CheckpointError):
        return None


# --------------------------------------------------------------------------- save


def _prune(ckpt_dir: Path, keep: int) -> None:
    steps = list_checkpoints(ckpt_dir)
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for p in ckpt_dir.iterdir():  # leftovers of crashed writers
        m = _TMP_RE.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    state: Any,
    *,
    step: int,
    key: jax.Array,
    config: GPTConfig,
    epoch: int = 0,
    batch_index: int = 0,
    seed: int = 0,
    tokens_seen: int = 0,
    tokenizer: str = "gpt2",
    extra: Mapping[str, Any] | None = None,
    keep: int = 3,
) -> Path:
    """Atomically writes a checkpoint of ``state`` to ``run_dir/checkpoints/step_{step:08d}/``.

    Args:
      run_dir: the run directory (created if needed).
      state: the train state (any pytree of arrays: params, optimizer state, step).
      step: optimizer updates done; names the folder.
      key: the run's PRNG key (typed or raw uint32 key data).
      config: the model config.
      epoch: the epoch training continues in.
      batch_index: the index, within ``epoch``, of the next batch to train on.
      seed: the data loader's shuffle seed.
      tokens_seen: training tokens consumed so far.
      tokenizer: the tokenizer's name.
      extra: more JSON-serialisable metadata (e.g. training arguments).
      keep: how many checkpoints to keep (older ones are deleted); >= 1.

    Returns:
      The checkpoint folder.
    """
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    ckpt_dir = _checkpoints_dir(Path(run_dir))
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step_{int(step):08d}"
    final = ckpt_dir / name
    tmp = ckpt_dir / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        names, leaves, _ = _flatten(state)
        tensors, leaf_info = {}, []
        for n, leaf in zip(names, leaves):
            arr, dtype = _to_storable(leaf)
            tensors[n] = arr
            leaf_info.append({"name": n, "shape": list(arr.shape), "dtype": dtype})
        save_file(tensors, str(tmp / TENSORS_FILE))
        digest = sha256_file(tmp / TENSORS_FILE, fsync=True)
        if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
            key_data, key_impl = jax.random.key_data(key), str(jax.random.key_impl(key))
        else:
            key_data, key_impl = key, None
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": int(step),
            "epoch": int(epoch),
            "batch_index": int(batch_index),
            "seed": int(seed),
            "tokens_seen": int(tokens_seen),
            "key": np.asarray(key_data).astype(np.uint32).tolist(),
            "key_impl": key_impl,
            "config": dataclasses.asdict(config),
            "tokenizer": tokenizer,
            "tensors": {
                "file": TENSORS_FILE,
                "sha256": digest,
                "bytes": (tmp / TENSORS_FILE).stat().st_size,
            },
            "leaves": leaf_info,
            "extra": dict(extra or {}),
        }
        with open(tmp / META_FILE, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # e.g. a corrupt checkpoint of this step that was skipped on resume
            old = ckpt_dir / f".tmp-old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(ckpt_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(ckpt_dir, keep)
    logger.debug("saved checkpoint %s", final)
    return final


# --------------------------------------------------------------------------- restore


def _read_tensors(ckpt: Path, meta: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    dtypes = {leaf["name"]: leaf["dtype"] for leaf in meta["leaves"]}
    out = {}
    try:
        with safe_open(str(ckpt / TENSORS_FILE), framework="np") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    out[name] = _from_stored(f.get_tensor(name), dtypes.get(name, ""))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {ckpt / TENSORS_FILE}: {e}") from e
    return out


def _key_from_meta(meta: Mapping[str, Any]) -> jax.Array:
    data = jnp.asarray(np.asarray(meta["key"], dtype=np.uint32))
    if meta.get("key_impl"):
        return jax.random.wrap_key_data(data, impl=meta["key_impl"])
    return data


def restore_checkpoint(path: str | os.PathLike[str], template: Any) -> tuple[Any, dict[str, Any]]:
    """Restores a train state saved by :func:`save_checkpoint` into the structure of ``template``.

    Args:
      path: a checkpoint folder or a run directory (then the newest valid checkpoint is used).
      template: a state of the same structure (e.g. ``create_train_state`` with fresh params, or its
        ``jax.eval_shape``); every leaf's shape and dtype must match. When a template leaf is a
        ``jax.Array``, the restored leaf is placed with the same sharding.

    Returns:
      (restored state, metadata); ``metadata["key"]`` is the PRNG key as a key array and
      ``metadata["path"]`` the folder loaded.
    """
    ckpt, meta = resolve_checkpoint(path)
    flat = _read_tensors(ckpt, meta)
    names, leaves, treedef = _flatten(template)
    missing = [n for n in names if n not in flat]
    unexpected = sorted(set(flat) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt} does not match the state: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''} "
            "(was it saved with another model config or optimizer?)"
        )
    restored = []
    for n, leaf in zip(names, leaves):
        arr = flat[n]
        want_shape, want_dtype = tuple(np.shape(leaf)), np.dtype(jnp.result_type(leaf))
        if arr.shape != want_shape or arr.dtype != want_dtype:
            raise CheckpointError(
                f"{ckpt}: leaf {n!r} has shape {arr.shape} dtype {arr.dtype}, "
                f"expected {want_shape} {want_dtype}"
            )
        sharding = getattr(leaf, "sharding", None) if isinstance(leaf, jax.Array) else None
        restored.append(jax.device_put(arr, sharding) if sharding is not None else jnp.asarray(arr))
    meta = dict(meta, key=_key_from_meta(meta), path=str(ckpt))
    return jax.tree_util.tree_unflatten(treedef, restored), meta


def load_model_from_checkpoint(
    path: str | os.PathLike[str],
) -> tuple[GPTConfig, Any, dict[str, Any]]:
    """Loads the model config and parameters of a checkpoint (no optimizer state), e.g. to generate.

    Args:
      path: a run directory (its newest valid checkpoint is used) or a ``step_*`` checkpoint folder.

    Returns:
      (config, params, info): params is the nested dict of jax arrays ``model.apply`` takes under
      ``"params"``; info holds ``step``, ``tokenizer``, ``epoch``, ``tokens_seen`` and ``path``.
    """
    ckpt, meta = resolve_checkpoint(path)
    try:
        cfg = GPTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / META_FILE} has no valid model config: {e}") from e
    flat = _read_tensors(ckpt, meta, prefix="params/")
    if not flat:
        raise CheckpointError(f"{ckpt / TENSORS_FILE} holds no params/ tensors")
    params = unflatten_dict({n[len("params/") :]: v for n, v in flat.items()})
    params = jax.tree.map(jnp.asarray, params)
    info = {
        "step": meta["step"],
        "tokenizer": meta.get("tokenizer", "gpt2"),
        "epoch": meta.get("epoch"),
        "tokens_seen": meta.get("tokens_seen"),
        "path": str(ckpt),
    }
    return cfg, params, info
