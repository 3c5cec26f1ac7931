"""A training run's checkpoints in either format: one-process safetensors (``checkpoints/step_*``,
:mod:`flaxgpt.io.checkpoint`) or sharded orbax (``orbax/<step>``, :mod:`flaxgpt.io.orbax_checkpoint`).

The loaders of :mod:`flaxgpt.io.checkpoint` read either format; these functions decide which format a run
writes, so a run written by several processes resumes on one (and the other way round).
"""

from __future__ import annotations

import os
from pathlib import Path

from flaxgpt.io.checkpoint import CHECKPOINTS, list_checkpoints

__all__ = [
    "checkpoint_format_of",
    "run_checkpoint_format",
    "has_checkpoints",
    "run_of_checkpoint",
]

PathLike = str | os.PathLike[str]


def checkpoint_format_of(path: PathLike) -> str | None:
    """The checkpoint format of a run folder or checkpoint folder: "orbax", "safetensors", or None (none).

    Args:
      path: a run folder, a ``checkpoints/step_*`` folder or an ``orbax/<step>`` folder.

    Returns:
      The format name, or None when the folder holds no checkpoint of either kind.
    """
    from flaxgpt.io.orbax_dir import is_orbax_run

    path = Path(path)
    if is_orbax_run(path):
        return "orbax"
    if (path / "meta.json").is_file() or (path.is_dir() and list_checkpoints(path)):
        return "safetensors"
    return None


def run_checkpoint_format(run: PathLike, requested: str = "auto") -> str:
    """The format a run writes its checkpoints in: the one it already has, else ``requested`` ("auto": orbax
    on several processes, else safetensors).

    Args:
      run: the run folder.
      requested: "auto", "safetensors" or "orbax".

    Returns:
      "safetensors" or "orbax".

    Raises:
      ValueError: ``requested`` names another format than the run already has.
    """
    import jax

    have = checkpoint_format_of(run)
    if requested not in ("auto", "safetensors", "orbax"):
        raise ValueError(f'checkpoint format must be "auto", "safetensors" or "orbax", got {requested!r}')
    if have is not None and requested not in ("auto", have):
        raise ValueError(f"{run} holds {have} checkpoints; --checkpoint-format {requested} would mix formats")
    multi = jax.process_count() > 1
    if multi and (have == "safetensors" or requested == "safetensors"):
        raise ValueError("safetensors checkpoints are written by one process; on several processes use orbax "
                         f"(for a one-process run such as {run}: continue it on one process, or start a new --out)")
    if have is not None:
        return have
    return ("orbax" if multi else "safetensors") if requested == "auto" else requested


def has_checkpoints(run: PathLike) -> bool:
    """True when the run folder holds a checkpoint folder of either format (valid or not)."""
    run = Path(run)
    return any((run / CHECKPOINTS).glob("step_*")) or checkpoint_format_of(run) == "orbax"


def run_of_checkpoint(ckpt: PathLike) -> Path:
    """The run folder of a checkpoint folder (``RUN/checkpoints/step_N`` or ``RUN/orbax/N``)."""
    return Path(ckpt).parent.parent
