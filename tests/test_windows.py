"""Tests for flaxgpt.data.windows: sliding windows and the resumable loader."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import tiktoken

from flaxgpt.data.windows import DataLoader, GPTDataset, create_dataloader, train_val_split


class CharTokenizer:
    """One token per character: fast, offline, predictable ids."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids)


def _loader(n_tokens: int = 103, batch_size: int = 4, max_length: int = 5, stride: int = 3,
            **kwargs) -> DataLoader:
    return DataLoader.from_token_ids(np.arange(n_tokens), batch_size, max_length, stride,
                                     **kwargs)


def _as_list(batches) -> list[tuple[list, list]]:
    return [(x.tolist(), y.tolist()) for x, y in batches]


# --------------------------------------------------------------------------- GPTDataset


@pytest.mark.parametrize("n,L,stride", [(11, 4, 4), (12, 4, 4), (13, 4, 1), (5, 4, 2), (50, 7, 3)])
def test_dataset_matches_book_windows(n: int, L: int, stride: int) -> None:
    ids = list(range(100, 100 + n))
    ds = GPTDataset(ids, L, stride)
    expected = [(ids[s:s + L], ids[s + 1:s + L + 1]) for s in range(0, n - L, stride)]
    assert len(ds) == len(expected)
    for i, (x, y) in enumerate(expected):
        xi, yi = ds[i]
        assert xi.dtype == np.int32 and yi.dtype == np.int32
        assert xi.tolist() == x and yi.tolist() == y
    inputs, targets = ds.get_batch(np.arange(len(ds)))
    assert inputs.shape == (len(ds), L) and inputs.dtype == np.int32
    assert inputs.tolist() == [x for x, _ in expected]
    assert targets.tolist() == [y for _, y in expected]


def test_dataset_storage_is_one_array() -> None:
    ds = GPTDataset(np.arange(1000, dtype=np.int64), 8, 2)
    assert ds.token_ids.dtype == np.int32 and ds.token_ids.shape == (1000,)
    assert ds.starts.shape == (len(ds),)
    x, y = ds[3]
    assert np.shares_memory(x, ds.token_ids) and np.shares_memory(y, ds.token_ids)
    assert not x.flags.writeable
    assert ds[-1][0].tolist() == ds[len(ds) - 1][0].tolist()
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]


@pytest.mark.parametrize("field", ["max_length", "stride"])
@pytest.mark.parametrize("value", [0, -1])
def test_dataset_rejects_non_positive(field: str, value: int) -> None:
    kwargs = {"max_length": 4, "stride": 4, field: value}
    with pytest.raises(ValueError, match=rf"{field} must be a positive int, got {value}"):
        GPTDataset(range(100), **kwargs)


def test_dataset_rejects_too_short_text() -> None:
    with pytest.raises(ValueError, match=r"has 4 tokens; at least max_length \+ 1 = 5"):
        GPTDataset([1, 2, 3, 4], max_length=4, stride=1)


def test_dataset_rejects_bad_ids() -> None:
    with pytest.raises(ValueError, match="1-D"):
        GPTDataset(np.zeros((2, 10), np.int32), 4, 1)
    with pytest.raises(ValueError, match="integer"):
        GPTDataset(np.zeros(10, np.float32), 4, 1)
    with pytest.raises(ValueError, match=r"\[-1, 8\]"):
        GPTDataset(np.arange(-1, 9), 4, 1)


# --------------------------------------------------------------------------- DataLoader


def test_loader_len_and_shapes() -> None:
    loader = _loader()  # 33 windows
    assert len(loader.dataset) == 33 and len(loader) == 8
    batches = list(loader)
    assert len(batches) == 8
    assert all(x.shape == (4, 5) and y.shape == (4, 5) for x, y in batches)
    assert all(x.dtype == np.int32 and y.dtype == np.int32 for x, y in batches)
    assert all((y[:, :-1] == x[:, 1:]).all() for x, y in batches)

    keep = _loader(drop_last=False)
    assert len(keep) == 9
    assert [x.shape[0] for x, _ in keep][-2:] == [4, 1]


def test_loader_reiterable_and_epochs_differ() -> None:
    loader = _loader()
    assert loader.epoch == 0
    first = _as_list(loader)
    assert loader.epoch == 1
    second = _as_list(loader)
    assert loader.epoch == 2
    assert len(first) == len(second) == len(loader)
    assert first != second


def test_shuffle_reproducible_per_seed() -> None:
    a, b, c = _loader(seed=7), _loader(seed=7), _loader(seed=8)
    assert _as_list(a) == _as_list(b)
    assert _as_list(a) == _as_list(b)  # epoch 1 as well
    assert _as_list(a.batches(0)) != _as_list(c.batches(0))
    assert (a.order(3) == np.random.default_rng([7, 3]).permutation(len(a.dataset))).all()


@pytest.mark.parametrize("drop_last", [False, True])
def test_every_window_once_per_epoch(drop_last: bool) -> None:
    # max_length 1, stride 1: window i is the single token i, so inputs identify windows.
    loader = DataLoader(GPTDataset(np.arange(50), 1, 1), 4, shuffle=True, drop_last=drop_last)
    for _ in range(3):
        seen = Counter(int(t) for x, _ in loader for t in x.ravel())
        expected = 48 if drop_last else 49
        assert sum(seen.values()) == expected and set(seen.values()) == {1}


def test_no_shuffle_order() -> None:
    loader = _loader(shuffle=False)
    assert _as_list(loader) == _as_list(loader)
    x, _ = next(iter(loader))
    assert x[:, 0].tolist() == [0, 3, 6, 9]


def test_resume_mid_epoch() -> None:
    loader = _loader(seed=3)
    for epoch in (0, 1, 5):
        full = _as_list(loader.batches(epoch))
        for start in (0, 1, 4, len(loader) - 1, len(loader)):
            assert _as_list(loader.batches(epoch, start)) == full[start:]
    assert loader.epoch == 0  # batches() does not advance the epoch
    loader.epoch = 5
    assert _as_list(loader) == _as_list(loader.batches(5))
    assert loader.epoch == 6


def test_loader_rejects_bad_positions() -> None:
    loader = _loader()
    with pytest.raises(ValueError, match=r"start=9 out of range: expected 0 <= start <= 8"):
        loader.batches(0, 9)
    with pytest.raises(ValueError, match="start=-1"):
        loader.batches(0, -1)
    with pytest.raises(ValueError, match="epoch must be a non-negative int, got -1"):
        loader.batches(-1)
    with pytest.raises(ValueError, match="epoch must be a non-negative int"):
        loader.epoch = -2


@pytest.mark.parametrize("value", [0, -3])
def test_loader_rejects_bad_batch_size(value: int) -> None:
    with pytest.raises(ValueError, match=rf"batch_size must be a positive int, got {value}"):
        _loader(batch_size=value)
    with pytest.raises(ValueError, match="batch_size"):
        create_dataloader("abcdefgh", batch_size=value, max_length=2, stride=1,
                          tokenizer=CharTokenizer())


def test_loader_rejects_bad_seed() -> None:
    with pytest.raises(ValueError, match="seed must be a non-negative int, got -1"):
        _loader(seed=-1)


def test_drop_last_with_too_few_windows() -> None:
    with pytest.raises(ValueError, match="3 windows, fewer than batch_size=4.*zero batches"):
        _loader(n_tokens=5, batch_size=4, max_length=2, stride=1)
    loader = _loader(n_tokens=5, batch_size=4, max_length=2, stride=1, drop_last=False)
    assert len(loader) == 1 and next(iter(loader))[0].shape == (3, 2)


def test_create_dataloader_bad_inputs() -> None:
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="max_length must be a positive int, got 0"):
        create_dataloader("abcdef", max_length=0, tokenizer=tok)
    with pytest.raises(ValueError, match="stride must be a positive int, got -2"):
        create_dataloader("abcdef", stride=-2, tokenizer=tok)
    with pytest.raises(ValueError, match=r"has 6 tokens; at least max_length \+ 1 = 257"):
        create_dataloader("abcdef", tokenizer=tok)


def test_create_dataloader_custom_tokenizer() -> None:
    loader = create_dataloader("abcdefghij", batch_size=2, max_length=3, stride=3,
                               shuffle=False, tokenizer=CharTokenizer())
    x, y = next(iter(loader))
    assert x.tolist() == [[97, 98, 99], [100, 101, 102]]
    assert y.tolist() == [[98, 99, 100], [101, 102, 103]]


# --------------------------------------------------------------------------- the book's loader


def test_verdict_loader_book_figures(verdict_text: str, gpt2_tok: tiktoken.Encoding) -> None:
    loader = create_dataloader(verdict_text, batch_size=8, max_length=4, stride=4,
                               shuffle=False, tokenizer=gpt2_tok)
    assert len(loader.dataset) == 1286
    assert len(loader) == 1286 // 8
    inputs, targets = next(iter(loader))
    assert inputs.shape == targets.shape == (8, 4)
    assert inputs[0].tolist() == [40, 367, 2885, 1464]
    assert targets[0].tolist() == [367, 2885, 1464, 1807]


def test_verdict_loader_stride_one(verdict_text: str, gpt2_tok: tiktoken.Encoding) -> None:
    loader = create_dataloader(verdict_text, batch_size=1, max_length=4, stride=1,
                               shuffle=False, tokenizer=gpt2_tok)
    batches = iter(loader)
    first, _ = next(batches)
    second, _ = next(batches)
    assert first.tolist() == [[40, 367, 2885, 1464]]
    assert second.tolist() == [[367, 2885, 1464, 1807]]


def test_default_tokenizer_is_gpt2(verdict_text: str, gpt2_bpe_dir: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLAXGPT_GPT2_BPE_DIR", str(gpt2_bpe_dir))
    loader = create_dataloader(verdict_text, batch_size=8, max_length=4, stride=4, shuffle=False)
    assert next(iter(loader))[0][0].tolist() == [40, 367, 2885, 1464]


def test_train_val_split(verdict_text: str) -> None:
    train, val = train_val_split(verdict_text)
    assert len(train) == int(0.9 * 20479) == 18431
    assert train + val == verdict_text


@pytest.mark.parametrize("ratio", [0, 1, -0.5, 1.5, True])
def test_train_val_split_rejects_ratio(ratio: float) -> None:
    with pytest.raises(ValueError, match=r"train_ratio must be a number in \(0, 1\)"):
        train_val_split("some text", ratio)


# --------------------------------------------------------------------------- corpora



def test_for_process_shares_are_the_global_batches_in_order() -> None:
    ids = np.arange(400, dtype=np.int32)
    whole = DataLoader.from_token_ids(ids, batch_size=8, max_length=4, stride=4, seed=5)
    shares = [DataLoader.from_token_ids(ids, batch_size=8, max_length=4, stride=4, seed=5).for_process(i, 2)
              for i in range(2)]
    for epoch in (0, 3):
        for (x, y), (x0, y0), (x1, y1) in zip(whole.batches(epoch, 1), shares[0].batches(epoch, 1),
                                              shares[1].batches(epoch, 1)):
            assert x0.shape == (4, 4)
            np.testing.assert_array_equal(np.concatenate([x0, x1]), x)
            np.testing.assert_array_equal(np.concatenate([y0, y1]), y)
    assert len(shares[0]) == len(whole)


def test_for_process_needs_a_batch_that_splits_and_full_batches() -> None:
    ids = np.arange(120, dtype=np.int32)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        DataLoader.from_token_ids(ids, batch_size=8, max_length=4, stride=4).for_process(0, 3)
    val = DataLoader.from_token_ids(ids, batch_size=8, max_length=4, stride=4, shuffle=False, drop_last=False)
    assert len(val) == 4  # 29 windows: 3 full batches and a partial one
    assert len(val.for_process(1, 2)) == 3 and val.drop_last  # every process gets an equal share
    with pytest.raises(ValueError, match=r"index must be"):
        DataLoader.from_token_ids(ids, batch_size=8, max_length=4, stride=4).for_process(2, 2)
