"""Tests for flaxgpt.data.instructions: the checked download, reading and splitting records, the book's prompt
and the book's ``custom_collate_fn`` batches with bucketed widths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from flaxgpt.data.instructions import (
    INSTRUCTION_DATA_SHA256,
    InstructionDataset,
    book_split,
    bucket_width,
    collate,
    format_input,
    instruction_data_path,
    instruction_loaders,
    load_instruction_data,
    read_instructions,
)
from flaxgpt.text.tokenizers import ByteTokenizer


def book_custom_collate_fn(batch, pad_token_id=50256, ignore_index=-100, allowed_max_length=None,
                           instruction_lengths=None):
    """The book's custom_collate_fn (chapter 7), with its exercise-7.2 masking when instruction_lengths is given."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for n, item in enumerate(batch):
        new_item = list(item).copy()
        new_item += [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs = torch.tensor(padded[:-1])
        targets = torch.tensor(padded[1:])
        mask = targets == pad_token_id
        indices = torch.nonzero(mask).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if instruction_lengths is not None:
            targets[: instruction_lengths[n] - 1] = -100
        if allowed_max_length is not None:
            inputs = inputs[:allowed_max_length]
            targets = targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


@pytest.fixture(scope="module")
def book_data() -> list[dict]:
    value = os.environ.get("FLAXGPT_DATA_DIR")
    if not value or not (Path(value) / "instruction-data.json").is_file():
        pytest.skip("$FLAXGPT_DATA_DIR is not set or lacks instruction-data.json")
    return load_instruction_data()


def test_format_input_golden() -> None:
    with_input = {"instruction": "Rewrite the sentence.", "input": "The cat sat.", "output": "x"}
    assert format_input(with_input) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nRewrite the sentence.\n\n### Input:\nThe cat sat."
    )
    without = {"instruction": "Name a color.", "input": "", "output": "Blue."}
    assert format_input(without) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nName a color."
    )


def test_book_data_split_and_records(book_data: list[dict]) -> None:
    assert len(book_data) == 1100
    splits = book_split(book_data)
    assert {k: len(v) for k, v in splits.items()} == {"train": 935, "validation": 55, "test": 110}
    assert splits["train"][0] == book_data[0] and splits["test"][0] == book_data[935]
    assert splits["validation"][0] == book_data[1045] and splits["validation"][-1] == book_data[-1]
    assert book_data[2] == {"instruction": "Convert 45 kilometers to meters.", "input": "",
                            "output": "45 kilometers is 45000 meters."}


def test_download_checks_and_caches(book_data: list[dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = Path(os.environ["FLAXGPT_DATA_DIR"]) / "instruction-data.json"
    monkeypatch.delenv("FLAXGPT_DATA_DIR")
    monkeypatch.setenv("FLAXGPT_CACHE_DIR", str(tmp_path / "cache"))
    served = tmp_path / "served.json"
    served.write_bytes(src.read_bytes())
    path = instruction_data_path(served.as_uri())
    assert path == tmp_path / "cache" / "instruction-data.json" and path.read_bytes() == src.read_bytes()
    served.unlink()  # cached now: no download
    assert instruction_data_path(served.as_uri()) == path
    path.unlink()
    with pytest.raises(ConnectionError, match="FLAXGPT_DATA_DIR"):
        instruction_data_path(served.as_uri())
    served.write_text("[]", encoding="utf-8")  # a wrong file: rejected, and not kept in the cache
    with pytest.raises(ValueError, match=INSTRUCTION_DATA_SHA256):
        instruction_data_path(served.as_uri())
    assert not path.exists()


def test_read_json_and_jsonl_and_errors(tmp_path: Path) -> None:
    recs = [{"instruction": "a", "input": "b", "output": "c"}, {"instruction": "d", "output": "e"},
            {"instruction": "f", "input": None, "output": "g", "model_response": "h"}]
    as_json, as_jsonl = tmp_path / "d.json", tmp_path / "d.jsonl"
    as_json.write_text(json.dumps(recs), encoding="utf-8")
    as_jsonl.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n", encoding="utf-8")
    for path in (as_json, as_jsonl):
        got = read_instructions(path)
        assert [r["input"] for r in got] == ["b", "", ""] and got[2]["model_response"] == "h"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs + [{"instruction": "x"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"record 3 has no 'output' field"):
        read_instructions(bad)
    bad.write_text(json.dumps([{"instruction": 1, "output": "x"}]), encoding="utf-8")
    with pytest.raises(ValueError, match=r"record 0: 'instruction' is a int"):
        read_instructions(bad)
    bad.write_text('{"instruction": "a", "output": "b"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 2 is not a JSON object"):
        read_instructions(bad)
    bad.write_text("[]", encoding="utf-8")
    with pytest.raises(ValueError, match="no records"):
        read_instructions(bad)


ITEMS = [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9], [50256, 3, 50256]]  # the last holds pad ids of its own


@pytest.mark.parametrize("allowed", [None, 3, 5])
def test_collate_equals_the_books(allowed) -> None:
    ours = collate(ITEMS, allowed_max_length=allowed)
    book = book_custom_collate_fn(ITEMS, allowed_max_length=allowed)
    for a, b in zip(ours, book):
        assert a.dtype == np.int32
        np.testing.assert_array_equal(a, b.numpy())
    lengths = [2, 1, 3, 1]
    ours = collate(ITEMS, allowed_max_length=allowed, prompt_lengths=lengths)
    book = book_custom_collate_fn(ITEMS, allowed_max_length=allowed, instruction_lengths=lengths)
    for a, b in zip(ours, book):
        np.testing.assert_array_equal(a, b.numpy())


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    pick = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return [{"instruction": pick(rng.integers(1, 6)), "input": pick(rng.integers(0, 4)) if i % 2 else "",
             "output": pick(rng.integers(1, 8))} for i in range(n)]


def test_dataset_batches_are_the_books_then_bucketed() -> None:
    tok, data = ByteTokenizer(), _records(12)
    exact = InstructionDataset(data, tok, bucket=None)
    assert exact.pad_token_id == 256
    assert exact.encoded_texts[1] == tok.encode(format_input(data[1]) + "\n\n### Response:\n" + data[1]["output"])
    idx = [3, 0, 7, 5]
    items = [exact.encoded_texts[i] for i in idx]
    for a, b in zip(exact.get_batch(idx), book_custom_collate_fn(items, pad_token_id=256)):
        np.testing.assert_array_equal(a, b.numpy())
    bucketed = InstructionDataset(data, tok, bucket=16, allowed_max_length=1024)
    inputs, targets = bucketed.get_batch(idx)
    w = max(len(t) for t in items)
    assert inputs.shape[1] == bucket_width(w, 16) and inputs.shape[1] % 16 == 0 and inputs.shape[1] > w
    np.testing.assert_array_equal(inputs[:, :w], exact.get_batch(idx)[0])
    np.testing.assert_array_equal(targets[:, :w], exact.get_batch(idx)[1])
    assert (inputs[:, w:] == 256).all() and (targets[:, w:] == -100).all()
    capped = InstructionDataset(data, tok, bucket=16, allowed_max_length=w + 3)  # the cap wins over the bucket
    assert capped.get_batch(idx)[0].shape[1] == w + 3


def test_mask_instruction_ignores_the_prompt_targets() -> None:
    tok, data = ByteTokenizer(), _records(6)
    plain = InstructionDataset(data, tok, bucket=None)
    masked = InstructionDataset(data, tok, bucket=None, mask_instruction=True)
    idx = [0, 1, 2]
    _, t_plain = plain.get_batch(idx)
    inputs, t_masked = masked.get_batch(idx)
    for row, i in enumerate(idx):
        n = len(tok.encode(format_input(data[i])))
        assert masked.prompt_lengths[i] == n
        assert (t_masked[row, : n - 1] == -100).all()
        # from the last prompt token on, the targets are the plain ones: the response header and output
        np.testing.assert_array_equal(t_masked[row, n - 1:], t_plain[row, n - 1:])
        assert tok.decode(t_masked[row, n - 1: n - 1 + 17].tolist()) == "\n\n### Response:\n" + data[i]["output"][0]
    items = [masked.encoded_texts[i] for i in idx]
    book = book_custom_collate_fn(items, 256, instruction_lengths=[masked.prompt_lengths[i] for i in idx])
    np.testing.assert_array_equal(t_masked, book[1].numpy())


def test_book_loaders_compile_a_handful_of_widths(book_data: list[dict], gpt2_tok) -> None:
    splits = book_split(book_data)
    loaders = instruction_loaders(splits, gpt2_tok, batch_size=8, allowed_max_length=1024)
    assert {k: len(v) for k, v in loaders.items()} == {"train": 116, "validation": 7, "test": 14}
    widths, exact = set(), set()
    train = loaders["train"]
    for epoch in range(2):
        order = train.order(epoch)
        for b in range(len(train)):
            idx = order[b * 8:(b + 1) * 8]
            exact.add(max(len(train.dataset.encoded_texts[i]) for i in idx))
            widths.add(train.dataset.width(idx))
    assert len(exact) > 25 and len(widths) <= 4, (sorted(exact), sorted(widths))
    inputs, targets = next(iter(train.batches(0)))
    assert inputs.shape[0] == 8 and inputs.shape[1] in widths and (inputs[:, -1] == 50256).any()


def test_process_shares_are_collated_with_the_whole_global_batch(book_data: list[dict], gpt2_tok) -> None:
    """On several processes each process's rows are padded to the global batch's width (a ragged share
    would give each process another shape, and the processes' programs would not match)."""
    splits = book_split(book_data)
    whole = instruction_loaders(splits, gpt2_tok, batch_size=8, allowed_max_length=1024)["train"]
    shares = [instruction_loaders(splits, gpt2_tok, batch_size=8, allowed_max_length=1024)["train"].for_process(i, 2)
              for i in range(2)]
    for batch, a, b in zip(whole.batches(0), shares[0].batches(0), shares[1].batches(0)):
        for full, x, y in zip(batch, a, b):
            assert x.shape == y.shape == (4, full.shape[1])
            np.testing.assert_array_equal(np.concatenate([x, y]), full)
