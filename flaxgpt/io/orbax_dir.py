"""The orbax folder of a run: step listing, per-process checksum manifests, verification, crash-safe pruning.

``run_dir/orbax/<step>/`` folders are written by :mod:`flaxgpt.io.orbax_checkpoint` through orbax's
``CheckpointManager``, which writes ``<step>.orbax-checkpoint-tmp/`` and renames it when every process is
done: only all-digit folder names are steps, so an interrupted save is never listed.

Orbax does not checksum tensor data, so once a step is finalized each process ``i`` writes
``<step>/flaxgpt-manifest-<i>.json`` (atomically): the size and SHA-256 of every file it wrote, i.e. those
under a ``*process_<i>`` path (``state/ocdbt.process_<i>/``, ``state/array_metadatas/process_<i>``); process
0 also covers every other file (top-level files, the merged OCDBT manifest, the ``meta`` item). A step is
valid only when the saving run's ``process_count`` manifests (recorded in its meta) are all there, together
list every file, and every file matches. :func:`prune_orbax_checkpoints` renames a step out of the step
namespace (``.trash-<step>-<pid>``, parent fsynced) before deleting it, so an interrupted prune never
leaves a listed step with files missing. Nothing here imports JAX or orbax.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from flaxgpt.files import read_json, rename_durably, sha256_file, write_json
from flaxgpt.io.checkpoint_dir import _LEAF_KEYS, _META_KEYS, CheckpointError, _type_problems, newest_valid

__all__ = [
    "ORBAX", "ORBAX_FORMAT", "ORBAX_VERSION", "STATE_ITEM", "META_ITEM", "orbax_dir", "list_orbax_checkpoints",
    "is_orbax_step", "is_orbax_run", "read_orbax_meta", "write_manifest", "verify_orbax_checkpoint",
    "find_orbax_checkpoint", "prune_orbax_checkpoints", "retire_step",
]  # fmt: skip

logger = logging.getLogger("flaxgpt.io.checkpoint")  # the one checkpoint logger (see checkpoint_dir)

ORBAX = "orbax"
ORBAX_FORMAT = "flaxgpt-orbax-checkpoint"
ORBAX_VERSION = 1
STATE_ITEM, META_ITEM = "state", "meta"
_META_FILE = "metadata"  # orbax's JSON item file name
_MANIFEST = "flaxgpt-manifest-{}.json"
_TRASH = ".trash-"
_PROCESS_RE = re.compile(r"(?:^|\.)process_(\d+)$")
_META_TYPES = {**{k: v for k, v in _META_KEYS.items() if k != "tensors"}, "process_count": int, "device_count": int}


def orbax_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The ``orbax`` folder of a run directory (or the folder itself when it is one)."""
    run_dir = Path(run_dir).expanduser()
    return run_dir if run_dir.name == ORBAX else run_dir / ORBAX


def list_orbax_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """The final-named step folders of a run, oldest first (not orbax's temporary ones, not pruned ones).

    Args:
      run_dir: the run directory (or its ``orbax`` folder).

    Returns:
      Paths of ``orbax/<step>`` folders, sorted by step (not verified: see :func:`find_orbax_checkpoint`).
    """
    folder = orbax_dir(run_dir)
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.name.isdigit() and p.is_dir()), key=lambda p: int(p.name))


def is_orbax_step(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is one step folder of an orbax run (``<digits>/`` holding the state and meta items)."""
    path = Path(path)
    return path.name.isdigit() and (path / STATE_ITEM).is_dir() and (path / META_ITEM).is_dir()


def is_orbax_run(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is an orbax step folder, or a run directory (or ``orbax`` folder) holding steps."""
    return is_orbax_step(Path(path).expanduser()) or bool(list_orbax_checkpoints(path))


# --------------------------------------------------------------------------- manifests


def _data_files(folder: Path) -> list[str]:
    """Every file of a step folder but the manifests (and their temporary files), relative, '/'-joined."""
    out = []
    for root, _, files in os.walk(folder):
        out += [(Path(root) / n).relative_to(folder).as_posix() for n in files
                if not n.lstrip(".").startswith("flaxgpt-manifest-")]
    return sorted(out)


def _owner(rel: str) -> int:
    """The process that wrote a file: ``i`` under a ``*process_<i>`` path, else process 0 (the primary host)."""
    for part in rel.split("/"):
        if m := _PROCESS_RE.search(part):
            return int(m.group(1))
    return 0


def write_manifest(folder: Path, step: int, process_index: int, process_count: int) -> Path:
    """Writes this process's manifest of a finalized step: size and SHA-256 of the files it wrote (fsyncing
    each as it is read).

    Args:
      folder: the step folder.
      step: its step.
      process_index: this process.
      process_count: the processes that saved the step.

    Returns:
      The manifest file.
    """
    files = {
        rel: {"sha256": sha256_file(folder / rel, fsync=True), "bytes": (folder / rel).stat().st_size}
        for rel in _data_files(folder)
        if _owner(rel) == process_index
    }
    manifest = {"format": ORBAX_FORMAT, "step": step, "process_index": process_index,
                "process_count": process_count, "files": files}
    return write_json(folder / _MANIFEST.format(process_index), manifest)


def read_orbax_meta(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Reads and checks a step's JSON meta item (format, version, every key and value type).

    Args:
      folder: the step folder.

    Returns:
      The metadata dict.

    Raises:
      CheckpointError: it is unreadable, not JSON, of another format, or lacks or mistypes a key.
    """
    folder = Path(folder)
    path = folder / META_ITEM / _META_FILE
    try:
        meta = read_json(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}", detail=str(e)) from e
    if meta.get("format") != ORBAX_FORMAT or meta.get("version") != ORBAX_VERSION:
        raise CheckpointError(f"{path} is not {ORBAX_FORMAT} version {ORBAX_VERSION} metadata")
    problems = _type_problems(meta, _META_TYPES, "meta")
    for i, leaf in enumerate(meta.get("leaves") or []):
        where = f"meta['leaves'][{i}]"
        problems += _type_problems(leaf, _LEAF_KEYS, where) if isinstance(leaf, dict) else [f"{where} is not an object"]
    if not problems and folder.name != str(meta["step"]):
        problems.append(f"meta['step'] is {meta['step']} in folder {folder.name}")
    if problems:
        raise CheckpointError(f"{path} is corrupt: {problems[0]}", detail="; ".join(problems))
    return meta


def _read_manifests(folder: Path, count: int) -> dict[str, dict[str, Any]]:
    """The files listed by a step's ``count`` manifests (each must be there and be its process's)."""
    listed: dict[str, dict[str, Any]] = {}
    for i in range(count):
        path = folder / _MANIFEST.format(i)
        if not path.is_file():
            raise CheckpointError(f"{folder} lacks {path.name}: process {i} of {count} did not finish its save")
        try:
            manifest = read_json(path)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path}", detail=str(e)) from e
        if manifest.get("process_index") != i or not isinstance(manifest.get("files"), dict):
            raise CheckpointError(f"{path} is corrupt (not process {i}'s manifest)")
        listed.update(manifest["files"])
    return listed


def verify_orbax_checkpoint(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Checks a step: its meta, that every manifest is there, and every file's presence, size and SHA-256.

    Args:
      folder: the step folder.

    Returns:
      Its metadata.

    Raises:
      CheckpointError: the first problem found (digests and file names in ``detail``).
    """
    folder = Path(folder)
    meta = read_orbax_meta(folder)
    listed = _read_manifests(folder, meta["process_count"])
    unlisted = sorted(set(_data_files(folder)) - set(listed))
    if unlisted:
        raise CheckpointError(f"{folder} holds files no manifest lists", detail=f"{unlisted[:5]}")
    for rel, info in listed.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing")
        if path.stat().st_size != info.get("bytes"):
            raise CheckpointError(f"{path} is corrupt (truncated or extended)",
                                  detail=f"{path.stat().st_size} bytes, its manifest records {info.get('bytes')}")
    for rel, info in listed.items():
        digest = sha256_file(folder / rel)
        if digest != info.get("sha256"):
            raise CheckpointError(f"{folder / rel} is corrupt (its SHA-256 differs from its manifest's)",
                                  detail=f"SHA-256 {digest}, the manifest records {info.get('sha256')}")
    return meta


def _checked(folder: Path) -> dict[str, Any]:
    try:
        return verify_orbax_checkpoint(folder)
    except CheckpointError as e:
        if e.detail:
            logger.debug("%s: %s", folder, e.detail)
        raise


def find_orbax_checkpoint(path: str | os.PathLike[str]) -> tuple[Path, dict[str, Any]]:
    """The step to load, as this process sees it: ``path`` itself when it is a step folder, else the run's
    newest step that verifies (a skipped newer one gives one warning line, its details at DEBUG level).

    Args:
      path: a step folder, a run directory or its ``orbax`` folder.

    Returns:
      (step folder, its metadata).

    Raises:
      FileNotFoundError: ``path`` does not exist or holds no step.
      CheckpointError: the named step, or every step of the run, fails verification (``reasons`` per step).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint or run directory: {path}")
    if is_orbax_step(path):
        return path, _checked(path)
    candidates = list_orbax_checkpoints(path)
    if not candidates:
        raise FileNotFoundError(f"no orbax checkpoint in {path} (expected {ORBAX}/<step>/)")
    return newest_valid(candidates, _checked, f"no orbax checkpoint in {path}", lambda f: f"step {f.name}")


# --------------------------------------------------------------------------- pruning


def retire_step(folder: Path) -> None:
    """Renames a step folder out of the step namespace (durably), then deletes it."""
    trash = folder.with_name(f"{_TRASH}{folder.name}-{os.getpid()}")
    shutil.rmtree(trash, ignore_errors=True)
    rename_durably(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _complete(folder: Path) -> bool:
    """Meta readable and every manifest present (no hashing)."""
    try:
        _read_manifests(folder, read_orbax_meta(folder)["process_count"])
    except CheckpointError:
        return False
    return True


def prune_orbax_checkpoints(run_dir: str | os.PathLike[str], keep: int) -> None:
    """Keeps the newest ``keep`` complete steps; retires the others (older or incomplete) and finishes
    deleting leftovers of interrupted prunes. Called by one process, with no save in flight.

    Args:
      run_dir: the run directory (or its ``orbax`` folder).
      keep: how many complete steps to keep (>= 1).
    """
    folder = orbax_dir(run_dir)
    for p in folder.iterdir():
        if p.name.startswith(_TRASH):
            shutil.rmtree(p, ignore_errors=True)  # already invisible: safe to finish deleting
    steps = list_orbax_checkpoints(folder)
    kept = [p for p in steps if _complete(p)][-keep:]
    for p in steps:
        if p not in kept:
            retire_step(p)
