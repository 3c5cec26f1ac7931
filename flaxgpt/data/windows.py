"""Chapter 2 data: the sliding-window dataset and a resumable batch iterator.

`GPTDataset` is the book's `GPTDatasetV1` over one int32 array; `DataLoader` yields numpy
batches whose order is a pure function of (seed, epoch), so training can checkpoint
(epoch, batch index) and resume exactly. Corpora are in :mod:`flaxgpt.text.corpora`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np

from flaxgpt.text.bpe import gpt2_tokenizer
from flaxgpt.text.tokenizers import text_to_token_ids
from flaxgpt.validation import check_int, check_number

__all__ = [
    "GPTDataset",
    "DataLoader",
    "create_dataloader",
    "train_val_split",
]


Batch = tuple[np.ndarray, np.ndarray]


class GPTDataset:
    """Input/target windows over a token sequence (the book's GPTDatasetV1).

    Window i starts at `s = starts[i]` for `s in range(0, len(ids) - max_length, stride)`;
    its inputs are `ids[s:s+max_length]` and its targets `ids[s+1:s+max_length+1]`.
    The ids are stored once as a read-only int32 array; windows are views into it.

    Args:
      token_ids: 1-D sequence of non-negative token ids.
      max_length: window length L.
      stride: distance between window starts.
    """

    def __init__(self, token_ids: Any, max_length: int, stride: int) -> None:
        self.max_length = check_int("max_length", max_length, 1)
        self.stride = check_int("stride", stride, 1)
        ids = np.asarray(token_ids)
        if ids.ndim != 1:
            raise ValueError(f"token_ids has shape {ids.shape}: expected a 1-D sequence")
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token_ids has dtype {ids.dtype}: expected integer token ids")
        if ids.size and (ids.min() < 0 or ids.max() > np.iinfo(np.int32).max):
            raise ValueError(
                f"token_ids range over [{ids.min()}, {ids.max()}]: expected ids in "
                f"[0, {np.iinfo(np.int32).max}]"
            )
        if ids.size < self.max_length + 1:
            raise ValueError(
                f"the text has {ids.size} tokens; at least max_length + 1 = "
                f"{self.max_length + 1} tokens are needed for one input/target window"
            )
        self.token_ids = np.array(ids, dtype=np.int32)  # (N,) own copy
        self.token_ids.setflags(write=False)
        self.starts = np.arange(0, ids.size - self.max_length, self.stride, dtype=np.int64)
        self._offsets = np.arange(self.max_length, dtype=np.int64)  # (L,)

    def __len__(self) -> int:
        return int(self.starts.size)

    def __getitem__(self, idx: int) -> Batch:
        """Returns window `idx` as (inputs, targets), each int32 of shape (L,)."""
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"window index {idx} out of range for {n} windows")
        s = int(self.starts[idx])
        L = self.max_length
        return self.token_ids[s : s + L], self.token_ids[s + 1 : s + L + 1]

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> Batch:
        """Gathers several windows at once.

        Args:
          indices: window indices, shape (B,).

        Returns:
          (inputs, targets), each a new int32 array of shape (B, L).
        """
        starts = self.starts[np.asarray(indices, dtype=np.int64)]  # (B,)
        pos = starts[:, None] + self._offsets[None, :]  # (B, L)
        return self.token_ids[pos], self.token_ids[pos + 1]  # (B, L), (B, L)


class DataLoader:
    """Batches of a `GPTDataset`; one epoch per `iter()`, resumable at any batch.

    The window order of epoch `e` is `np.random.default_rng([seed, e]).permutation(n)` when
    shuffling (else `0..n-1`), so `batches(e, start)` reproduces any epoch from any batch.
    `epoch` is the epoch the next `iter()` runs; `iter()` increments it immediately.

    On several processes (:meth:`for_process`) each process yields only its share of every batch: rows
    ``[i * B / P, (i + 1) * B / P)`` of the same global batch, so the global batches and their order are those
    of one process.

    Args:
      dataset: the windows.
      batch_size: windows per batch B.
      shuffle: shuffle windows, with a different permutation each epoch.
      drop_last: drop the final batch when it has fewer than B windows.
      seed: non-negative int seed of the shuffle.
    """

    def __init__(
        self,
        dataset: GPTDataset,
        batch_size: int = 4,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        self.batch_size = check_int("batch_size", batch_size, 1)
        seed = check_int("seed", seed, 0)
        if drop_last and len(dataset) < self.batch_size:
            raise ValueError(
                f"the dataset has {len(dataset)} windows, fewer than batch_size="
                f"{self.batch_size}; with drop_last=True this would yield zero batches "
                "(use a smaller batch_size, stride or max_length, more text, or drop_last=False)"
            )
        self.dataset = dataset
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = seed
        self._epoch = 0
        self.process_index, self.process_count = 0, 1

    def for_process(self, index: int, count: int) -> DataLoader:
        """Makes this loader yield process ``index``'s share of each batch, of ``count`` processes.

        Args:
          index: the process index, in ``[0, count)``.
          count: the number of processes; must divide the batch size, and with more than one process the
            last partial batch is dropped (``drop_last``: every process needs an equal share).

        Returns:
          ``self``.
        """
        count = check_int("count", count, 1)
        index = check_int("index", index, 0, count)
        if self.batch_size % count:
            raise ValueError(f"batch size {self.batch_size} does not split over {count} processes: use a multiple "
                             f"of {count}")
        if count > 1 and not self.drop_last:
            self.drop_last = True
            if len(self) == 0:
                raise ValueError(f"the dataset has {len(self.dataset)} windows, fewer than one batch of "
                                 f"{self.batch_size}; on several processes every batch must be full")
        self.process_index, self.process_count = index, count
        return self

    @classmethod
    def from_token_ids(
        cls,
        token_ids: Any,
        batch_size: int = 4,
        max_length: int = 256,
        stride: int = 128,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
    ) -> DataLoader:
        """Builds a loader over pre-tokenized ids (tokenize once, build many loaders).

        Args:
          token_ids: 1-D token ids.
          batch_size, max_length, stride, shuffle, drop_last, seed: as in `create_dataloader`.

        Returns:
          The loader.
        """
        check_int("batch_size", batch_size, 1)
        return cls(GPTDataset(token_ids, max_length, stride), batch_size, shuffle, drop_last, seed)

    @property
    def epoch(self) -> int:
        """The epoch that the next `iter()` runs."""
        return self._epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch = check_int("epoch", value, 0)

    def __len__(self) -> int:
        n, b = len(self.dataset), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def order(self, epoch: int) -> np.ndarray:
        """The window indices of `epoch` in visiting order, shape (n,)."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n)

    def batches(self, epoch: int, start: int = 0) -> Iterator[Batch]:
        """Yields the batches of `epoch` from batch index `start` on; does not touch `epoch`.

        Args:
          epoch: non-negative epoch number.
          start: index of the first batch to yield, 0 <= start <= len(self).

        Returns:
          An iterator of (inputs, targets), each int32 of shape (B, L) (the final batch may
          be smaller when drop_last=False).
        """
        epoch = check_int("epoch", epoch, 0)
        n_batches = len(self)
        start = check_int("start", start)
        if not 0 <= start <= n_batches:
            raise ValueError(f"start={start} out of range: expected 0 <= start <= {n_batches}")
        return self._generate(self.order(epoch), start, n_batches)

    def _generate(self, order: np.ndarray, start: int, n_batches: int) -> Iterator[Batch]:
        b = self.batch_size
        share = b // self.process_count
        lo = self.process_index * share
        for i in range(start, n_batches):
            batch = self.dataset.get_batch(order[i * b : (i + 1) * b])  # the global batch: (B, L), (B, L)
            if self.process_count > 1:  # this process's rows, collated with the others' (same padded width)
                batch = jax.tree.map(lambda x: x[lo : lo + share], batch)  # (B / P, L) each
            yield batch

    def __iter__(self) -> Iterator[Batch]:
        epoch = self._epoch
        self._epoch += 1
        return self.batches(epoch)


def create_dataloader(
    text: str,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    tokenizer: Any = None,
) -> DataLoader:
    """Tokenizes `text` and returns a loader of (inputs, targets) batches (the book's
    `create_dataloader_v1`, with errors instead of silently empty loaders).

    Args:
      text: the training text.
      batch_size: windows per batch B.
      max_length: window length L.
      stride: distance between window starts.
      shuffle: shuffle windows, with a different permutation each epoch.
      drop_last: drop the final batch when it has fewer than B windows.
      seed: non-negative int seed of the shuffle.
      tokenizer: a tiktoken `Encoding` or a `Tokenizer`; default `gpt2_tokenizer()`.

    Returns:
      A re-iterable `DataLoader`; `len()` is the number of batches per epoch.
    """
    check_int("batch_size", batch_size, 1)
    check_int("max_length", max_length, 1)
    check_int("stride", stride, 1)
    if tokenizer is None:
        tokenizer = gpt2_tokenizer()
    ids = text_to_token_ids(text, tokenizer)[0]  # (N,)
    return DataLoader.from_token_ids(ids, batch_size, max_length, stride, shuffle, drop_last, seed)


def train_val_split(text: str, train_ratio: float = 0.9) -> tuple[str, str]:
    """Splits a text by characters, as the book: `text[:i], text[i:]` with
    `i = int(train_ratio * len(text))`.

    Args:
      text: the text.
      train_ratio: fraction for training, strictly between 0 and 1.

    Returns:
      (train_text, val_text).
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    try:
        ok = 0.0 < check_number("train_ratio", train_ratio) < 1.0
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"train_ratio must be a number in (0, 1), got {train_ratio!r}")
    split_idx = int(train_ratio * len(text))
    return text[:split_idx], text[split_idx:]
