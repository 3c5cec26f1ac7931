"""Tests for flaxgpt.finetune.classify: the head swap, the task, classify(), and parity with the book's
chapter-6 PyTorch training (``calc_loss_batch``, ``calc_accuracy_loader``, ``train_classifier_simple``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.data.classification import ClassificationDataset
from flaxgpt.data.sms_spam import LabeledTexts
from flaxgpt.data.windows import DataLoader
from flaxgpt.finetune.classify import ClassificationTask, classify, to_classifier
from flaxgpt.finetune.trainable import FROZEN, TRAINABLE, label_params, partition_optimizer, trainable_patterns
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import convert_layout, count_params, init_params
from flaxgpt.text.tokenizers import ByteTokenizer
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state, make_eval_step, make_train_step

PAD = 256  # the byte tokenizer's <|endoftext|>


def _texts(n: int, seed: int) -> LabeledTexts:
    """Random lowercase 'messages'; label 1 when the text holds a 'z' (learnable from the tokens)."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(3, 14))) for _ in range(n)]
    return LabeledTexts(tuple(texts), np.asarray(["z" in t for t in texts], np.int32))


@pytest.fixture
def classifier(tiny_config):
    cfg = tiny_config(vocab_size=257, context_length=16, qkv_bias=True)
    params = init_params(cfg, jax.random.key(0))
    return to_classifier(cfg, params, 2, jax.random.key(1))


@pytest.mark.parametrize("tie, scan", [(False, False), (True, False), (False, True)])
def test_to_classifier_head_shapes_and_init(tiny_config, tie: bool, scan: bool) -> None:
    cfg = tiny_config(tie_embeddings=tie, scan_layers=scan)
    params = init_params(cfg, jax.random.key(0))
    ccfg, cparams = to_classifier(cfg, params, 3, jax.random.key(1))
    assert ccfg.num_classes == 3 and not ccfg.tie_embeddings
    head = cparams["out_head"]
    assert head["kernel"].shape == (cfg.emb_dim, 3) and head["bias"].shape == (3,)
    bound = 1 / np.sqrt(cfg.emb_dim)  # PyTorch's nn.Linear: U(+-1/sqrt(in_features))
    assert np.abs(np.asarray(head["kernel"])).max() <= bound and np.abs(np.asarray(head["bias"])).max() <= bound
    assert np.asarray(head["kernel"]).std() > 0.4 * bound  # really drawn, not zeros
    ids = jnp.asarray(np.arange(10)[None] % cfg.vocab_size)
    logits = GPTModel(ccfg).apply({"params": cparams}, ids, deterministic=True)
    assert logits.shape == (1, 10, 3)
    for name in ("tok_emb", "final_norm"):  # the body is shared untouched
        assert cparams[name] is params[name]
    with pytest.raises(ValueError, match="num_classes"):
        to_classifier(cfg, params, 1, jax.random.key(1))


def _loader(cfg, n: int, seed: int, shuffle: bool, batch: int = 4) -> DataLoader:
    ds = ClassificationDataset(_texts(n, seed), ByteTokenizer(), max_length=12, pad_token_id=PAD, num_classes=2)
    return DataLoader(ds, batch, shuffle=shuffle, drop_last=shuffle, seed=seed)


def _torch_reference(cfg, params, train_batches, val_batches, lr: float, weight_decay: float):
    """The book's chapter-6 code on the same weights and batches: last-block fine-tuning, AdamW."""
    torch = pytest.importorskip("torch")
    from _book_torch import book_classifier_steps, book_model_from_params

    model = book_model_from_params(params, cfg)
    for p in model.parameters():
        p.requires_grad = False
    for module in (model.trf_blocks[-1], model.final_norm, model.out_head):
        for p in module.parameters():
            p.requires_grad = True
    losses = book_classifier_steps(model, train_batches, lr, weight_decay)
    correct = examples = 0
    with torch.no_grad():  # calc_accuracy_loader
        for b in val_batches:
            pred = torch.argmax(model(torch.as_tensor(b["input_ids"]).long())[:, -1, :], dim=-1)
            examples += pred.shape[0]
            correct += (pred == torch.as_tensor(b["labels"]).long()).sum().item()
    return losses, correct / examples


def test_last_block_fine_tuning_matches_the_books_pytorch_code(classifier) -> None:
    pytest.importorskip("torch")
    cfg, params = classifier
    train, val = _loader(cfg, 48, 0, True), _loader(cfg, 20, 1, False)
    batches = [b for e in range(2) for b in train.batches(e)][:20]  # 20 steps, the loop's batch order
    assert len(batches) == 20
    lr, wd = 1e-3, 0.1
    labels = label_params(params, trainable_patterns("last_block", cfg.n_layers))
    tx = partition_optimizer(make_optimizer(lr, weight_decay=wd), labels)
    state = create_train_state(GPTModel(cfg), params, tx)
    before = jax.tree.map(np.array, params)
    task = ClassificationTask()
    step, metrics = make_train_step(task), make_eval_step(task)
    key, losses = jax.random.key(0), []
    for b in batches:
        state, loss = step(state, jax.tree.map(jnp.asarray, b), key)
        losses.append(float(loss))
    per_batch = [jax.tree.map(float, metrics(state, jax.tree.map(jnp.asarray, b))) for b in val.batches(0)]
    accuracy = task.eval_metrics(per_batch)["accuracy"]

    want_losses, want_accuracy = _torch_reference(cfg, before, batches, list(val.batches(0)), lr, wd)
    np.testing.assert_allclose(losses, want_losses, atol=1e-4, rtol=0)
    assert losses[-1] < losses[0]  # it learned something: the check compares real training
    assert accuracy == want_accuracy

    after = jax.tree.map(np.array, state.params)
    flat_labels = jax.tree.leaves(labels)
    for lab, a, b0 in zip(flat_labels, jax.tree.leaves(after), jax.tree.leaves(before)):
        if lab == FROZEN:
            assert a.tobytes() == b0.tobytes()  # bit-identical
    changed = [not np.array_equal(a, b0) for lab, a, b0 in zip(flat_labels, jax.tree.leaves(after),
                                                                   jax.tree.leaves(before)) if lab == TRAINABLE]
    assert all(changed)
    # no optimizer state for frozen parameters: Adam's two moments cover the trainable ones only
    trainable = sum(x.size for x, lab in zip(jax.tree.leaves(params), flat_labels) if lab == TRAINABLE)
    state_size = sum(x.size for x in jax.tree.leaves(state.opt_state))
    assert 2 * trainable <= state_size <= 2 * trainable + 16
    assert state_size < count_params(params)


def test_last_nonpad_pool_reads_each_rows_last_real_token(classifier) -> None:
    cfg, params = classifier
    model = GPTModel(cfg)
    ds = ClassificationDataset(_texts(6, 3), ByteTokenizer(), max_length=12, pad_token_id=PAD)
    batch = jax.tree.map(jnp.asarray, ds.get_batch(np.arange(6)))
    full = model.apply({"params": params}, batch["input_ids"], deterministic=True)  # (B, T, 2)
    task = ClassificationTask("last_nonpad")
    got = task.logits(params, model.apply, batch, None, True)
    want = full[np.arange(6), np.asarray(batch["lengths"]) - 1]
    np.testing.assert_allclose(got, want, atol=1e-6)
    last = ClassificationTask("last").logits(params, model.apply, batch, None, True)
    np.testing.assert_allclose(last, full[:, -1], atol=1e-6)
    with pytest.raises(ValueError, match="pool"):
        ClassificationTask("mean")


def test_classify_pads_like_the_book_and_names_bad_input(classifier) -> None:
    cfg, params = classifier
    model, tok = GPTModel(cfg), ByteTokenizer()
    text = "hello there"
    ids = tok.encode(text) + [PAD] * (12 - len(tok.encode(text)))
    logits = model.apply({"params": params}, jnp.asarray([ids]), deterministic=True)[0, -1]
    want = int(jnp.argmax(logits))
    assert classify(model, params, text, tok, max_length=12, pad_token_id=PAD) == want
    assert classify(model, params, text, tok, max_length=12, pad_token_id=PAD, labels=("ham", "spam")) == (
        ("ham", "spam")[want]
    )
    long_text = "x" * 40  # truncated to the context length (16), as the book's min(max_length, context)
    assert classify(model, params, long_text, tok, max_length=120, pad_token_id=PAD) in (0, 1)
    with pytest.raises(ValueError, match="non-empty"):
        classify(model, params, "  ", tok)
    lm_cfg = cfg.replace(num_classes=None)
    with pytest.raises(ValueError, match="language-model head"):
        classify(GPTModel(lm_cfg), init_params(lm_cfg, jax.random.key(0)), text, tok)


def test_scanned_classifier_fine_tunes_after_unrolling(tiny_config) -> None:
    cfg = tiny_config(vocab_size=257, scan_layers=True)
    ccfg, cparams = to_classifier(cfg, init_params(cfg, jax.random.key(0)), 2, jax.random.key(1))
    ucfg = ccfg.replace(scan_layers=False)
    uparams = convert_layout(cparams, ucfg)
    ids = jnp.asarray(np.arange(12)[None] % 200)
    np.testing.assert_allclose(
        GPTModel(ccfg).apply({"params": cparams}, ids, positions="last"),
        GPTModel(ucfg).apply({"params": uparams}, ids, positions="last"),
        atol=1e-5,
    )
    assert label_params(uparams, trainable_patterns("last_block", ucfg.n_layers))["out_head"]["bias"] == TRAINABLE


def test_a_classifier_cannot_generate_text(classifier) -> None:
    from flaxgpt.book.generate import generate_text_simple
    from flaxgpt.generation.decode import generate

    cfg, params = classifier
    model = GPTModel(cfg)
    with pytest.raises(ValueError, match="classifier"):
        generate(model, params, np.asarray([1, 2, 3]), max_new_tokens=4)
    with pytest.raises(ValueError, match="classifier"):
        generate_text_simple(model, params, np.asarray([[1, 2, 3]]), 4, cfg.context_length)
