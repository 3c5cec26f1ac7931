"""Crash-safe checkpoints: safetensors tensors + a JSON sidecar, written atomically, newest-valid loaded.

A run directory holds ``checkpoints/step_00000100/`` folders, each with

- ``state.safetensors``: every array leaf of the train state (``step``, ``params/...``,
  ``opt_state/...``), keyed by its '/'-joined tree path;
- ``meta.json``: step, data position (epoch, batch index, shuffle seed), tokens seen, the PRNG key as
  integers, the model config, the tokenizer name, the leaf list (name, shape, dtype) and the size and
  SHA-256 of ``state.safetensors``.

A checkpoint folder is either complete or invisible: it is written as
``checkpoints/.tmp-step_00000100-<pid>/``, its files fsynced, then renamed to its final name (parent
fsynced). Pruning renames an old folder out of the ``step_*`` namespace (``.trash-step_...-<pid>``,
parent fsynced) before deleting it, so a crash mid-delete never leaves a listed checkpoint with files
missing; leftover ``.trash-*`` folders are removed by the next listing (the folder rules are in
:mod:`flaxgpt.io.checkpoint_dir`). Loaders check meta.json's keys
and types, the tensor file's size and SHA-256, and fall back to the previous checkpoint (one warning
line; the details at DEBUG level) when the newest one fails, and refuse parameters holding NaN or inf.
No pickle anywhere: safetensors has no code execution on load.
"""

from __future__ import annotations

import dataclasses
import logging
import os
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
from flaxgpt.dtypes import STORED_AS, dtype_name
from flaxgpt.files import sha256_file, write_json
from flaxgpt.io.checkpoint_dir import (
    CHECKPOINTS,
    FORMAT,
    META_FILE,
    TENSORS_FILE,
    VERSION,
    CheckpointError,
    checkpoints_dir,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    publish_checkpoint,
    read_meta,
)
from flaxgpt.io.checkpoint_dir import resolve_checkpoint as _resolve_safetensors
from flaxgpt.io.safetensors_io import check_finite
from flaxgpt.nn.lora import LoRA, check_lora, is_lora_train_params, merge_lora
from flaxgpt.pytree import flatten_with_names, unflatten_dict
from flaxgpt.validation import check_int

__all__ = [
    "CheckpointError",
    "CHECKPOINTS",
    "TENSORS_FILE",
    "META_FILE",
    "save_checkpoint",
    "restore_checkpoint",
    "load_model_from_checkpoint",
    "load_lora_from_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_checkpoint",
    "read_meta",
]

logger = logging.getLogger(__name__)


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


def _flatten(tree: Any) -> tuple[list[str], list[Any], Any]:
    try:
        return flatten_with_names(tree)
    except ValueError as e:
        raise CheckpointError(f"cannot checkpoint this state: {e}") from e


# --------------------------------------------------------------------------- save


def _write_tensors(folder: Path, state: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Writes ``state``'s leaves to ``folder/state.safetensors`` (fsynced); returns (file info, leaves)."""
    names, leaves, _ = _flatten(state)
    tensors, leaf_info = {}, []
    for n, leaf in zip(names, leaves):
        arr, dtype = _to_storable(leaf)
        tensors[n] = arr
        leaf_info.append({"name": n, "shape": list(arr.shape), "dtype": dtype})
    save_file(tensors, str(folder / TENSORS_FILE))
    digest = sha256_file(folder / TENSORS_FILE, fsync=True)
    size = (folder / TENSORS_FILE).stat().st_size
    return {"file": TENSORS_FILE, "sha256": digest, "bytes": size}, leaf_info


def _key_to_meta(key: jax.Array) -> dict[str, Any]:
    if jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key):
        key_data, key_impl = jax.random.key_data(key), str(jax.random.key_impl(key))
    else:
        key_data, key_impl = key, None
    return {"key": np.asarray(key_data).astype(np.uint32).tolist(), "key_impl": key_impl}


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
    keep, step = check_int("keep", keep, 1), check_int("step", step, 0)
    ckpt_dir = checkpoints_dir(run_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / f"step_{int(step):08d}"
    tmp = ckpt_dir / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    extra = _with_lora_settings(state, extra)
    try:
        tensors, leaf_info = _write_tensors(tmp, state)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": int(step),
            "epoch": int(epoch),
            "batch_index": int(batch_index),
            "seed": int(seed),
            "tokens_seen": int(tokens_seen),
            **_key_to_meta(key),
            "config": dataclasses.asdict(config),
            "tokenizer": tokenizer,
            "tensors": tensors,
            "leaves": leaf_info,
            "extra": extra,
        }
        write_json(tmp / META_FILE, meta)  # fsyncs the file and tmp
        publish_checkpoint(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    prune_checkpoints(ckpt_dir, keep)
    logger.debug("saved checkpoint %s", final)
    return final


def _with_lora_settings(state: Any, extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """``extra`` plus, for a LoRA train state, the adapters' settings under "lora" (what loading needs to
    merge them), so every LoRA checkpoint describes itself."""
    out = dict(extra or {})
    params = getattr(state, "params", None)
    if is_lora_train_params(params):
        lora = params["lora"]
        out["lora"] = {**dict(out.get("lora") or {}), "rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout}
    return out


# --------------------------------------------------------------------------- restore


def _is_orbax(path: str | os.PathLike[str]) -> bool:
    """A sharded orbax run or step folder (:mod:`flaxgpt.io.orbax_checkpoint`) rather than this format's."""
    from flaxgpt.io.orbax_dir import is_orbax_run

    return is_orbax_run(path)


def resolve_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to load and its metadata: ``path`` itself when it is a checkpoint folder, else the newest
    one of the run directory ``path`` that passes verification (the previous one, with a warning line, when
    the newest does not). Either format: this module's (``checkpoints/step_*``) or sharded orbax
    (``orbax/<step>``, :func:`flaxgpt.io.orbax_checkpoint.resolve_orbax_checkpoint`).

    Args:
      path: a checkpoint folder, a run directory, or a run's ``checkpoints`` folder.
      verify: check the tensor data's size and SHA-256 (metadata is always checked).

    Returns:
      (checkpoint folder, its metadata).
    """
    if _is_orbax(path):
        from flaxgpt.io.orbax_checkpoint import resolve_orbax_checkpoint

        return resolve_orbax_checkpoint(path)
    return _resolve_safetensors(path, verify)


def _read_tensors(ckpt: Path, meta: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
    dtypes = {leaf["name"]: leaf["dtype"] for leaf in meta["leaves"]}
    out = {}
    try:
        with safe_open(str(ckpt / TENSORS_FILE), framework="np") as f:
            for name in f.keys():
                if name.startswith(prefix):
                    out[name] = _from_stored(f.get_tensor(name), dtypes.get(name, ""))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {ckpt / TENSORS_FILE}", detail=str(e)) from e
    return out


def _key_from_meta(meta: Mapping[str, Any]) -> jax.Array:
    data = jnp.asarray(np.asarray(meta["key"], dtype=np.uint32))
    if meta.get("key_impl"):
        return jax.random.wrap_key_data(data, impl=meta["key_impl"])
    return data


def _limited(names: list[str]) -> str:
    return f"{names[:5]}{'...' if len(names) > 5 else ''}"


def restore_checkpoint(path: str | os.PathLike[str], template: Any) -> tuple[Any, dict[str, Any]]:
    """Restores a train state saved by :func:`save_checkpoint` into the structure of ``template``.

    Args:
      path: a checkpoint folder or a run directory (then the newest valid checkpoint is used).
      template: a state of the same structure (e.g. ``create_train_state`` with fresh params, or its
        ``jax.eval_shape``); every leaf's shape and dtype must match. When a template leaf is a
        ``jax.Array``, the restored leaf is placed with the same sharding.

    Returns:
      (restored state, metadata); ``metadata["key"]`` is the PRNG key as a key array and
      ``metadata["path"]`` the folder loaded. A sharded orbax run restores onto the template's shardings,
      whatever mesh wrote it (:func:`flaxgpt.io.orbax_checkpoint.restore_orbax_checkpoint`).
    """
    if _is_orbax(path):
        from flaxgpt.io.orbax_checkpoint import restore_orbax_checkpoint

        return restore_orbax_checkpoint(path, template)
    ckpt, meta = resolve_checkpoint(path)
    flat = _read_tensors(ckpt, meta)
    names, leaves, treedef = _flatten(template)
    missing = [n for n in names if n not in flat]
    unexpected = sorted(set(flat) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"{ckpt} does not match the state: missing {_limited(missing)}, unexpected {_limited(unexpected)} "
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
    path: str | os.PathLike[str], *, dtype: Any = None, allow_non_finite: bool = False
) -> tuple[GPTConfig, Any, dict[str, Any]]:
    """Loads the model config and parameters of a checkpoint (no optimizer state), e.g. to generate.

    Args:
      path: a run directory (its newest valid checkpoint is used) or a ``step_*`` checkpoint folder.
      dtype: cast the parameters (and compute) to "float32" or "bfloat16"; None keeps the saved ones.
      allow_non_finite: load parameters holding NaN or inf instead of refusing them.

    Returns:
      (config, params, info): params is the nested dict of jax arrays ``model.apply`` takes under
      ``"params"``; info holds ``step``, ``tokenizer``, ``epoch``, ``tokens_seen``, ``path`` and ``lora``:
      for a LoRA fine-tuning run its settings (rank, alpha, ...), the adapters merged into the returned
      params (:func:`flaxgpt.nn.lora.merge_lora`); None otherwise.

    Raises:
      ValueError: a parameter holds NaN or inf (named, with the count), unless ``allow_non_finite``.
    """
    if _is_orbax(path):  # a sharded run: its params, gathered onto this process's default device
        from flaxgpt.io.orbax_checkpoint import load_model_from_orbax

        return load_model_from_orbax(path, dtype=dtype, allow_non_finite=allow_non_finite)
    ckpt, meta = resolve_checkpoint(path)
    cfg = GPTConfig.from_dict(meta["config"])  # checked by read_meta
    flat = _read_tensors(ckpt, meta, prefix="params/")
    if not flat:
        raise CheckpointError(f"{ckpt / TENSORS_FILE} holds no params/ tensors")
    if not allow_non_finite:
        for name, arr in flat.items():
            check_finite(arr, name, str(ckpt / TENSORS_FILE))
    params = unflatten_dict({n[len("params/") :]: jnp.asarray(v) for n, v in flat.items()})
    return model_from_params(ckpt, meta, cfg, params, dtype)


def model_from_params(
    ckpt: Path, meta: Mapping[str, Any], cfg: GPTConfig, params: Any, dtype: Any = None
) -> tuple[GPTConfig, Any, dict[str, Any]]:
    """What both checkpoint formats' model loaders return, from a checkpoint's params: a LoRA run's adapters
    merged into its base, the dtype cast, and the info dict.

    Args:
      ckpt: the checkpoint folder.
      meta: its metadata.
      cfg: its model config.
      params: its params tree (``{"base", "lora"}`` for a LoRA run).
      dtype: cast the parameters (and compute) to this dtype; None keeps them.

    Returns:
      (config, params, info) as :func:`load_model_from_checkpoint`.
    """
    lora = _checkpoint_lora(ckpt, meta, params)
    if lora is not None:  # a LoRA fine-tuning run: the adapters folded into the base
        params = merge_lora(params["base"], lora)
    if dtype is not None:
        dt = dtype_name(dtype)
        cfg = cfg.replace(param_dtype=dt, dtype=dt)
        params = jax.tree.map(lambda x: x.astype(cfg.weight_dtype), params)
    info = {
        "step": meta["step"],
        "tokenizer": meta["tokenizer"],
        "epoch": meta["epoch"],
        "tokens_seen": meta["tokens_seen"],
        "path": str(ckpt),
        "lora": dict(meta["extra"]["lora"]) if lora is not None else None,
    }
    return cfg, params, info


def _checkpoint_lora(ckpt: Path, meta: Mapping[str, Any], params: Mapping[str, Any]) -> LoRA | None:
    """The adapters of a LoRA run's params (``{"base": ..., "lora": {"adapters": ...}}``), else None."""
    if set(params) != {"base", "lora"}:
        return None
    settings = meta.get("extra", {}).get("lora")
    if not isinstance(settings, Mapping) or not isinstance(settings.get("alpha"), (int, float)):
        raise CheckpointError(f"{ckpt}: LoRA parameters without their settings (meta.json extra.lora.alpha)")
    try:
        lora = LoRA(dict(params["lora"]["adapters"]), alpha=float(settings["alpha"]),
                    dropout=float(settings.get("dropout", 0.0)))
        check_lora(params["base"], lora)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt}: the LoRA adapters do not fit the base: {e}") from e
    return lora


def load_lora_from_checkpoint(
    path: str | os.PathLike[str], *, allow_non_finite: bool = False
) -> tuple[GPTConfig, Any, LoRA, dict[str, Any]]:
    """Loads a LoRA fine-tuning run's base parameters and adapters, unmerged (e.g. to export the adapters).

    Args:
      path: a run directory or a checkpoint folder of a LoRA run (either format).
      allow_non_finite: load parameters holding NaN or inf instead of refusing them.

    Returns:
      (config, base params, adapters, info) with ``info`` as :func:`load_model_from_checkpoint`'s.

    Raises:
      CheckpointError: the run is not a LoRA run, or its adapters do not fit its base.
    """
    if _is_orbax(path):
        from flaxgpt.io.orbax_checkpoint import load_params_from_orbax

        ckpt, meta, _, params = load_params_from_orbax(path, allow_non_finite=allow_non_finite)
    else:
        ckpt, meta = resolve_checkpoint(path)
        flat = _read_tensors(ckpt, meta, prefix="params/")
        if not allow_non_finite:
            for name, arr in flat.items():
                check_finite(arr, name, str(ckpt / TENSORS_FILE))
        params = unflatten_dict({n[len("params/") :]: jnp.asarray(v) for n, v in flat.items()})
    lora = _checkpoint_lora(ckpt, meta, params)
    if lora is None:
        raise CheckpointError(f"{ckpt} is not a LoRA run (its params have no lora/ adapters)")
    cfg, _, info = load_model_from_checkpoint(ckpt, allow_non_finite=True)
    return cfg, params["base"], lora, info
