"""The checkpoints folder of a run: naming, listing, pruning, meta.json checks, newest-valid resolution.

A checkpoint folder is either complete or invisible to every loader: a writer publishes a complete
``.tmp-step_*`` folder with one rename (:func:`publish_checkpoint`); pruning renames an old folder out of
the ``step_*`` namespace (``.trash-step_*-<pid>``, parent fsynced) before deleting it
(:func:`prune_checkpoints`); :func:`list_checkpoints` lists only ``step_*`` folders holding both files
and finishes deleting leftover ``.trash-*`` folders. :func:`read_meta` checks every key and value type
of meta.json; :func:`resolve_checkpoint` also checks the tensor file's size and SHA-256 and falls back
to the previous checkpoint. The tensors themselves are written and read by :mod:`flaxgpt.io.checkpoint`.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from flaxgpt.config import GPTConfig
from flaxgpt.files import read_json, rename_durably, sha256_file

__all__ = [
    "CheckpointError",
    "FORMAT",
    "VERSION",
    "CHECKPOINTS",
    "TENSORS_FILE",
    "META_FILE",
    "checkpoints_dir",
    "list_checkpoints",
    "read_meta",
    "resolve_checkpoint",
    "latest_checkpoint",
    "publish_checkpoint",
    "prune_checkpoints",
]

logger = logging.getLogger("flaxgpt.io.checkpoint")  # one logger for everything about checkpoints

FORMAT = "flaxgpt-checkpoint"
VERSION = 1
TENSORS_FILE = "state.safetensors"
META_FILE = "meta.json"
CHECKPOINTS = "checkpoints"
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_RE = re.compile(r"^\.tmp-step_\d+-(\d+)$")
_TRASH = ".trash-"
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")

# meta.json's keys and the types of their values (bool is refused where an int is due).
_META_KEYS: dict[str, Any] = {
    "format": str, "version": int, "step": int, "epoch": int, "batch_index": int, "seed": int,
    "tokens_seen": int, "key": list, "key_impl": (str, type(None)), "config": dict, "tokenizer": str,
    "tensors": dict, "leaves": list, "extra": dict,
}  # fmt: skip
_TENSORS_KEYS: dict[str, Any] = {"file": str, "sha256": str, "bytes": int}
_LEAF_KEYS: dict[str, Any] = {"name": str, "shape": list, "dtype": str}


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupt, or does not fit the state it is restored into.

    Attributes:
      detail: more about the failure (e.g. both SHA-256 digests), logged at DEBUG level.
      reasons: when no checkpoint of a run verifies, one line per checkpoint saying why.
    """

    def __init__(self, message: str, detail: str = "", reasons: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.detail = detail
        self.reasons = tuple(reasons)


# --------------------------------------------------------------------------- listing and checking


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The ``checkpoints`` folder of a run directory (or the folder itself when it is one)."""
    run_dir = Path(run_dir)
    return run_dir if run_dir.name == CHECKPOINTS else run_dir / CHECKPOINTS


def _retire(folder: Path) -> None:
    """Renames ``folder`` out of the ``step_*`` namespace (durably), then deletes it."""
    trash = folder.with_name(f"{_TRASH}{folder.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    rename_durably(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _complete(folder: Path) -> bool:
    return folder.is_dir() and (folder / META_FILE).is_file() and (folder / TENSORS_FILE).is_file()


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Final-named checkpoint folders of a run, oldest first. ``.tmp-*`` (being written) and ``.trash-*``
    (being deleted) folders are never listed; leftover ``.trash-*`` folders of crashed pruners are removed.

    Args:
      run_dir: the run directory (or its ``checkpoints`` folder).

    Returns:
      Paths of ``step_*`` folders that hold both a meta.json and a tensor file, sorted by step.
    """
    ckpt_dir = checkpoints_dir(run_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        if p.name.startswith(_TRASH):
            shutil.rmtree(p, ignore_errors=True)  # already invisible: safe to finish deleting
        elif (m := _STEP_RE.match(p.name)) and _complete(p):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _type_problems(obj: Mapping[str, Any], keys: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    for key, want in keys.items():
        if key not in obj:
            problems.append(f"{where} lacks {key!r}")
        elif (isinstance(obj[key], bool) and want is int) or not isinstance(obj[key], want):
            expected = " or ".join(t.__name__ for t in (want if isinstance(want, tuple) else (want,)))
            problems.append(f"{where}[{key!r}] is {type(obj[key]).__name__}, expected {expected}")
    return problems


def _meta_problems(meta: dict[str, Any], folder: Path) -> list[str]:
    problems = _type_problems(meta, _META_KEYS, "meta")
    if problems:
        return problems
    tensors = meta["tensors"]
    problems = _type_problems(tensors, _TENSORS_KEYS, "meta['tensors']")
    if not problems and (tensors["file"] != TENSORS_FILE or not _SHA_RE.match(tensors["sha256"])):
        problems.append(f"meta['tensors'] names {tensors['file']!r} with SHA-256 {tensors['sha256']!r}")
    for i, leaf in enumerate(meta["leaves"]):
        where = f"meta['leaves'][{i}]"
        if not isinstance(leaf, dict):
            problems.append(f"{where} is not an object")
        else:
            problems += _type_problems(leaf, _LEAF_KEYS, where)
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in meta["key"]):
        problems.append("meta['key'] is not a list of integers")
    if (m := _STEP_RE.match(folder.name)) and int(m.group(1)) != meta["step"]:
        problems.append(f"meta['step'] is {meta['step']} in folder {folder.name}")
    try:
        GPTConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        problems.append(f"meta['config'] is not a valid model config: {e}")
    return problems


def read_meta(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and checks a checkpoint folder's meta.json (not the tensors): format, version, and every
    key and value type that loaders use.

    Args:
      ckpt: a ``step_*`` folder.

    Returns:
      The metadata dict.

    Raises:
      CheckpointError: meta.json is unreadable, not JSON, of another format, or lacks or mistypes a key.
    """
    path = Path(ckpt) / META_FILE
    try:
        meta = read_json(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}", detail=str(e)) from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} metadata file")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('version')}, expected {VERSION}")
    problems = _meta_problems(meta, Path(ckpt))
    if problems:
        raise CheckpointError(f"{path} is corrupt: {problems[0]}", detail="; ".join(problems))
    return meta


def _verify(ckpt: Path) -> dict[str, Any]:
    meta = read_meta(ckpt)
    tensors = ckpt / TENSORS_FILE
    if not tensors.is_file():
        raise CheckpointError(f"{tensors} is missing")
    size, recorded = tensors.stat().st_size, meta["tensors"]["bytes"]
    if size != recorded:
        raise CheckpointError(
            f"{tensors} is corrupt (truncated or extended)", detail=f"{size} bytes, {META_FILE} records {recorded}"
        )
    digest = sha256_file(tensors)
    if digest != meta["tensors"]["sha256"]:
        raise CheckpointError(
            f"{tensors} is corrupt (its SHA-256 differs from the one in {META_FILE})",
            detail=f"SHA-256 {digest}, {META_FILE} records {meta['tensors']['sha256']}",
        )
    try:
        with safe_open(str(tensors), framework="np") as f:
            stored = set(f.keys())
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"cannot read {tensors}", detail=str(e)) from e
    listed = {leaf["name"] for leaf in meta["leaves"]}
    if stored != listed:
        raise CheckpointError(
            f"{ckpt / META_FILE} is corrupt: its leaves differ from the tensors in {TENSORS_FILE}",
            detail=f"only in {META_FILE}: {sorted(listed - stored)[:5]}; only in the file: {sorted(stored - listed)[:5]}",
        )
    return meta


def _checked(ckpt: Path, verify: bool) -> dict[str, Any]:
    try:
        return _verify(ckpt) if verify else read_meta(ckpt)
    except CheckpointError as e:
        if e.detail:
            logger.debug("%s: %s", ckpt, e.detail)
        raise


def resolve_checkpoint(path: str | os.PathLike[str], verify: bool = True) -> tuple[Path, dict[str, Any]]:
    """Finds the checkpoint to load: ``path`` itself when it is a ``step_*`` folder, else the newest
    complete checkpoint of the run directory ``path`` that passes verification.

    A skipped newer checkpoint gives one warning line (its details at DEBUG level). When none verifies,
    the error is one line and ``error.reasons`` (also logged at DEBUG level) says why for each.

    Args:
      path: a checkpoint folder, a run directory, or a run's ``checkpoints`` folder.
      verify: check the size and SHA-256 of the tensor file (meta.json is always checked).

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
        return path, _checked(path, verify)
    candidates = list_checkpoints(path)
    if not candidates:
        raise FileNotFoundError(f"no complete checkpoint in {path} (expected {CHECKPOINTS}/step_*/)")
    return newest_valid(candidates, lambda ckpt: _checked(ckpt, verify), f"no checkpoint in {path}")


def newest_valid(
    candidates: list[Path], check: Callable[[Path], dict[str, Any]], none_verifies: str,
    label: Callable[[Path], str] = lambda folder: folder.name,
) -> tuple[Path, dict[str, Any]]:
    """The newest folder that passes ``check``; each newer one skipped gives one warning line (its details
    at DEBUG level). Shared by both checkpoint formats.

    Args:
      candidates: checkpoint folders, oldest first.
      check: returns a folder's metadata or raises :class:`CheckpointError`.
      none_verifies: the start of the error when every folder fails ("no checkpoint in RUN").
      label: a folder in the warning ("step_00000100"; "step 100" for orbax's numbered folders).

    Returns:
      (folder, its metadata).

    Raises:
      CheckpointError: every candidate fails; ``reasons`` says why for each.
    """
    failed: list[tuple[Path, CheckpointError]] = []
    for folder in reversed(candidates):
        try:
            meta = check(folder)
        except CheckpointError as e:
            failed.append((folder, e))
            continue
        for _, e in failed:
            logger.warning("%s; loading %s instead", e, label(folder))
        return folder, meta
    reasons = [f"{bad.name}: {e}" + (f" ({e.detail})" if e.detail else "") for bad, e in failed]
    for reason in reasons:
        logger.debug("checkpoint %s", reason)
    raise CheckpointError(f"{none_verifies} verifies ({len(failed)} found, all corrupt)", reasons=reasons)


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The newest complete, verified checkpoint folder of a run, or None when there is none."""
    try:
        return resolve_checkpoint(run_dir)[0]
    except (FileNotFoundError, CheckpointError):
        return None


# --------------------------------------------------------------------------- writers


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Deletes all but the newest ``keep`` checkpoints (each renamed out of sight first), damaged
    ``step_*`` folders, and ``.tmp-*`` folders of writers that are no longer running."""
    steps = list_checkpoints(ckpt_dir)
    for old in steps[: max(0, len(steps) - keep)]:
        _retire(old)
    for p in ckpt_dir.iterdir():
        if _STEP_RE.match(p.name) and not _complete(p):  # damaged outside flaxgpt (or by an old version)
            _retire(p)
        m = _TMP_RE.match(p.name)  # leftovers of crashed writers
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)


def publish_checkpoint(tmp: Path, final: Path) -> None:
    """Durably renames the complete folder ``tmp`` to ``final``, retiring a checkpoint of the same step first."""
    trash = final.with_name(f"{_TRASH}{final.name}-{os.getpid()}")
    if final.exists():  # e.g. a corrupt checkpoint of this step that was skipped on resume
        shutil.rmtree(trash, ignore_errors=True)
        rename_durably(final, trash)
    rename_durably(tmp, final)
    shutil.rmtree(trash, ignore_errors=True)
