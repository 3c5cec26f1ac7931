"""Streaming generation: the compiled decode loop hands each token to the host as soon as it is decoded.

:func:`generate_stream` runs the very program :func:`flaxgpt.generation.decode.generate` runs (same
prefill, same ``lax.while_loop``, same sampler) with one addition traced into it: after every step an
ordered :func:`jax.experimental.io_callback` passes the step's token to a host function. The jitted
call runs in a worker thread; the host function puts the token on a queue that the returned
:class:`TokenStream` iterator reads, so tokens arrive while the program is still running. There is no
Python loop over forward passes.

- **Compile once**: the host function is one module-level dispatcher, static in the program; which
  stream a token belongs to is a traced ``tag``, so every stream of the same (config, prompt bucket,
  new-token bucket) reuses one compiled program, whatever its prompt length, settings or key.
- **Backpressure and stopping**: the callback returns a bool that the loop ORs into its "done" flags.
  Closing the stream (``close()``, ``with``, or dropping it: a finalizer closes it) makes the next callback return true, which
  ends the compiled loop at once. With ``buffer=N`` the callback blocks while N tokens wait unread, so
  decoding never runs more than N tokens ahead of the reader (``None``: never blocks).
- **EOS**: the stream ends before the EOS token, as ``generate`` cuts its output before it.

:func:`stream_text` turns a token stream into text pieces that never split a UTF-8 character.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import queue
import threading
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from flaxgpt.generation.decode import _check_generate_args, _run_decode
from flaxgpt.nn.model import GPTModel, Params
from flaxgpt.validation import check_int

__all__ = ["TokenStream", "generate_stream", "stream_text"]

logger = logging.getLogger(__name__)

_DONE = object()  # queue sentinel: the compiled program has returned
_POLL_S = 0.05  # how often a blocked callback re-checks whether its stream was closed

_CHANNELS: dict[int, _Channel] = {}  # tag -> the host side of a running decode
_CHANNELS_LOCK = threading.Lock()
_TAGS = itertools.count()
_WORKERS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()  # joined at exit, finished or not


def _host_emit(tag: np.ndarray, step: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """The host side of the callback: hands row 0's token to its channel; returns "stop" (bool)."""
    with _CHANNELS_LOCK:
        channel = _CHANNELS.get(int(tag))
    if channel is None:  # closed and forgotten: stop decoding
        return np.bool_(True)
    return np.bool_(channel.offer(int(step), int(tok[0])))


def _emit(tag: jax.Array, step: jax.Array, tok: jax.Array) -> jax.Array:
    """Traced into the decode loop: one ordered host callback per step with its (B,) tokens."""
    return io_callback(_host_emit, jax.ShapeDtypeStruct((), jnp.bool_), tag, step, tok, ordered=True)


class _Channel:
    """What the running program and the reader share: the token queue, the unread-token budget and the
    "closed" / "finished" events. The worker thread holds the channel, never the :class:`TokenStream`, so a
    dropped stream is collected and its finalizer closes the channel, which stops the program."""

    def __init__(self, eos: int, buffer: int | None) -> None:
        self.queue: queue.Queue[Any] = queue.Queue()
        self.slots = threading.Semaphore(buffer) if buffer is not None else None
        self.closed = threading.Event()
        self.finished = threading.Event()
        self.eos = eos
        self.tag = next(_TAGS) % (2**31)
        with _CHANNELS_LOCK:
            _CHANNELS[self.tag] = self

    def offer(self, step: int, tok: int) -> bool:
        """Called from the running program; returns True to stop it."""
        if self.slots is not None:
            while not self.slots.acquire(timeout=_POLL_S):
                if self.closed.is_set():
                    return True
        if self.closed.is_set():
            return True
        self.queue.put((step, tok))
        return tok == self.eos

    def close(self) -> None:
        """Stops the program at its next step (does not wait)."""
        self.closed.set()
        with _CHANNELS_LOCK:
            _CHANNELS.pop(self.tag, None)

    def work(self, start: Any) -> None:
        error = None
        try:
            start(np.int32(self.tag))
        except BaseException as e:  # handed to the reader, which re-raises it
            error = e
        self.finish(error)

    def finish(self, error: BaseException | None) -> None:
        self.close()
        self.finished.set()
        if error is not None:
            self.queue.put(error)
        self.queue.put(_DONE)


@atexit.register
def _close_all_at_exit() -> None:
    """Stops running decodes and joins their threads before the interpreter goes: a daemon thread still in
    XLA (or releasing its buffers) when the interpreter finalizes can abort the process."""
    with _CHANNELS_LOCK:
        channels = list(_CHANNELS.values())
    for channel in channels:
        channel.close()
    for thread in list(_WORKERS):
        thread.join(timeout=10.0)


class TokenStream(Iterator[int]):
    """An iterator over the tokens of one running compiled decode (see :func:`generate_stream`).

    Attributes:
      finished: a :class:`threading.Event`, set once the compiled program has returned.
    """

    def __init__(self, start: Any, eos: int, n: int, buffer: int | None) -> None:
        self._channel = _Channel(eos, buffer)
        self._ended = False
        self._expected = 0  # the next step number the reader should see
        self.finished = self._channel.finished
        weakref.finalize(self, self._channel.close)  # dropped unread: stop decoding
        if n == 0:
            self._channel.finish(None)
            return
        self._thread = threading.Thread(target=self._channel.work, args=(start,), daemon=True, name="flaxgpt-stream")
        _WORKERS.add(self._thread)
        self._thread.start()

    def __next__(self) -> int:
        if self._ended:
            raise StopIteration
        channel = self._channel
        item = channel.queue.get()
        if channel.slots is not None and isinstance(item, tuple):
            channel.slots.release()
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        if item is _DONE:
            self._ended = True
            raise StopIteration
        step, tok = item
        if step != self._expected:  # ordered callbacks make this impossible; never yield out of order
            self.close()
            raise RuntimeError(f"stream received step {step}, expected step {self._expected}")
        self._expected += 1
        if tok == channel.eos:
            self.close()
            raise StopIteration
        return tok

    def close(self) -> None:
        """Stops the decode (at its next step) and waits for the program to return. Idempotent."""
        self._channel.close()
        self._ended = True
        self.finished.wait()
        thread = getattr(self, "_thread", None)
        if thread is not None and thread is not threading.current_thread():
            thread.join()  # the worker has nothing left but to return

    def __enter__(self) -> TokenStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def generate_stream(
    model: GPTModel,
    params: Params,
    prompt_ids: Any,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    key: jax.Array | None = None,
    *,
    buffer: int | None = None,
) -> TokenStream:
    """Streams the new tokens of :func:`flaxgpt.generation.decode.generate` as they are decoded.

    Args:
      model: the model.
      params: its parameters.
      prompt_ids: one prompt: a non-empty 1-D sequence of token ids.
      max_new_tokens: at most this many tokens; prompt + new tokens must fit in ``context_length``.
      temperature: 0 for greedy decoding, else the sampling temperature.
      top_k: keep the k most likely tokens (None: all).
      top_p: nucleus threshold in (0, 1] (None: off).
      eos_id: the stream ends before this token (None: never).
      key: PRNG key, required when ``temperature > 0``; the same key gives ``generate``'s tokens.
      buffer: at most this many decoded tokens wait unread before decoding pauses (None: no limit).

    Returns:
      A :class:`TokenStream` yielding Python ints: exactly the new tokens ``generate`` returns for the
      same arguments (cut before EOS). Close it (or use ``with``) to stop decoding early.

    Raises:
      ValueError: before any compute, for the same bad arguments as ``generate``, a prompt that is not
        1-D, or a ``buffer`` below 1.
    """
    if np.ndim(prompt_ids) != 1:
        raise ValueError(f"prompt_ids must be one 1-D sequence of ids, got shape {np.shape(prompt_ids)}")
    if buffer is not None:
        check_int("buffer", buffer, 1)
    rows, _, n, eos, key = _check_generate_args(
        model, prompt_ids, max_new_tokens, temperature, top_k, top_p, eos_id, key
    )

    def start(tag: np.ndarray) -> np.ndarray:
        return _run_decode(model, params, rows, n, temperature, top_k, top_p, eos, key, tag=tag, emit=_emit)

    return TokenStream(start, eos, n, buffer)


def stream_text(tokens: Iterable[int], tokenizer: Any) -> Iterator[str]:
    """Decodes a token stream into text pieces as it arrives.

    A piece is held back while the text decoded so far ends in U+FFFD (a UTF-8 character cut between
    tokens), so the joined pieces equal ``tokenizer.decode`` of all the tokens.

    Args:
      tokens: token ids, e.g. a :class:`TokenStream`.
      tokenizer: anything with ``decode(list[int]) -> str``.

    Returns:
      An iterator of non-empty strings.
    """
    ids: list[int] = []
    done = ""
    for tok in tokens:
        ids.append(int(tok))
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd") or not text.startswith(done):
            continue
        if len(text) > len(done):
            yield text[len(done) :]
            done = text
    text = tokenizer.decode(ids)
    if not text.startswith(done):  # a tokenizer whose earlier text changed: cannot take pieces back
        logger.warning("decoded text changed after it was streamed; the streamed text differs")
    elif len(text) > len(done):
        yield text[len(done) :]
