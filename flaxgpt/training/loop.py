"""Book chapter 5's ``train_model_simple`` as one task-agnostic loop: evaluation cadence, checkpoints,
exact resume, SIGINT/SIGTERM, the NaN stop and the per-epoch sample. What a batch means (its loss and
metrics) comes from a :class:`flaxgpt.training.tasks.Task`; pretraining is the default one."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxgpt.training.evaluation import evaluate, evaluate_metrics, greedy_sample, placer, stepper
from flaxgpt.training.run_dir import Position, RunDir
from flaxgpt.training.state import TrainState
from flaxgpt.training.tasks import PRETRAIN, Task
from flaxgpt.validation import check_int, check_optional_int

__all__ = ["evaluate", "Position", "FitResult", "NonFiniteLossError", "fit", "greedy_sample"]

logger = logging.getLogger(__name__)

Callback = Callable[[str, dict[str, Any]], None]


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    Attributes:
      state: the final train state.
      train_losses, val_losses, track_tokens_seen, eval_steps: one entry per evaluation of this call
        (the book's three lists, plus the update count of each).
      stopped: "epochs" (all epochs done), "max_steps", "SIGINT" or "SIGTERM".
      position: where a resumed run would continue.
      updates: optimizer updates done in total.
      last_checkpoint: the newest checkpoint written (None without ``run_dir``).
      history: the evaluation records of this call (as written to metrics.jsonl, with every metric).
    """

    state: TrainState
    train_losses: list[float]
    val_losses: list[float]
    track_tokens_seen: list[int]
    eval_steps: list[int]
    stopped: str
    position: Position
    updates: int
    last_checkpoint: Path | None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stopped without saving that state."""


class _StopFlag:
    """``signum``: the signal this process got, set by the handler at any moment. ``agreed``: the signal taken
    at the step's one decision point (on several processes: if any of them got one), which alone decides
    whether training stops, so that every process stops after the same step and saves together."""

    signum: int | None = None
    agreed: int | None = None


@contextlib.contextmanager
def _stop_on_signals(enabled: bool) -> Iterator[_StopFlag]:
    """Turns SIGINT/SIGTERM into a flag for the duration (main thread only); restores the handlers."""
    flag = _StopFlag()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: Any) -> None:
        del frame
        flag.signum = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@dataclasses.dataclass(frozen=True)
class _Options:
    """fit's checked settings."""

    num_epochs: int
    eval_freq: int
    eval_iter: int
    max_steps: int | None
    accumulate_steps: int
    tokenizer: Any
    start_context: str
    sample_tokens: int

    def __post_init__(self) -> None:
        for name, low in (("num_epochs", 0), ("eval_freq", 1), ("eval_iter", 1), ("accumulate_steps", 1),
                          ("sample_tokens", 0)):
            check_int(name, getattr(self, name), low)
        check_optional_int("max_steps", self.max_steps, 0)


class _Loop:
    """One call of :func:`fit`: the counters, and the steps of an epoch."""

    def __init__(self, state: TrainState, loaders: tuple[Any, Any], key: jax.Array, task: Task,
                 opts: _Options, run: RunDir, start: Position, place: Any, step: Any, emit: Callback):
        self.state, (self.train, self.val), self.key, self.task = state, loaders, key, task
        self.opts, self.run, self.place, self.step, self.emit = opts, run, place, step, emit
        self.n_batches = len(self.train)
        self.micro = int(state.step)
        self.updates = self.micro // opts.accumulate_steps
        self.epoch, self.first_batch, self.tokens_seen = start.epoch, start.batch_index, start.tokens_seen
        self.processes = jax.process_count()
        if self.first_batch >= self.n_batches:
            self.epoch, self.first_batch = self.epoch + 1, 0
        kept = run.open(self.updates)
        self.last_eval = kept[-1]["step"] if kept and kept[-1].get("step") == self.updates else None
        if start.epoch or start.batch_index or self.micro:
            run.last_saved = self.updates  # resumed from a checkpoint at this step
        self.seed = int(getattr(self.train, "seed", 0))
        self.stopped = "epochs"
        self.result = FitResult(state, [], [], [], [], "epochs", self.position(self.epoch, self.first_batch),
                                0, None)
        # time_s counts the run's training time across resumes: it goes on from the last evaluation kept
        self.t0 = time.perf_counter() - float(kept[-1].get("time_s", 0.0) if kept else 0.0)

    def position(self, e: int, b: int) -> Position:
        """Where training continues after batch ``b`` of epoch ``e`` (the next epoch after the last)."""
        if b >= self.n_batches:
            return Position(e + 1, 0, self.tokens_seen)
        return Position(e, b, self.tokens_seen)

    def save(self, pos: Position) -> None:
        path = self.run.save(self.state, step=self.updates, key=self.key, config=self.state.model.cfg,
                             position=pos, seed=self.seed)
        if path is not None:
            self.result.last_checkpoint = path
            self.emit("checkpoint", {"step": self.updates, "path": str(path)})

    def evaluate(self, e: int, b: int) -> None:
        """Train and validation metrics over ``eval_iter`` batches; logged, recorded and emitted."""
        n = self.opts.eval_iter
        train = evaluate_metrics(self.state, self.train, self.task, n, self.place)
        val = evaluate_metrics(self.state, self.val, self.task, n, self.place)
        record = {"step": self.updates, "epoch": e + 1, "epochs_done": e + b / self.n_batches,
                  **{f"train_{k}": v for k, v in train.items()}, **{f"val_{k}": v for k, v in val.items()},
                  "tokens_seen": self.tokens_seen, "time_s": round(time.perf_counter() - self.t0, 3)}
        r = self.result
        r.train_losses.append(train["loss"])
        r.val_losses.append(val["loss"])
        r.track_tokens_seen.append(self.tokens_seen)
        r.eval_steps.append(self.updates)
        r.history.append(record)
        self.last_eval = self.updates
        self.run.log(record)
        extra = "".join(f", Val {k} {v:.3f}" for k, v in val.items() if k != "loss")
        logger.info("Ep %d (Step %06d): Train loss %.3f, Val loss %.3f%s",
                    e + 1, self.updates, train["loss"], val["loss"], extra)
        self.emit("eval", record)

    def sample(self, e: int) -> None:
        tokenizer, n = self.opts.tokenizer, self.opts.sample_tokens
        if tokenizer is None or n == 0:
            return
        text = greedy_sample(self.state, tokenizer, self.opts.start_context, n)
        logger.info("%s", text.replace("\n", " "))
        record = {"epoch": e + 1, "step": self.updates, "text": text}
        self.run.log_sample(record)
        self.emit("sample", record)

    def train_batch(self, batch: Any, b: int) -> bool:
        """One micro-batch at index ``b`` of the epoch; True at an optimizer-update boundary."""
        self.state, loss_arr = self.step(self.state, self.place(batch), self.key)
        loss = float(loss_arr)
        if not math.isfinite(loss):
            raise NonFiniteLossError(self.non_finite_message(loss, b))
        self.micro += 1
        self.tokens_seen += self._global_count(self.task.count(batch))
        boundary = self.micro % self.opts.accumulate_steps == 0
        if boundary:
            self.updates += 1
        info = {"step": self.updates, "micro_step": self.micro, "epoch": self.epoch + 1, "loss": loss}
        self.emit("step", dict(info, tokens_seen=self.tokens_seen, time_s=time.perf_counter() - self.t0))
        return boundary

    def _global_count(self, count: int) -> int:
        """The batch's count summed over the processes (each holds its share)."""
        if self.processes == 1:
            return count
        from jax.experimental import multihost_utils

        return int(np.asarray(multihost_utils.process_allgather(np.array([count], np.int64))).sum())

    def _signalled(self, stop: _StopFlag) -> bool:
        """The step's decision point: True when this process, or on several processes any of them, got a
        signal so far. A signal that comes later is taken at the next step's decision point on every process
        alike (reading ``stop.signum`` anywhere else could let one process stop a step before the others)."""
        signum = stop.signum or 0
        if self.processes > 1:
            from jax.experimental import multihost_utils

            signum = int(np.asarray(multihost_utils.process_allgather(np.array([signum], np.int64))).max())
        stop.agreed = signum or None
        return stop.agreed is not None

    def non_finite_message(self, loss: float, b: int) -> str:
        ckpts = self.run.checkpoints()
        kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "there is no checkpoint yet"
        return (f"training loss became {loss} at epoch {self.epoch + 1}, batch {b}, update {self.updates + 1}; "
                f"training stopped without saving this state; {kept} "
                "(try a lower learning rate, warmup or gradient clipping)")

    def run_epoch(self, stop: _StopFlag) -> None:
        """Trains the current epoch from ``first_batch`` until its end, ``max_steps`` or a signal."""
        max_steps, b = self.opts.max_steps, self.first_batch
        for batch in self.train.batches(self.epoch, self.first_batch):
            boundary = self.train_batch(batch, b)
            b += 1
            if boundary and (self.updates - 1) % self.opts.eval_freq == 0:
                self.evaluate(self.epoch, b)
            if boundary and self.run.due(self.updates):
                self.save(self.position(self.epoch, b))
            if self._signalled(stop):
                self.stopped = signal.Signals(stop.agreed).name
                self.save(self.position(self.epoch, b))
                break
            if boundary and max_steps is not None and self.updates >= max_steps:
                self.stopped = "max_steps"
                break
        if b >= self.n_batches:  # the epoch is complete
            if stop.agreed is None:
                self.sample(self.epoch)
            self.epoch, self.first_batch = self.epoch + 1, 0
        else:
            self.first_batch = b

    def run_all(self, stop: _StopFlag) -> FitResult:
        """Epochs until done, then the final evaluation and checkpoint (not after a signal)."""
        max_steps = self.opts.max_steps
        while self.epoch < self.opts.num_epochs and self.stopped == "epochs":
            if max_steps is not None and self.updates >= max_steps:
                self.stopped = "max_steps"
                break
            self.run_epoch(stop)
        pos = Position(self.epoch, self.first_batch, self.tokens_seen)
        if self.stopped in ("epochs", "max_steps"):
            if self.updates > 0 and self.last_eval != self.updates:
                self.evaluate(max(self.epoch - (self.first_batch == 0), 0), self.first_batch or self.n_batches)
            if self.run.last_saved != self.updates:
                self.save(pos)
        r = self.result
        r.state, r.position, r.updates, r.stopped = self.state, pos, self.updates, self.stopped
        return r


def fit(
    state: TrainState,
    train_loader: Any,
    val_loader: Any,
    *,
    key: jax.Array,
    num_epochs: int,
    eval_freq: int = 5,
    eval_iter: int = 5,
    max_steps: int | None = None,
    tokenizer: Any = None,
    start_context: str = "Every effort moves you",
    sample_tokens: int = 50,
    run_dir: str | Path | None = None,
    checkpoint_every: int | None = None,
    keep_checkpoints: int = 3,
    start: Position | None = None,
    accumulate_steps: int = 1,
    tokenizer_name: str = "gpt2",
    checkpoint_extra: dict[str, Any] | None = None,
    callback: Callback | None = None,
    shard_batch: Callable[..., Any] | None = None,
    step_fn: Callable[..., tuple[TrainState, jax.Array]] | None = None,
    handle_signals: bool = True,
    task: Task | None = None,
    checkpoint_format: str = "auto",
    async_checkpoints: bool = False,
) -> FitResult:
    """The book's ``train_model_simple``, for any task, with checkpoints, exact resume and a NaN guard.

    Trains ``num_epochs`` epochs (or until ``max_steps`` optimizer updates in total). Evaluates the
    task's metrics on train and validation over ``eval_iter`` batches after update 1, 1 + eval_freq,
    1 + 2 * eval_freq, ... (the book's 0-based ``global_step % eval_freq == 0``) and after the final
    update, and, with a tokenizer, logs a greedy sample of ``start_context`` after each epoch. With
    ``run_dir``, appends each evaluation to ``run_dir/metrics.jsonl`` (``train_<metric>``,
    ``val_<metric>``, step, epoch, epochs_done, tokens_seen, time_s) and saves a checkpoint every
    ``checkpoint_every`` updates, at the end, and on SIGINT/SIGTERM (then returns with ``stopped``
    naming the signal).

    Args:
      state: from :func:`create_train_state` or :func:`flaxgpt.io.checkpoint.restore_checkpoint`.
      train_loader: yields the task's batches: ``len()`` and ``batches(epoch, start)`` (e.g. a shuffling
        :class:`flaxgpt.data.windows.DataLoader`), its order a function of ``(seed, epoch)``.
      val_loader: the validation loader (``len()`` and ``batches(0)``).
      key, num_epochs: the run's PRNG key (dropout keys are ``fold_in(key, step)``); epochs in total.
      eval_freq, eval_iter: updates between evaluations, and batches per evaluation.
      max_steps: stop after this many optimizer updates in total (None: no limit).
      tokenizer, start_context, sample_tokens: the per-epoch greedy sample's tokenizer (None: no
        sample), prompt and length.
      run_dir: where checkpoints and metrics.jsonl go (None: nowhere); see :class:`RunDir`.
      checkpoint_every, keep_checkpoints: updates between checkpoints (None or 0: only at the end and
        on signals) and how many are kept.
      start: the position to resume from (from the checkpoint's metadata); None starts at epoch 0.
      accumulate_steps: micro-batches per update, as given to ``make_optimizer``.
      tokenizer_name, checkpoint_extra: recorded in checkpoints (extra: e.g. the training arguments).
      callback: called as ``callback(event, info)`` with event "step" (after every micro-batch),
        "eval", "sample" or "checkpoint".
      shard_batch: places a numpy batch on devices, called with the batch's elements
        (``shard_batch(inputs, targets)`` for pretraining; default ``jnp.asarray``).
      step_fn: the step, ``step_fn(state, inputs, targets, key) -> (state, loss)`` for pretraining (a
        tuple batch's elements, then the key); default :func:`~flaxgpt.training.state.make_train_step`.
      handle_signals: catch SIGINT/SIGTERM (main thread only) and stop cleanly with a checkpoint.
      task: the loss and metrics of a batch (default :class:`flaxgpt.training.tasks.PretrainTask`).
      checkpoint_format: "safetensors", "orbax" (sharded; every process writes its shards) or "auto" (orbax
        on several processes); see :class:`RunDir`.
      async_checkpoints: orbax checkpoints are written in the background while training goes on (fit waits
        for the last one before it returns).

    Returns:
      A :class:`FitResult`.

    Raises:
      NonFiniteLossError: the loss became NaN/inf; the newest checkpoint on disk is the last good one.
      flaxgpt.training.run_dir.RunDirError: ``run_dir`` could not be written (nothing half-written kept).
    """
    opts = _Options(num_epochs, eval_freq, eval_iter, max_steps, accumulate_steps, tokenizer, start_context,
                    sample_tokens)
    check_optional_int("checkpoint_every", checkpoint_every, 0)
    if len(train_loader) == 0:
        raise ValueError("the training loader yields no batches")
    task = task or PRETRAIN
    vocab_size = state.model.cfg.vocab_size
    task.check_loader(train_loader, vocab_size, "training")
    task.check_loader(val_loader, vocab_size, "validation")
    run = RunDir(run_dir, checkpoint_every, keep_checkpoints, tokenizer_name, checkpoint_extra,
                 checkpoint_format=checkpoint_format, async_save=async_checkpoints)
    loop = _Loop(state, (train_loader, val_loader), key, task, opts, run, start or Position(),
                 placer(shard_batch), stepper(task, step_fn), callback or (lambda event, info: None))
    with _stop_on_signals(handle_signals) as stop:
        try:
            return loop.run_all(stop)
        finally:
            run.finish()  # asynchronous checkpoints: written before fit returns
