"""Book chapter 5: the train state, a pure jitted train step, evaluation, and the book's
``train_model_simple`` loop with crash-safe checkpoints and exact resume."""

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
import jax.numpy as jnp
import numpy as np

from flaxgpt.book.generate import generate_text_simple
from flaxgpt.io.checkpoint import list_checkpoints, save_checkpoint
from flaxgpt.training.metrics import METRICS_FILE, append_metrics, truncate_metrics
from flaxgpt.training.state import TrainState, eval_step, train_step
from flaxgpt.validation import check_token_ids

__all__ = [
    "evaluate",
    "Position",
    "FitResult",
    "NonFiniteLossError",
    "fit",
    "greedy_sample",
]

logger = logging.getLogger(__name__)

Batch = tuple[Any, Any]
ShardBatch = Callable[[np.ndarray, np.ndarray], Batch]
Callback = Callable[[str, dict[str, Any]], None]


train_step.__doc__ = """One optimizer (micro-)step: loss, gradients, update. Jitted once; ``state`` is donated.

Args:
  state: the train state (invalid after the call: use the returned one).
  inputs: (B, T) int32 token ids.
  targets: (B, T) int32 next-token ids (-100 to ignore a position).
  key: the run's PRNG key; dropout uses ``fold_in(key, state.step)``, so a run is a function of its seed.

Returns:
  (new state, float32 scalar loss of this batch before the update).
"""


def _default_place(inputs: np.ndarray, targets: np.ndarray) -> Batch:
    return jnp.asarray(inputs), jnp.asarray(targets)


def evaluate(
    state: TrainState,
    loader: Any,
    num_batches: int | None = None,
    shard_batch: ShardBatch | None = None,
) -> float:
    """The book's ``calc_loss_loader``: mean of per-batch losses over the first ``num_batches`` batches.

    The batches are those of the loader's epoch 0 (``loader.batches(0)``), so repeated evaluations see
    the same batches and the loader's own epoch counter is untouched.

    Args:
      state: the train state.
      loader: a :class:`flaxgpt.data.DataLoader` (anything with ``len()`` and ``batches(epoch)``).
      num_batches: how many batches (all when None or larger than the loader).
      shard_batch: places a numpy batch on devices (default: ``jnp.asarray``).

    Returns:
      The mean loss, or NaN for an empty loader (as the book).
    """
    n = len(loader)
    if n == 0:
        return float("nan")
    n = n if num_batches is None else min(int(num_batches), n)
    if n <= 0:
        raise ValueError(f"num_batches must be positive, got {num_batches!r}")
    place = shard_batch or _default_place
    losses = []
    for i, (x, y) in enumerate(loader.batches(0)):
        if i >= n:
            break
        losses.append(eval_step(state, *place(x, y)))
    return float(np.mean([float(v) for v in losses]))


# --------------------------------------------------------------------------- the training loop


@dataclasses.dataclass(frozen=True)
class Position:
    """Where training continues: the epoch, the index of the next batch in it, and tokens seen."""

    epoch: int = 0
    batch_index: int = 0
    tokens_seen: int = 0


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


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite; training stopped without saving that state."""


class _StopFlag:
    signum: int | None = None


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


def _check_loader_ids(loader: Any, vocab_size: int, name: str) -> None:
    dataset = getattr(loader, "dataset", None)
    ids = getattr(dataset, "token_ids", None)
    if ids is not None:
        check_token_ids(ids, vocab_size, name=f"{name} token ids")


def _non_finite_message(loss: float, epoch: int, batch: int, updates: int, run_dir: Path | None) -> str:
    ckpts = list_checkpoints(run_dir) if run_dir is not None else []
    kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "there is no checkpoint yet"
    return (
        f"training loss became {loss} at epoch {epoch + 1}, batch {batch}, update {updates + 1}; "
        f"training stopped without saving this state; {kept} "
        "(try a lower learning rate, warmup or gradient clipping)"
    )


def greedy_sample(state: TrainState, tokenizer: Any, start_context: str, max_new_tokens: int = 50) -> str:
    """The book's ``generate_and_print_sample``, returning the text: greedy continuation of a prompt.

    Args:
      state: the train state (its model and params are used).
      tokenizer: a tiktoken Encoding or a Tokenizer.
      start_context: the prompt.
      max_new_tokens: tokens to generate.

    Returns:
      The prompt and its continuation, decoded.
    """
    from flaxgpt.text.tokenizers import text_to_token_ids, token_ids_to_text

    cfg = state.model.cfg
    ids = text_to_token_ids(start_context, tokenizer)  # (1, T)
    out = generate_text_simple(state.model, state.params, ids, max_new_tokens, cfg.context_length)
    return token_ids_to_text(np.asarray(out), tokenizer)


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
    shard_batch: ShardBatch | None = None,
    step_fn: Callable[..., tuple[TrainState, jax.Array]] | None = None,
    handle_signals: bool = True,
) -> FitResult:
    """The book's ``train_model_simple``, with checkpoints, exact resume and a NaN guard.

    Trains ``num_epochs`` epochs (or until ``max_steps`` optimizer updates in total). Evaluates train and
    validation loss over ``eval_iter`` batches after update 1, 1 + eval_freq, 1 + 2 * eval_freq, ...
    (the book's 0-based ``global_step % eval_freq == 0``) and after the final update, and, with a
    tokenizer, logs a greedy sample of ``start_context`` after each epoch. With ``run_dir``, appends
    each evaluation to ``run_dir/metrics.jsonl`` and saves a checkpoint every ``checkpoint_every``
    updates, at the end, and on SIGINT/SIGTERM (then returns with ``stopped`` naming the signal).

    Args:
      state: from :func:`create_train_state` or :func:`flaxgpt.checkpoint.restore_checkpoint`.
      train_loader: a shuffling :class:`flaxgpt.data.DataLoader`; epoch e's batches are
        ``train_loader.batches(e)``.
      val_loader: the validation loader.
      key: the run's PRNG key (dropout keys are ``fold_in(key, step)``).
      num_epochs: epochs in total (also across resumes).
      eval_freq: updates between evaluations.
      eval_iter: batches per evaluation.
      max_steps: stop after this many optimizer updates in total (None: no limit).
      tokenizer: for the per-epoch sample (None: no sample).
      start_context: the sample's prompt.
      sample_tokens: tokens the sample generates.
      run_dir: where checkpoints and metrics.jsonl go (None: nowhere).
      checkpoint_every: updates between checkpoints (None or 0: only at the end and on signals).
      keep_checkpoints: checkpoints kept.
      start: the position to resume from (from the checkpoint's metadata); None starts at epoch 0.
      accumulate_steps: micro-batches per update, as given to ``make_optimizer``.
      tokenizer_name: recorded in checkpoints.
      checkpoint_extra: more metadata for checkpoints (e.g. the training arguments).
      callback: called as ``callback(event, info)`` with event "step" (after every micro-batch),
        "eval", "sample" or "checkpoint".
      shard_batch: places a numpy (inputs, targets) batch on devices (default ``jnp.asarray``);
        e.g. ``jax.device_put`` with a ``NamedSharding`` for data parallelism.
      step_fn: the training step, ``(state, inputs, targets, key) -> (state, loss)``; default
        :data:`train_step` (e.g. pass ``flaxgpt.sharding.sharded_train_step(train_step, state, mesh)``).
      handle_signals: catch SIGINT/SIGTERM (main thread only) and stop cleanly with a checkpoint.

    Returns:
      A :class:`FitResult`.

    Raises:
      NonFiniteLossError: the loss became NaN/inf; the newest checkpoint on disk is the last good one.
    """
    for name, value, low in (
        ("num_epochs", num_epochs, 0),
        ("eval_freq", eval_freq, 1),
        ("eval_iter", eval_iter, 1),
        ("accumulate_steps", accumulate_steps, 1),
        ("sample_tokens", sample_tokens, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 0):
        raise ValueError(f"max_steps must be None or an int >= 0, got {max_steps!r}")
    if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 0):
        raise ValueError(f"checkpoint_every must be None or an int >= 0, got {checkpoint_every!r}")
    n_batches = len(train_loader)
    if n_batches == 0:
        raise ValueError("the training loader yields no batches")
    cfg = state.model.cfg
    _check_loader_ids(train_loader, cfg.vocab_size, "training")
    _check_loader_ids(val_loader, cfg.vocab_size, "validation")

    place = shard_batch or _default_place
    step_fn = step_fn or train_step
    emit = callback or (lambda event, info: None)
    run_dir = Path(run_dir) if run_dir is not None else None
    metrics_path = run_dir / METRICS_FILE if run_dir is not None else None
    seed = int(getattr(train_loader, "seed", 0))

    start = start or Position()
    micro = int(state.step)
    updates = micro // accumulate_steps
    epoch, first_batch, tokens_seen = start.epoch, start.batch_index, start.tokens_seen
    if first_batch >= n_batches:
        epoch, first_batch = epoch + 1, 0
    last_eval = last_saved = None
    if metrics_path is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        kept = truncate_metrics(metrics_path, updates)
        last_eval = kept[-1]["step"] if kept and kept[-1].get("step") == updates else None
    if start.epoch or start.batch_index or micro:
        last_saved = updates  # resumed from a checkpoint at this step
    result = FitResult(state, [], [], [], [], "epochs", Position(epoch, first_batch, tokens_seen), 0, None)
    t0 = time.perf_counter()

    def position(e: int, b: int) -> Position:
        return Position(e + 1, 0, tokens_seen) if b >= n_batches else Position(e, b, tokens_seen)

    def save(pos: Position) -> None:
        nonlocal last_saved
        if run_dir is None:
            return
        path = save_checkpoint(
            run_dir,
            state,
            step=updates,
            key=key,
            config=cfg,
            epoch=pos.epoch,
            batch_index=pos.batch_index,
            seed=seed,
            tokens_seen=pos.tokens_seen,
            tokenizer=tokenizer_name,
            extra=checkpoint_extra,
            keep=keep_checkpoints,
        )
        last_saved, result.last_checkpoint = updates, path
        emit("checkpoint", {"step": updates, "path": str(path)})

    def run_eval(e: int, b: int) -> None:
        nonlocal last_eval
        train_loss = evaluate(state, train_loader, eval_iter, place)
        val_loss = evaluate(state, val_loader, eval_iter, place)
        record = {
            "step": updates,
            "epoch": e + 1,
            "epochs_done": e + b / n_batches,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "tokens_seen": tokens_seen,
            "time_s": round(time.perf_counter() - t0, 3),
        }
        result.train_losses.append(train_loss)
        result.val_losses.append(val_loss)
        result.track_tokens_seen.append(tokens_seen)
        result.eval_steps.append(updates)
        last_eval = updates
        if metrics_path is not None:
            append_metrics(metrics_path, record)
        logger.info(
            "Ep %d (Step %06d): Train loss %.3f, Val loss %.3f", e + 1, updates, train_loss, val_loss
        )
        emit("eval", record)

    def epoch_sample(e: int) -> None:
        if tokenizer is None or sample_tokens == 0:
            return
        text = greedy_sample(state, tokenizer, start_context, sample_tokens)
        logger.info("%s", text.replace("\n", " "))
        emit("sample", {"epoch": e + 1, "step": updates, "text": text})

    with _stop_on_signals(handle_signals) as stop:
        b = first_batch
        while epoch < num_epochs and result.stopped == "epochs":
            if max_steps is not None and updates >= max_steps:
                result.stopped = "max_steps"
                break
            b = first_batch
            for x, y in train_loader.batches(epoch, first_batch):
                state, loss_arr = step_fn(state, *place(x, y), key)
                loss = float(loss_arr)
                if not math.isfinite(loss):
                    raise NonFiniteLossError(_non_finite_message(loss, epoch, b, updates, run_dir))
                micro += 1
                b += 1
                tokens_seen += int(np.size(x))
                boundary = micro % accumulate_steps == 0
                if boundary:
                    updates += 1
                info = {"step": updates, "micro_step": micro, "epoch": epoch + 1, "loss": loss}
                emit("step", dict(info, tokens_seen=tokens_seen, time_s=time.perf_counter() - t0))
                if boundary and (updates - 1) % eval_freq == 0:
                    run_eval(epoch, b)
                if boundary and checkpoint_every and updates % checkpoint_every == 0:
                    save(position(epoch, b))
                if stop.signum is not None:
                    result.stopped = signal.Signals(stop.signum).name
                    save(position(epoch, b))
                    break
                if boundary and max_steps is not None and updates >= max_steps:
                    result.stopped = "max_steps"
                    break
            if b >= n_batches:  # the epoch is complete
                if stop.signum is None:
                    epoch_sample(epoch)
                epoch, first_batch = epoch + 1, 0
            else:
                first_batch = b
        pos = Position(epoch, first_batch, tokens_seen)
        if result.stopped in ("epochs", "max_steps"):
            if updates > 0 and last_eval != updates:
                run_eval(max(epoch - (first_batch == 0), 0), first_batch or n_batches)
            if last_saved != updates:
                save(pos)
    result.state, result.position, result.updates = state, pos, updates
    return result
