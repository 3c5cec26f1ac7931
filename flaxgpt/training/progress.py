"""A progress bar for :func:`flaxgpt.training.loop.fit`: a tqdm bar over optimizer updates, usable as
fit's ``callback``, that shows the loss and tokens per second and routes logging through ``tqdm.write``
while it is open (so fit's evaluation lines do not tear the bar)."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

__all__ = ["ProgressBar"]


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


class ProgressBar:
    """``with ProgressBar(total, ...) as bar: fit(..., callback=bar)``.

    Args:
      total: optimizer updates the run makes in total.
      initial: updates already done (a resumed run).
      accumulate_steps: micro-batches per update (the bar advances once per update).
      tokens_start: tokens seen before this call (for the first tokens-per-second value).
    """

    def __init__(self, total: int, initial: int = 0, accumulate_steps: int = 1, tokens_start: int = 0) -> None:
        self.total, self.initial, self.accumulate_steps = total, min(initial, total), accumulate_steps
        self._tokens, self._time = tokens_start, time.perf_counter()
        self._bar: Any = None
        self._handlers: list[logging.Handler] = []

    def __enter__(self) -> ProgressBar:
        from tqdm.auto import tqdm

        from flaxgpt.distributed import is_primary

        self._bar = tqdm(total=self.total, initial=self.initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                         disable=not is_primary())  # on several processes, process 0 shows the bar
        root = logging.getLogger()
        self._handlers = root.handlers[:]
        handler = _TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.handlers = [handler]
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.getLogger().handlers = self._handlers
        self._bar.close()

    def __call__(self, event: str, info: dict[str, Any]) -> None:
        """fit's callback: on "step", advances the bar at update boundaries and updates its postfix."""
        if event != "step" or self._bar is None:
            return
        now = time.perf_counter()
        if info["micro_step"] % self.accumulate_steps == 0:
            self._bar.update(1)
        tps = (info["tokens_seen"] - self._tokens) / max(now - self._time, 1e-9)
        self._tokens, self._time = info["tokens_seen"], now
        self._bar.set_postfix(loss=f"{info['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
