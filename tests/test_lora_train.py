"""Tests for flaxgpt.finetune.lora_train: parity with the book's appendix-E PyTorch LoRA training, a frozen
bit-identical base, adapter-only optimizer state, checkpoints with exact resume, and LoRA dropout."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.config import GPTConfig
from flaxgpt.finetune.classify import ClassificationTask, to_classifier
from flaxgpt.finetune.lora_train import lora_labels, lora_metadata, lora_train_state
from flaxgpt.finetune.trainable import FROZEN, TRAINABLE, count_by_label, partition_optimizer
from flaxgpt.io.checkpoint import restore_checkpoint, save_checkpoint
from flaxgpt.nn.lora import LoRA, init_lora, lora_apply, lora_train_params, merge_lora
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import count_params, init_params, param_bytes
from flaxgpt.pytree import flat_dict
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state, make_train_step

RANK, ALPHA = 4, 8.0  # alpha / rank = 2 != alpha: the book's current scaling, not its first printing's
LR, WD = 1e-3, 0.1  # the book's AdamW(weight_decay=0.1); a larger lr than its 5e-5 so a few steps move things
TASK = ClassificationTask("last")  # the book's chapter-6 loss: the last position's logits


@pytest.fixture
def classifier(tiny_config):
    """The tiny chapter-6 classifier (qkv bias, 2 classes) as host arrays, and its config."""
    cfg = tiny_config(vocab_size=257, context_length=16, qkv_bias=True)
    ccfg, params = to_classifier(cfg, init_params(cfg, jax.random.key(0)), 2, jax.random.key(1))
    return ccfg, jax.tree.map(np.array, params)


def _batches(n: int, seed: int = 0, b: int = 4, t: int = 12) -> list[dict[str, np.ndarray]]:
    """``n`` classification batches cycling over 4 distinct ones; label 1 when the last token is odd."""
    rng = np.random.default_rng(seed)
    distinct = []
    for _ in range(4):
        ids = rng.integers(0, 257, (b, t)).astype(np.int32)  # (B, T)
        distinct.append({"input_ids": ids, "labels": (ids[:, -1] % 2).astype(np.int32),
                         "lengths": np.full((b,), t, np.int32)})
    return [distinct[i % 4] for i in range(n)]


_TX: dict[object, object] = {}


def _state(cfg: GPTConfig, params, lora: LoRA):
    """A fresh LoRA train state on copies of ``params`` and ``lora`` (the train step donates its state).

    The optimizer (a static field of the state) is shared between states of one structure: each
    ``partition_optimizer`` call makes a new object, which would compile the train step again."""
    params, lora = jax.tree.map(lambda x: jnp.array(x, copy=True), (params, lora))
    state, labels = lora_train_state(GPTModel(cfg), params, lora, make_optimizer(LR, weight_decay=WD))
    tx = _TX.setdefault((cfg, jax.tree.structure(state.params)), state.tx)
    return state.replace(tx=tx, opt_state=tx.init(state.params)), labels


def _train(state, batches, key: jax.Array):
    step, losses = make_train_step(TASK), []
    for b in batches:
        state, loss = step(state, jax.tree.map(jnp.asarray, b), key)
        losses.append(float(loss))
    return state, np.asarray(losses)


def _torch_path(path: str) -> str:
    """flaxgpt's layer path -> the book's module name (``trf_blocks_0/ff/fc1`` -> ``trf_blocks.0.ff.layers.0``)."""
    name = path.replace("trf_blocks_", "trf_blocks.").replace("/", ".")
    return name.replace("ff.fc1", "ff.layers.0").replace("ff.fc2", "ff.layers.2")


def _torch_lora_reference(cfg, params, lora: LoRA, batches, eval_batch):
    """The book's appendix E on the same weights, adapters and batches: freeze, replace_linear_with_lora,
    AdamW(weight_decay=0.1) on ``model.parameters()``, the chapter-6 ``calc_loss_batch``."""
    torch = pytest.importorskip("torch")
    from _book_lora_torch import LinearWithLoRA, replace_linear_with_lora
    from _book_torch import book_classifier_steps, book_model_from_params

    model = book_model_from_params(params, cfg)
    for p in model.parameters():
        p.requires_grad = False
    replace_linear_with_lora(model, rank=RANK, alpha=ALPHA)
    adapted = {name for name, m in model.named_modules() if isinstance(m, LinearWithLoRA)}
    assert adapted == {_torch_path(p) for p in lora.layers}  # the book adapts every linear layer: "all"
    for path, ab in lora.layers.items():
        layer = model.get_submodule(_torch_path(path)).lora
        assert not layer.B.detach().numpy().any()
        with torch.no_grad():
            layer.A.copy_(torch.from_numpy(np.array(ab["A"])))  # the same draw of A
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # the book's count
    losses = book_classifier_steps(model, batches, LR, WD)
    with torch.no_grad():
        logits = model(torch.as_tensor(eval_batch["input_ids"]).long())[:, -1, :].numpy()
    final = {p: {"A": model.get_submodule(_torch_path(p)).lora.A.detach().numpy(),
                 "B": model.get_submodule(_torch_path(p)).lora.B.detach().numpy()} for p in lora.layers}
    return losses, trainable, final, logits


def test_lora_training_matches_the_books_appendix_e_pytorch_code(classifier) -> None:
    pytest.importorskip("torch")
    cfg, params = classifier
    lora = init_lora(params, jax.random.key(2), rank=RANK, alpha=ALPHA)  # the book's targets: every linear layer
    batches, held_out = _batches(16), _batches(1, seed=9)[0]
    want_losses, torch_trainable, torch_final, torch_logits = _torch_lora_reference(cfg, params, lora, batches, held_out)
    assert torch_trainable == count_params(lora.adapters)

    state, _ = _state(cfg, params, lora)
    state, losses = _train(state, batches, jax.random.key(0))
    np.testing.assert_allclose(losses, want_losses, atol=1e-4, rtol=0)
    assert losses[-4:].mean() < losses[:4].mean() - 0.01  # it learned: the comparison is of real training
    trained = state.params["lora"]
    for path, ab in trained.layers.items():
        for k in ("A", "B"):
            np.testing.assert_allclose(ab[k], torch_final[path][k], atol=1e-5, rtol=0, err_msg=f"{path}/{k}")
    # the adapted model and its merged plain params classify as the book's trained model
    ids = jnp.asarray(held_out["input_ids"])
    adapted = lora_apply(GPTModel(cfg), state.params["base"], trained, ids, positions="last")  # (B, 2)
    merged = GPTModel(cfg).apply({"params": merge_lora(state.params["base"], trained)}, ids, positions="last")
    np.testing.assert_allclose(adapted, torch_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(merged, torch_logits, atol=1e-4, rtol=0)


def test_training_moves_only_the_adapters(classifier) -> None:
    cfg, params = classifier
    lora = init_lora(params, jax.random.key(2), rank=RANK, alpha=ALPHA)
    state, labels = _state(cfg, params, lora)
    assert count_by_label(state.params, labels) == {TRAINABLE: count_params(lora.adapters),
                                                    FROZEN: count_params(params)}
    state, losses = _train(state, _batches(4), jax.random.key(0))
    assert np.isfinite(losses).all()
    for name, x in flat_dict(state.params["base"]).items():  # bit-identical base
        assert np.asarray(x).tobytes() == flat_dict(params)[name].tobytes(), name
    for path, ab in state.params["lora"].layers.items():  # every adapter moved: A (from step 2) and B
        assert not np.array_equal(ab["A"], lora.layers[path]["A"]), path
        assert np.abs(np.asarray(ab["B"])).min() > 0, path
    assert state.params["lora"].alpha == ALPHA and int(state.step) == 4


def test_optimizer_state_holds_the_adapters_moments_only(classifier) -> None:
    cfg, params = classifier
    lora = init_lora(params, jax.random.key(2), rank=RANK, alpha=ALPHA)
    state, _ = _state(cfg, params, lora)
    n_lora, n_base = count_params(lora.adapters), count_params(params)
    lora_size = count_params(state.opt_state)
    assert 2 * n_lora <= lora_size <= 2 * n_lora + 16  # AdamW's mu and nu of the adapters (and step counts)
    base_shapes = {x.shape for x in jax.tree.leaves(params)} - {x.shape for x in jax.tree.leaves(lora.adapters)}
    assert not [x.shape for x in jax.tree.leaves(state.opt_state) if x.shape in base_shapes]
    full = create_train_state(GPTModel(cfg), jax.tree.map(jnp.asarray, params), make_optimizer(LR, weight_decay=WD))
    full_size = count_params(full.opt_state)
    assert full_size >= 2 * n_base
    ratio = param_bytes(state.opt_state) / param_bytes(full.opt_state)
    assert ratio < 0.2, f"LoRA optimizer state is {ratio:.3f} of full fine-tuning's"

    # the book's 124M classifier (shapes only): LoRA's AdamW state is ~2% of full fine-tuning's
    big = GPTConfig.preset("gpt2-small", qkv_bias=True, num_classes=2, drop_rate=0.0)

    def opt_states(key: jax.Array):
        p = init_params(big, key)
        lo = init_lora(p, key, rank=16, alpha=16)
        train = lora_train_params(p, lo)
        lora_tx = partition_optimizer(make_optimizer(5e-5, weight_decay=0.1), lora_labels(train))
        return lora_tx.init(train), make_optimizer(5e-5, weight_decay=0.1).init(p)

    lora_opt, full_opt = jax.eval_shape(opt_states, jax.random.key(0))
    assert 2 * 2_666_528 <= count_params(lora_opt) <= 2 * 2_666_528 + 16
    assert 2 * 124_441_346 <= count_params(full_opt) <= 2 * 124_441_346 + 16
    big_ratio = param_bytes(lora_opt) / param_bytes(full_opt)
    assert 0.021 < big_ratio < 0.022, big_ratio  # 21.3 MB against 995.5 MB in float32


def test_the_frozen_base_gradient_is_never_used(classifier) -> None:
    cfg, params = classifier
    lora = init_lora(params, jax.random.key(2), rank=RANK, alpha=ALPHA)
    state, _ = _state(cfg, params, lora)
    batch = jax.tree.map(jnp.asarray, _batches(1)[0])
    grads = jax.jit(jax.grad(lambda p: TASK.loss(p, state.apply_fn, batch, None, True)[0]))(state.params)
    assert np.abs(np.asarray(grads["base"]["tok_emb"]["embedding"])).max() > 0  # a real gradient exists
    poisoned = {"base": jax.tree.map(lambda g: jnp.full_like(g, jnp.nan), grads["base"]), "lora": grads["lora"]}
    update = jax.jit(lambda g: state.tx.update(g, state.opt_state, state.params)[0])
    updates, updates_p = update(grads), update(poisoned)
    for u, up in zip(jax.tree.leaves(updates["base"]), jax.tree.leaves(updates_p["base"])):
        assert not np.asarray(u).any() and not np.asarray(up).any()  # zero, never NaN: the gradient is unused
    for u, up in zip(jax.tree.leaves(updates["lora"]), jax.tree.leaves(updates_p["lora"])):
        assert np.array_equal(u, up)
    assert any(np.asarray(u).any() for u in jax.tree.leaves(updates["lora"]))


def test_checkpoint_and_exact_resume(classifier, tmp_path) -> None:
    cfg, params = classifier
    lora = init_lora(params, jax.random.key(2), rank=RANK, alpha=ALPHA)
    batches, key = _batches(6), jax.random.key(4)
    straight, straight_losses = _train(_state(cfg, params, lora)[0], batches, key)

    half, first = _train(_state(cfg, params, lora)[0], batches[:3], key)
    save_checkpoint(tmp_path, half, step=3, key=key, config=cfg, extra={"lora": lora_metadata(lora, "all")})
    del half
    template = _state(cfg, params, init_lora(params, jax.random.key(99), rank=RANK, alpha=ALPHA))[0]
    restored, meta = restore_checkpoint(tmp_path, template)
    assert meta["extra"]["lora"] == {"rank": RANK, "alpha": ALPHA, "dropout": 0.0, "targets": "all"}
    assert int(restored.step) == 3 and isinstance(restored.params["lora"], LoRA)
    resumed, second = _train(restored, batches[3:], meta["key"])

    assert np.concatenate([first, second]).tobytes() == straight_losses.tobytes()
    for x, y in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(straight.params)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    for x, y in zip(jax.tree.leaves(resumed.opt_state), jax.tree.leaves(straight.opt_state)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert lora_metadata(lora, ["W_query", "W_value"])["targets"] == ["W_query", "W_value"]


def test_lora_dropout_trains_reproducibly(classifier) -> None:
    cfg, params = classifier
    lora = init_lora(params, jax.random.key(2), rank=RANK, alpha=ALPHA, dropout=0.2)
    batches = _batches(4)
    _, a = _train(_state(cfg, params, lora)[0], batches, jax.random.key(0))
    _, b = _train(_state(cfg, params, lora)[0], batches, jax.random.key(0))
    _, c = _train(_state(cfg, params, lora)[0], batches, jax.random.key(1))
    _, plain = _train(_state(cfg, params, lora.replace(dropout=0.0))[0], batches, jax.random.key(0))
    assert np.isfinite(a).all() and a.tobytes() == b.tobytes()
    assert not np.array_equal(a[1:], c[1:])  # step 1 has B = 0: the dropout cannot show before it
    assert not np.array_equal(a[1:], plain[1:])  # training really drops adapter inputs
