"""Tests for flaxgpt.finetune.instruct: the masked loss equals PyTorch's, bucketed batches give the exact batches'
loss, and fine-tuning through fit follows the book's PyTorch train_model_simple step for step."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from _book_torch import book_model_from_params

from flaxgpt.data.instructions import InstructionDataset, collate
from flaxgpt.data.windows import DataLoader
from flaxgpt.finetune.instruct import INSTRUCT, InstructionTask, instruct_metadata, read_instruct_metadata
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.text.tokenizers import ByteTokenizer
from flaxgpt.training.loop import fit
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state

BATCH = 4


def _records(n: int, seed: int = 0) -> list[dict]:
    """Records of two byte lengths (words of 5 letters), so that exact widths compile two programs."""
    rng = np.random.default_rng(seed)
    words = "alpha gamma delta theta kappa sigma omega".split()
    pick = lambda k: " ".join(rng.choice(words, size=k))  # noqa: E731
    return [{"instruction": pick(1), "input": pick(1), "output": pick(rng.integers(1, 3))}
            for i in range(n)]


def _loss(cfg, params, batch) -> jax.Array:
    return jax.jit(lambda p, bt: INSTRUCT.loss(p, GPTModel(cfg).apply, bt, None, True)[0])(params, batch)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """Tiny models: one thread is faster than contended ones on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tiny_config):
    cfg = tiny_config(vocab_size=257, context_length=192)
    return cfg, init_params(cfg, jax.random.key(3))


def test_loss_equals_torch_cross_entropy(setup) -> None:
    cfg, params = setup
    ds = InstructionDataset(_records(8), ByteTokenizer(), bucket=None, mask_instruction=True)
    inputs, targets = ds.get_batch(range(BATCH))  # (B, W), (B, W)
    assert (targets == -100).mean() > 0.5  # the prompt and the padding are ignored
    loss = _loss(cfg, params, (inputs, targets))
    logits = np.array(jax.jit(GPTModel(cfg).apply)({"params": params}, inputs))  # (B, W, V)
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits).flatten(0, 1),
                                            torch.from_numpy(targets).long().flatten())
    np.testing.assert_allclose(float(loss), ref.item(), rtol=1e-6, atol=1e-6)
    assert INSTRUCT.count((inputs, targets)) == int((targets != -100).sum())
    assert isinstance(INSTRUCT, InstructionTask)


def test_bucketed_and_exact_batches_give_the_same_loss(setup) -> None:
    cfg, params = setup
    data, tok = _records(8, seed=1), ByteTokenizer()
    exact = InstructionDataset(data, tok, bucket=None)
    bucketed = InstructionDataset(data, tok, bucket=64, allowed_max_length=cfg.context_length)
    idx = [0, 3, 5, 6]
    a, b = exact.get_batch(idx), bucketed.get_batch(idx)
    assert b[0].shape[1] > a[0].shape[1]
    la, lb = (float(_loss(cfg, params, batch)) for batch in (a, b))
    assert abs(la - lb) < 1e-6
    assert INSTRUCT.count(a) == INSTRUCT.count(b)


def _book_train_losses(cfg, params, loader: DataLoader, epochs: int, steps: int, lr: float) -> list[float]:
    """The book's train_model_simple step loop (calc_loss_batch, AdamW) on the book's model, on the same records
    in the same order, collated by the book's exact-width function."""
    torch.manual_seed(123)
    model = book_model_from_params(params, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    ds, losses = loader.dataset, []
    for epoch in range(epochs):
        model.train()
        order = loader.order(epoch)
        for b in range(len(loader)):
            items = [ds.encoded_texts[i] for i in order[b * BATCH:(b + 1) * BATCH]]
            input_batch, target_batch = (torch.from_numpy(x).long() for x in collate(items, ds.pad_token_id))
            optimizer.zero_grad()
            logits = model(input_batch)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target_batch.flatten())
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                return losses
    return losses


@pytest.mark.parametrize("bucket", [None, 64])
def test_training_matches_the_books_pytorch_loop(setup, bucket) -> None:
    cfg, params = setup
    lr, steps, tok = 2e-3, 12, ByteTokenizer()
    train = InstructionDataset(_records(24, seed=2), tok, bucket=bucket, allowed_max_length=cfg.context_length)
    val = InstructionDataset(_records(4, seed=3), tok, bucket=bucket, allowed_max_length=cfg.context_length)
    assert max(len(t) for t in train.encoded_texts) <= cfg.context_length  # no truncation: the book's batches
    loader = DataLoader(train, BATCH, shuffle=True, drop_last=True, seed=123)
    val_loader = DataLoader(val, BATCH, shuffle=False, drop_last=False)
    widths = {b[0].shape[1] for e in range(2) for b in loader.batches(e)}
    assert (widths == {192}) if bucket else (len(widths) == 2)  # the book's batch widths vary; buckets do not
    book = _book_train_losses(cfg, params, loader, 2, steps, lr)
    ours: list[float] = []
    params = jax.tree.map(np.array, params)  # a copy: fit donates its buffers
    state = create_train_state(GPTModel(cfg), params, make_optimizer(lr, weight_decay=0.1))
    fit(state, loader, val_loader, key=jax.random.key(0), num_epochs=2, max_steps=steps, eval_freq=100,
        eval_iter=1, sample_tokens=0, task=INSTRUCT, handle_signals=False,
        callback=lambda event, info: ours.append(info["loss"]) if event == "step" else None)
    assert len(ours) == len(book) == steps
    np.testing.assert_allclose(ours, book, atol=1e-4, rtol=0)
    assert book[0] - book[-1] > 0.3  # the weights really moved


def test_metadata_round_trip() -> None:
    extra = instruct_metadata(True, 256, data="d.json")
    assert extra == {"instruct": {"mask_instruction": True, "pad_token_id": 256, "data": "d.json"}}
    assert read_instruct_metadata({"extra": extra}) == extra["instruct"]
    assert read_instruct_metadata(extra) == extra["instruct"] and read_instruct_metadata({"extra": {}}) is None
    with pytest.raises(ValueError, match="pad_token_id"):
        instruct_metadata(False, -1)
