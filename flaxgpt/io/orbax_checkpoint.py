"""Sharded train-state checkpoints on orbax: every process writes its shards; restore onto any mesh.

A run directory holds ``orbax/<step>/`` folders written by orbax's ``CheckpointManager`` with two items:

- ``state/``: the train state's arrays (OCDBT), keyed by the leaves' '/'-joined tree paths; each process
  writes the shards it holds (``state/ocdbt.process_<i>/``);
- ``meta/metadata``: JSON with the fields of the safetensors format's meta.json (step, data position, PRNG
  key, config, tokenizer, leaves, extra with the LoRA settings) plus the saving run's process and device
  counts.

Orbax makes a save atomic (a temporary folder renamed when every process is done; leftovers of interrupted
saves are removed when the next manager opens the run). Then each process writes its checksum manifest and
process 0 prunes (:mod:`flaxgpt.io.orbax_dir`: a step is valid only with every manifest and matching files).
Loaders verify and fall back to the previous step (one warning line). Restoring reads each array straight
into the template's shardings: a checkpoint written by any number of processes on any mesh restores onto
another mesh or one device. No pickle anywhere (OCDBT/zarr arrays, JSON metadata).
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from flaxgpt.config import GPTConfig
from flaxgpt.io.checkpoint import (
    _flatten,
    _key_from_meta,
    _key_to_meta,
    _limited,
    _with_lora_settings,
    model_from_params,
)
from flaxgpt.io.checkpoint_dir import CheckpointError
from flaxgpt.io.orbax_dir import (
    META_ITEM,
    ORBAX,
    ORBAX_FORMAT,
    ORBAX_VERSION,
    STATE_ITEM,
    find_orbax_checkpoint,
    is_orbax_run,
    is_orbax_step,
    list_orbax_checkpoints,
    logger,
    orbax_dir,
    prune_orbax_checkpoints,
    read_orbax_meta,
    retire_step,
    write_manifest,
)
from flaxgpt.io.safetensors_io import check_finite
from flaxgpt.pytree import flat_dict, unflatten_dict
from flaxgpt.validation import check_int

__all__ = [
    "CheckpointError", "ORBAX", "OrbaxCheckpoints", "save_orbax_checkpoint", "wait_orbax_checkpoints",
    "restore_orbax_checkpoint", "load_model_from_orbax", "is_orbax_run", "list_orbax_checkpoints",
    "latest_orbax_checkpoint", "resolve_orbax_checkpoint", "load_params_from_orbax",
]  # fmt: skip

_MANAGERS: dict[Path, OrbaxCheckpoints] = {}
_barriers = 0  # barrier names must be unique and agree across processes: numbered in the main thread


def _barrier_name(what: str) -> str:
    global _barriers
    _barriers += 1
    return f"flaxgpt_{what}_{_barriers}"


def _barrier(name: str, timeout_s: int) -> None:
    """Waits for every process at the coordination service (not a collective: safe from a thread)."""
    if jax.process_count() > 1:
        ocp.multihost.sync_global_processes(name, timeout=timeout_s, processes=set(range(jax.process_count())))


def resolve_orbax_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """Finds the step to load (:func:`flaxgpt.io.orbax_dir.find_orbax_checkpoint`); on several processes
    process 0 verifies and every process follows its choice (a collective: every process calls it).

    Args:
      path: a step folder, a run directory or its ``orbax`` folder.

    Returns:
      (step folder, its metadata).

    Raises:
      FileNotFoundError: ``path`` does not exist or holds no checkpoint.
      CheckpointError: the named step, or every step of the run, fails verification.
    """
    if jax.process_count() == 1:
        return find_orbax_checkpoint(path)
    from jax.experimental import multihost_utils

    chosen, error = -1, None  # -1: nothing there, -2: nothing verifies
    if jax.process_index() == 0:
        try:
            chosen = int(find_orbax_checkpoint(path)[0].name)
        except (FileNotFoundError, CheckpointError) as e:
            chosen, error = (-1 if isinstance(e, FileNotFoundError) else -2), e
    chosen = int(multihost_utils.broadcast_one_to_all(np.int32(chosen)))
    if error is not None:
        raise error
    if chosen == -1:
        raise FileNotFoundError(f"no orbax checkpoint in {path} (process 0 found none)")
    if chosen == -2:
        raise CheckpointError(f"no orbax checkpoint in {path} verifies (process 0 checked them)")
    folder = Path(path).expanduser()
    folder = folder if is_orbax_step(folder) else orbax_dir(folder) / str(chosen)
    return folder, read_orbax_meta(folder)


def latest_orbax_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest verified step folder of a run, or None when there is none (collective, as
    :func:`resolve_orbax_checkpoint`)."""
    try:
        return resolve_orbax_checkpoint(run_dir)[0]
    except (FileNotFoundError, CheckpointError):
        return None


# --------------------------------------------------------------------------- saving


class OrbaxCheckpoints:
    """The orbax checkpoints of one run: sharded saves (optionally asynchronous), manifests and pruning.

    Every process creates it and calls every method in the same order (saves are collective).

    Args:
      run_dir: the run directory; steps go to ``run_dir/orbax/<step>/``.
      keep: how many complete steps to keep (>= 1).
      async_save: return from :meth:`save` once the arrays are copied off the devices; the files, the
        manifests and the pruning finish in the background (:meth:`wait` or the next save waits for them).
      timeout_s: the most seconds any process waits for the others at a barrier of a save.
    """

    def __init__(self, run_dir: str | os.PathLike[str], *, keep: int = 3, async_save: bool = False,
                 timeout_s: int = 300) -> None:
        self.keep, self.timeout_s = check_int("keep", keep, 1), check_int("timeout_s", timeout_s, 1)
        self.async_save = bool(async_save)
        self.directory = orbax_dir(run_dir)
        self.directory.mkdir(parents=True, exist_ok=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, create=False, cleanup_tmp_directories=True, save_root_metadata=False,
            enable_async_checkpointing=self.async_save, async_options=ocp.AsyncOptions(timeout_secs=self.timeout_s),
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=(STATE_ITEM, META_ITEM))
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def save(self, state: Any, *, step: int, key: jax.Array, config: GPTConfig, epoch: int = 0,
             batch_index: int = 0, seed: int = 0, tokens_seen: int = 0, tokenizer: str = "gpt2",
             extra: Mapping[str, Any] | None = None) -> Path:
        """Saves ``state`` (its jax arrays may be sharded over every process's devices) as step ``step``.

        Args:
          state: the train state (any pytree of arrays).
          step: optimizer updates done; names the folder.
          key: the run's PRNG key.
          config: the model config.
          epoch: the epoch training continues in.
          batch_index: the index, within ``epoch``, of the next batch to train on.
          seed: the data loader's shuffle seed.
          tokens_seen: training tokens consumed so far.
          tokenizer: the tokenizer's name.
          extra: more JSON-serialisable metadata (the LoRA settings are added for a LoRA state).

        Returns:
          The step folder (complete once :meth:`wait` returns when saving asynchronously).
        """
        step = check_int("step", step, 0)
        self.wait()
        names, leaves, _ = _flatten(state)
        meta = {
            "format": ORBAX_FORMAT, "version": ORBAX_VERSION, "step": step, "epoch": int(epoch),
            "batch_index": int(batch_index), "seed": int(seed), "tokens_seen": int(tokens_seen), **_key_to_meta(key),
            "config": dataclasses.asdict(config), "tokenizer": tokenizer, "extra": _with_lora_settings(state, extra),
            "leaves": [{"name": n, "shape": list(np.shape(x)), "dtype": str(jnp.result_type(x))}
                       for n, x in zip(names, leaves)],
            "process_count": jax.process_count(), "device_count": jax.device_count(),
        }  # fmt: skip
        folder = self.directory / str(step)
        # A step saved again (e.g. a corrupt one skipped on resume) replaces the old folder. The decision
        # comes from orbax's step list, which every process holds alike (not from racing the file system).
        if step in self._manager.all_steps():
            if jax.process_index() == 0 and folder.exists():
                retire_step(folder)
            _barrier(_barrier_name("retire"), self.timeout_s)
            self._manager.reload()
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(unflatten_dict(dict(zip(names, leaves)))), META_ITEM: ocp.args.JsonSave(meta)}
        )
        try:
            self._manager.save(step, args=args, force=True)
        except Exception as e:  # orbax and tensorstore raise many types: one line, the cause chained
            raise CheckpointError(f"saving step {step} to {self.directory} failed: {e}") from e
        barriers = (_barrier_name("manifest"), _barrier_name("pruned"))
        if self.async_save:
            self._thread = threading.Thread(target=self._finish_in_background, args=(step, barriers),
                                            name="flaxgpt-orbax-save")
            self._thread.start()
        else:
            try:
                self._finish(step, barriers)
            except Exception as e:
                raise CheckpointError(f"saving step {step} to {self.directory} failed: {e}") from e
        return folder

    def _finish(self, step: int, barriers: tuple[str, str]) -> None:
        """After orbax finalized ``step``: this process's manifest; once all are written process 0 prunes."""
        self._manager.wait_until_finished()
        self._manager.check_for_errors()
        if not (self.directory / str(step)).is_dir():
            raise CheckpointError(f"orbax did not finalize step {step} (its log says why)")
        write_manifest(self.directory / str(step), step, jax.process_index(), jax.process_count())
        _barrier(barriers[0], self.timeout_s)
        if jax.process_index() == 0:
            prune_orbax_checkpoints(self.directory, self.keep)
        _barrier(barriers[1], self.timeout_s)  # every process then lists the same steps
        logger.debug("saved orbax checkpoint %s", self.directory / str(step))

    def _finish_in_background(self, step: int, barriers: tuple[str, str]) -> None:
        try:
            self._finish(step, barriers)
        except BaseException as e:  # re-raised in the main thread by wait()
            self._error = e

    def wait(self) -> None:
        """Blocks until the last save is complete (files, manifests, pruning); raises its error if it failed."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise CheckpointError(f"saving an orbax checkpoint in {self.directory} failed: {error}") from error

    def close(self) -> None:
        """Waits for the last save and releases orbax's resources."""
        try:
            self.wait()
        finally:
            self._manager.close()

    def __enter__(self) -> OrbaxCheckpoints:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def save_orbax_checkpoint(
    run_dir: str | os.PathLike[str], state: Any, *, step: int, key: jax.Array, config: GPTConfig, epoch: int = 0,
    batch_index: int = 0, seed: int = 0, tokens_seen: int = 0, tokenizer: str = "gpt2",
    extra: Mapping[str, Any] | None = None, keep: int = 3, async_save: bool = False,
) -> Path:
    """Saves a train state to ``run_dir/orbax/<step>/`` (see :meth:`OrbaxCheckpoints.save`).

    The run's :class:`OrbaxCheckpoints` is kept open between calls; with ``async_save`` the call returns while
    the files are written: :func:`wait_orbax_checkpoints` (or the next call) waits for them.

    Args:
      run_dir: the run directory.
      state: the train state.
      step, key, config, epoch, batch_index, seed, tokens_seen, tokenizer, extra: as :meth:`OrbaxCheckpoints.save`.
      keep: how many complete checkpoints to keep (>= 1).
      async_save: finish writing in the background.

    Returns:
      The step folder.
    """
    directory = orbax_dir(run_dir).resolve()
    manager = _MANAGERS.get(directory)
    if manager is None or (manager.keep, manager.async_save) != (keep, bool(async_save)):
        if manager is not None:
            manager.close()
        manager = _MANAGERS[directory] = OrbaxCheckpoints(directory, keep=keep, async_save=async_save)
    return manager.save(state, step=step, key=key, config=config, epoch=epoch, batch_index=batch_index, seed=seed,
                        tokens_seen=tokens_seen, tokenizer=tokenizer, extra=extra)


def wait_orbax_checkpoints() -> None:
    """Finishes and closes every run's manager opened by :func:`save_orbax_checkpoint`."""
    while _MANAGERS:
        _MANAGERS.popitem()[1].close()


# --------------------------------------------------------------------------- restoring


def _check_fits(folder: Path, meta: Mapping[str, Any], names: list[str], leaves: list[Any]) -> None:
    saved = {leaf["name"]: leaf for leaf in meta["leaves"]}
    missing, unexpected = [n for n in names if n not in saved], sorted(set(saved) - set(names))
    if missing or unexpected:
        raise CheckpointError(
            f"{folder} does not match the state: missing {_limited(missing)}, unexpected {_limited(unexpected)} "
            "(was it saved with another model config or optimizer?)"
        )
    for n, leaf in zip(names, leaves):
        shape, dtype = tuple(saved[n]["shape"]), saved[n]["dtype"]
        want_shape, want_dtype = tuple(np.shape(leaf)), str(jnp.result_type(leaf))
        if shape != want_shape or dtype != want_dtype:
            raise CheckpointError(
                f"{folder}: leaf {n!r} has shape {shape} dtype {dtype}, expected {want_shape} {want_dtype}"
            )


def _restore(folder: Path, names: list[str], leaves: list[Any], partial: bool = False) -> list[jax.Array]:
    """Reads the named leaves into the shardings of ``leaves``; where they have none, onto one local device (one
    process) or replicated on every device (several processes: every process then holds the whole array)."""
    abstract = {}
    everywhere = None
    if jax.process_count() > 1:
        everywhere = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("all",)),
                                                jax.sharding.PartitionSpec())
    for n, leaf in zip(names, leaves):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None:
            sharding = everywhere or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract[n] = jax.ShapeDtypeStruct(np.shape(leaf), jnp.result_type(leaf), sharding=sharding)
    tree = unflatten_dict(abstract)
    args = ocp.args.PyTreeRestore(item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
                                  partial_restore=partial)
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = flat_dict(checkpointer.restore((folder / STATE_ITEM).absolute(), args=args))  # orbax: absolute
    return [restored[n] for n in names]


def restore_orbax_checkpoint(path: str | os.PathLike[str], template: Any) -> tuple[Any, dict[str, Any]]:
    """Restores a train state saved by :class:`OrbaxCheckpoints` onto the shardings of ``template``.

    The checkpoint may come from any number of processes and any mesh: each array is read straight into
    the template leaf's sharding (resharding on the way).

    Args:
      path: a run directory (its newest verified step; an older one, with one warning, when it is
        corrupt) or a step folder.
      template: a state of the same structure, shapes and dtypes whose leaves carry the target shardings
        (``jax.Array`` s, or ``jax.ShapeDtypeStruct(..., sharding=...)`` from ``jax.eval_shape``); on one
        process a leaf without one goes to the first local device.

    Returns:
      (restored state, metadata); ``metadata["key"]`` is the PRNG key array, ``metadata["path"]`` the folder.

    Raises:
      CheckpointError: no step verifies, or the template does not fit (the leaf and both shapes named).
    """
    folder, meta = resolve_orbax_checkpoint(path)
    names, leaves, treedef = _flatten(template)
    _check_fits(folder, meta, names, leaves)
    restored = _restore(folder, names, leaves)
    meta = dict(meta, key=_key_from_meta(meta), path=str(folder))
    return jax.tree_util.tree_unflatten(treedef, restored), meta


def load_model_from_orbax(
    path: str | os.PathLike[str], *, dtype: Any = None, allow_non_finite: bool = False
) -> tuple[GPTConfig, Any, dict[str, Any]]:
    """Loads the config and parameters of an orbax checkpoint onto one local device (no optimizer state).

    Args:
      path: a run directory (its newest verified step) or a step folder.
      dtype: cast the parameters (and compute) to "float32" or "bfloat16"; None keeps the saved ones.
      allow_non_finite: load parameters holding NaN or inf instead of refusing them.

    Returns:
      (config, params, info) as :func:`flaxgpt.io.checkpoint.load_model_from_checkpoint`: a LoRA run's adapters
      are merged into the params; info holds step, tokenizer, epoch, tokens_seen, path and lora.

    Raises:
      ValueError: a parameter holds NaN or inf (named, with the count), unless ``allow_non_finite``.
    """
    folder, meta, cfg, params = load_params_from_orbax(path, allow_non_finite=allow_non_finite)
    return model_from_params(folder, meta, cfg, params, dtype)


def load_params_from_orbax(
    path: str | os.PathLike[str], *, allow_non_finite: bool = False
) -> tuple[Path, dict[str, Any], GPTConfig, Any]:
    """The step folder, metadata, model config and saved params of an orbax run, on one local device, as
    saved (a LoRA run's ``{"base", "lora"}`` unmerged).

    Args:
      path: a run directory (its newest verified step) or a step folder.
      allow_non_finite: load parameters holding NaN or inf instead of refusing them.

    Returns:
      (step folder, metadata, config, params).
    """
    folder, meta = resolve_orbax_checkpoint(path)
    try:
        cfg = GPTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{folder}: meta['config'] is not a valid model config: {e}") from e
    leaves = [leaf for leaf in meta["leaves"] if leaf["name"].startswith("params/")]
    if not leaves:
        raise CheckpointError(f"{folder} holds no params/ leaves")
    names = [leaf["name"] for leaf in leaves]
    shapes = [jax.ShapeDtypeStruct(tuple(leaf["shape"]), jnp.dtype(leaf["dtype"])) for leaf in leaves]
    values = _restore(folder, names, shapes, partial=len(names) < len(meta["leaves"]))
    if not allow_non_finite:
        for name, value in zip(names, values):
            check_finite(np.asarray(value), name, str(folder / STATE_ITEM))
    params = unflatten_dict({n[len("params/") :]: v for n, v in zip(names, values)})
    return folder, meta, cfg, params
