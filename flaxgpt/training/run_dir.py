"""The run directory that :func:`flaxgpt.training.loop.fit` writes: ``metrics.jsonl`` (one line per
evaluation), ``samples.jsonl`` (the per-epoch samples), checkpoints at a cadence (``checkpoints/step_*/``) and the loss figure.

Every write either completes or leaves nothing behind: checkpoints are written to a temporary folder and
renamed (:func:`flaxgpt.io.checkpoint.save_checkpoint`), metrics lines are taken back on a failed write,
and a write that fails (a read-only folder, a full disk) raises one :class:`RunDirError` that names the
file and the reason, after removing what it had started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError

from flaxgpt.distributed import is_primary
from flaxgpt.io.checkpoint import list_checkpoints, save_checkpoint
from flaxgpt.io.runs import run_checkpoint_format
from flaxgpt.training.metrics import METRICS_FILE, append_metrics, read_metrics, truncate_metrics

__all__ = ["LOSS_PLOT", "SAMPLES_FILE", "Position", "RunDir", "RunDirError"]

LOSS_PLOT = "loss.png"
SAMPLES_FILE = "samples.jsonl"  # the per-epoch samples, one JSON line each
CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class Position:
    """Where training continues: the epoch, the index of the next batch in it, and tokens seen."""

    epoch: int = 0
    batch_index: int = 0
    tokens_seen: int = 0


class RunDirError(OSError):
    """The run directory could not be written (read-only, full disk); nothing half-written was kept."""


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e)
    m = re.search(r'message: "([^"]+)"', text)  # safetensors wraps the OS error in its Rust debug form
    return m.group(1) if m else (text.splitlines() or [type(e).__name__])[0]


@dataclasses.dataclass
class RunDir:
    """A run folder and its write cadence; ``path`` None makes every method a no-op.

    Attributes:
      path: the run directory.
      checkpoint_every: updates between checkpoints (None or 0: only when :meth:`save` is called).
      keep: checkpoints kept.
      tokenizer_name: recorded in checkpoints.
      extra: more checkpoint metadata (e.g. the training arguments).
      last_saved: the update count of the newest checkpoint written or resumed from (None: none).
      last_checkpoint: the newest checkpoint written by this object.
      checkpoint_format: "safetensors" (one process: ``checkpoints/step_*``), "orbax" (sharded, every process
        writing its shards: ``orbax/<step>``), or "auto": orbax on several processes, else safetensors.

    On several processes every process calls every method (a checkpoint is a collective), but only process 0
    writes metrics.jsonl and the figures.
    """

    path: Path | None
    checkpoint_every: int | None = None
    keep: int = 3
    tokenizer_name: str = "gpt2"
    extra: dict[str, Any] | None = None
    last_saved: int | None = None
    last_checkpoint: Path | None = None
    checkpoint_format: str = "auto"
    async_save: bool = False

    def __post_init__(self) -> None:
        self.path = Path(self.path) if self.path is not None else None
        if self.checkpoint_format not in ("auto", "safetensors", "orbax"):
            raise ValueError(f'checkpoint_format must be "auto", "safetensors" or "orbax", got {self.checkpoint_format!r}')
        if self.path is not None:  # the rule of flaxgpt.io.runs: the run's own format, else orbax on several processes
            self.checkpoint_format = run_checkpoint_format(self.path, self.checkpoint_format)
        self.primary = is_primary()

    @property
    def metrics_path(self) -> Path | None:
        """``path/metrics.jsonl`` (None without a path)."""
        return self.path / METRICS_FILE if self.path is not None else None

    @contextlib.contextmanager
    def _writing(self, what: Path) -> Iterator[None]:
        try:
            yield
        except (OSError, SafetensorError) as e:
            raise RunDirError(f"cannot write {what}: {_reason(e)}") from e

    def open(self, updates: int) -> list[dict[str, Any]]:
        """Creates the folder and drops metrics of steps after ``updates`` (they are trained again).

        Args:
          updates: the optimizer updates of the state training starts from.

        Returns:
          The metrics records kept.
        """
        if self.path is None:
            return []
        if not self.primary:
            return [r for r in read_metrics(self.metrics_path) if r.get("step", 0) <= updates]
        with self._writing(self.path):
            self.path.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.path / SAMPLES_FILE, updates)
            return truncate_metrics(self.metrics_path, updates)

    def log(self, record: dict[str, Any]) -> None:
        """Appends an evaluation record to metrics.jsonl.

        Args:
          record: JSON-serialisable values.
        """
        if self.path is not None and self.primary:
            with self._writing(self.metrics_path):
                append_metrics(self.metrics_path, record)

    def log_sample(self, record: dict[str, Any]) -> None:
        """Appends a per-epoch sample (``{"epoch", "step", "text"}``) to samples.jsonl (process 0).

        Args:
          record: JSON-serialisable values.
        """
        if self.path is not None and self.primary:
            with self._writing(self.path / SAMPLES_FILE):
                append_metrics(self.path / SAMPLES_FILE, record)

    def due(self, updates: int) -> bool:
        """True when the cadence asks for a checkpoint after ``updates`` updates."""
        return bool(self.path is not None and self.checkpoint_every and updates % self.checkpoint_every == 0)

    def save(self, state: Any, *, step: int, key: Any, config: Any, position: Position, seed: int) -> Path | None:
        """Writes a checkpoint (see :func:`flaxgpt.io.checkpoint.save_checkpoint`).

        Args:
          state: the train state.
          step: optimizer updates done.
          key: the run's PRNG key.
          config: the model config.
          position: where a resumed run continues.
          seed: the training loader's shuffle seed.

        Returns:
          The checkpoint folder (None without a path).

        Raises:
          RunDirError: the write failed; no partial or temporary checkpoint folder is left.
        """
        if self.path is None:
            return None
        if self.checkpoint_format == "orbax":
            from flaxgpt.io.orbax_checkpoint import save_orbax_checkpoint  # orbax is imported only when used

            with self._writing(self.path):
                path = save_orbax_checkpoint(
                    self.path, state, step=step, key=key, config=config, epoch=position.epoch,
                    batch_index=position.batch_index, seed=seed, tokens_seen=position.tokens_seen,
                    tokenizer=self.tokenizer_name, extra=self.extra, keep=self.keep, async_save=self.async_save,
                )
            self.last_saved, self.last_checkpoint = step, path
            return path
        ckpt_dir = self.path / CHECKPOINTS
        existed = ckpt_dir.is_dir()
        try:
            with self._writing(ckpt_dir / f"step_{int(step):08d}"):
                path = save_checkpoint(
                    self.path, state, step=step, key=key, config=config, epoch=position.epoch,
                    batch_index=position.batch_index, seed=seed, tokens_seen=position.tokens_seen,
                    tokenizer=self.tokenizer_name, extra=self.extra, keep=self.keep,
                )
        except RunDirError:
            self._remove_leftovers(ckpt_dir, existed)
            raise
        self.last_saved, self.last_checkpoint = step, path
        return path

    def finish(self) -> None:
        """Waits until every checkpoint started is written (asynchronous orbax saves); a no-op otherwise."""
        if self.checkpoint_format == "orbax" and self.path is not None:
            from flaxgpt.io.orbax_checkpoint import wait_orbax_checkpoints

            with self._writing(self.path):
                wait_orbax_checkpoints()

    @staticmethod
    def _remove_leftovers(ckpt_dir: Path, existed: bool) -> None:
        """After a failed save: this process's temporary folders, and the checkpoints folder if it was
        created for this save and is empty."""
        if not ckpt_dir.is_dir():
            return
        for p in ckpt_dir.glob(f".tmp-*-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)
        if not existed and not any(ckpt_dir.iterdir()):
            with contextlib.suppress(OSError):
                ckpt_dir.rmdir()

    def checkpoints(self) -> list[Path]:
        """The run's complete checkpoints, oldest first (empty without a path)."""
        if self.path is None:
            return []
        if self.checkpoint_format == "orbax":
            from flaxgpt.io.orbax_checkpoint import list_orbax_checkpoints

            return list_orbax_checkpoints(self.path)
        return list_checkpoints(self.path)

    def plot(self, path: str | os.PathLike[str] | None = None, metric: str = "loss", seen: str = "Tokens seen") -> Path | None:
        """Draws metrics.jsonl as the book's figure of one metric (the loss by default).

        Args:
          path: the image (default ``path/loss.png``, or ``path/<metric>.png`` for another metric).
          metric: the metric to draw, as recorded (``train_<metric>`` and ``val_<metric>``).
          seen: the top axis' title ("Examples seen" for a classifier).

        Returns:
          The image written, or None when there is no run folder or no evaluation yet.
        """
        if self.path is None or not self.primary:
            return None
        from flaxgpt.training.plotting import plot_metrics

        records = read_metrics(self.metrics_path)
        if not records:
            return None
        default = LOSS_PLOT if metric == "loss" else f"{metric}.png"
        out = Path(path) if path is not None else self.path / default
        with self._writing(out):
            plot_metrics(records, out, metric, seen)
        return out
