"""Tests for flaxgpt.nn.lora: adapter counts (the book's appendix-E figures), the book's initialisation, the
B = 0 and merge equivalences in both layer layouts, LoRA dropout, and the error messages."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.config import GPTConfig
from flaxgpt.finetune.classify import to_classifier
from flaxgpt.finetune.lora_train import lora_labels
from flaxgpt.finetune.trainable import FROZEN, TRAINABLE, count_by_label
from flaxgpt.generation.decode import generate
from flaxgpt.nn.kv_cache import init_cache
from flaxgpt.nn.lora import (
    LoRA,
    LoRAApply,
    check_lora,
    inference_params,
    init_lora,
    is_lora_train_params,
    linear_layers,
    lora_apply,
    lora_train_params,
    merge_lora,
    target_layers,
)
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import convert_layout, count_params, init_params
from flaxgpt.pytree import flat_dict, unflatten_dict

RANK, ALPHA = 4, 8.0  # alpha / rank = 2: the book's current scaling and its first printing's (alpha) differ


def _ids(cfg: GPTConfig, b: int = 2, t: int = 10, seed: int = 1) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size), np.int32)  # (B, T)


def _random_b(lora: LoRA, seed: int = 7, std: float = 0.1) -> LoRA:
    """The same adapters with B drawn N(0, std^2): a trained-looking adapter whose term is not zero."""
    leaves, treedef = jax.tree.flatten(lora.adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    flat = flat_dict(lora.adapters)
    new = {n: (std * jax.random.normal(k, x.shape) if n.endswith("/B") else x)
           for (n, x), k in zip(flat.items(), keys)}
    assert len(new) == len(leaves)
    return lora.replace(adapters=jax.tree.unflatten(treedef, [new[n] for n in flat]))


@pytest.fixture
def lm(tiny_config):
    """A tiny untied language model (its head is a linear layer LoRA can target) and its params."""
    cfg = tiny_config(qkv_bias=True)
    return cfg, init_params(cfg, jax.random.key(0))


# --------------------------------------------------------------------------- counts (the book's figures)


def _shapes_and_lora(cfg: GPTConfig, num_classes: int | None, rank: int) -> tuple[object, LoRA]:
    """Params and adapters of ``cfg`` as ``jax.eval_shape`` leaves: nothing is allocated."""

    def build(key: jax.Array):
        params = init_params(cfg, key)
        if num_classes is not None:
            params = to_classifier(cfg, params, num_classes, jax.random.fold_in(key, 1))[1]
        return params, init_lora(params, jax.random.fold_in(key, 2), rank=rank, alpha=16)

    return jax.eval_shape(build, jax.random.key(0))


def test_the_books_appendix_e_adapter_counts() -> None:
    # the chapter-6 classifier: GPT-2 124M with qkv bias and a 2-class head, LoRA rank 16 on every linear layer
    cfg = GPTConfig.preset("gpt2-small", qkv_bias=True, drop_rate=0.0)
    params, lora = _shapes_and_lora(cfg, 2, 16)
    assert count_params(params) == 124_441_346  # the book's "Total trainable parameters before"
    assert count_params(lora.adapters) == 2_666_528  # the book's "Total trainable LoRA parameters"
    assert len(lora.layers) == 12 * 6 + 1 and lora.rank == 16 and lora.scale == 1.0
    assert lora.layers["out_head"]["B"].shape == (16, 2)
    counts = count_by_label(lora_train_params(params, lora), lora_labels(lora_train_params(params, lora)))
    assert counts == {TRAINABLE: 2_666_528, FROZEN: 124_441_346}  # no base parameter trains

    # gpt2-medium with the LM head as its own linear layer (the book's model, untied)
    cfg = GPTConfig.preset("gpt2-medium", qkv_bias=True, tie_embeddings=False, drop_rate=0.0)
    _, lora = _shapes_and_lora(cfg, None, 16)
    assert count_params(lora.adapters) == 7_898_384
    assert lora.layers["out_head"]["B"].shape == (16, 50257)


def test_target_presets_and_patterns_count_as_by_hand(tiny_config) -> None:
    cfg = tiny_config()  # C = 32, L = 2, V = 96; rank 4: a (in, out) layer holds 4 * (in + out) adapter weights
    params = init_params(cfg, jax.random.key(0))
    key = jax.random.key(3)
    attention = 2 * 4 * RANK * (32 + 32)  # Q, K, V, out_proj
    feed_forward = 2 * 2 * RANK * (32 + 128)  # fc1 (32 -> 128), fc2 (128 -> 32)
    head = RANK * (32 + 96)
    for targets, want in (("attention", attention), ("feed_forward", feed_forward),
                          ("all", attention + feed_forward + head)):
        assert count_params(init_lora(params, key, rank=RANK, targets=targets).adapters) == want, targets
    assert attention + feed_forward + head == 5120
    assert target_layers(params, "W_query|W_value") == [
        "trf_blocks_0/att/W_query", "trf_blocks_0/att/W_value", "trf_blocks_1/att/W_query", "trf_blocks_1/att/W_value"
    ]
    assert target_layers(params, "trf_blocks_1/ff/,out_head") == target_layers(params, ["trf_blocks_1/ff/", "out_head"])
    assert target_layers(params, ["trf_blocks_1/ff/", "out_head"]) == [
        "out_head", "trf_blocks_1/ff/fc1", "trf_blocks_1/ff/fc2"
    ]
    assert len(target_layers(params, "all")) == len(linear_layers(params)) == 13
    # a tied model has no head layer: "all" is the 12 block layers
    tied = init_params(tiny_config(tie_embeddings=True), jax.random.key(0))
    assert len(target_layers(tied, "all")) == 12 and "out_head" not in init_lora(tied, key, rank=RANK).adapters


# --------------------------------------------------------------------------- initialisation


def test_a_is_the_books_kaiming_uniform_and_b_is_zero() -> None:
    rank = 64
    base = {"big": {"kernel": jnp.zeros((2048, 48))}}  # one (in, out) linear layer
    lora = init_lora(base, jax.random.key(0), rank=rank, alpha=16)
    a, b = np.asarray(lora.layers["big"]["A"]), np.asarray(lora.layers["big"]["B"])
    assert a.shape == (2048, rank) and b.shape == (rank, 48) and a.dtype == np.float32
    bound = 1 / np.sqrt(rank)  # kaiming_uniform_(a=sqrt(5)) with fan_in = rank: U(+-1/sqrt(rank))
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.99 * bound
    np.testing.assert_allclose(a.std(), 1 / np.sqrt(3 * rank), rtol=0.02)  # the std of U(+-bound)
    assert abs(a.mean()) < 0.01 * bound
    assert not b.any()
    assert lora.scale == 16 / rank


def test_a_matches_the_books_pytorch_initialiser_bounds() -> None:
    pytest.importorskip("torch")
    from _book_lora_torch import LoRALayer

    rank = 32
    layer = LoRALayer(1024, 16, rank, 16)  # the book's layer: A (in, rank)
    want = layer.A.detach().numpy()
    got = np.asarray(init_lora({"w": {"kernel": jnp.zeros((1024, 16))}}, jax.random.key(1), rank=rank).layers["w"]["A"])
    assert got.shape == want.shape
    for x in (want, got):  # the same distribution: same support, same spread
        assert np.abs(x).max() <= 1 / np.sqrt(rank)
    np.testing.assert_allclose(got.std(), want.std(), rtol=0.03)
    assert not layer.B.detach().numpy().any()


def test_each_layer_draws_its_own_a_and_the_key_fixes_them(lm) -> None:
    cfg, params = lm
    lora = init_lora(params, jax.random.key(5), rank=RANK, alpha=ALPHA)
    a = {path: np.asarray(ab["A"]) for path, ab in lora.layers.items()}
    same_shape = [p for p in a if a[p].shape == (32, RANK)]
    assert len(same_shape) >= 8
    for i, p in enumerate(same_shape):
        for q in same_shape[i + 1:]:
            assert not np.array_equal(a[p], a[q]), (p, q)
    again = init_lora(params, jax.random.key(5), rank=RANK, alpha=ALPHA)
    for x, y in zip(jax.tree.leaves(lora), jax.tree.leaves(again)):
        assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    other = init_lora(params, jax.random.key(6), rank=RANK, alpha=ALPHA)
    assert not np.array_equal(other.layers["out_head"]["A"], lora.layers["out_head"]["A"])
    # scanned layout: one stacked adapter per layer kind, its layer slices drawn apart
    sparams = convert_layout(params, cfg.replace(scan_layers=True))
    slora = init_lora(sparams, jax.random.key(5), rank=RANK)
    q = np.asarray(slora.layers["trf_blocks/att/W_query"]["A"])
    assert q.shape == (cfg.n_layers, 32, RANK) and not np.array_equal(q[0], q[1])
    assert slora.layers["trf_blocks/att/W_query"]["B"].shape == (cfg.n_layers, RANK, 32)
    check_lora(sparams, slora)
    assert init_lora(params, jax.random.key(5), rank=RANK, dtype=jnp.bfloat16).layers["out_head"]["A"].dtype == jnp.bfloat16


# --------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("tie", [False, True])
def test_b_zero_gives_the_base_models_outputs_exactly(tiny_config, tie: bool) -> None:
    cfg = tiny_config(qkv_bias=True, tie_embeddings=tie)
    params = init_params(cfg, jax.random.key(0))
    model, ids = GPTModel(cfg), _ids(cfg)
    lora = init_lora(params, jax.random.key(1), rank=RANK, alpha=ALPHA)
    want = model.apply({"params": params}, ids, deterministic=True)  # (B, T, V)
    got = lora_apply(model, params, lora, ids, deterministic=True)
    assert got.shape == want.shape and np.array_equal(got, want)  # eager: bit-identical
    got_jit = jax.jit(lambda p, a, x: lora_apply(model, p, a, x))(params, lora, ids)
    want_jit = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, ids)
    np.testing.assert_allclose(got_jit, want_jit, atol=1e-6, rtol=1e-6)  # another XLA program
    # and the adapter is live: a non-zero B changes the outputs
    assert np.abs(np.asarray(lora_apply(model, params, _random_b(lora), ids)) - np.asarray(want)).max() > 1e-3


def test_merged_params_give_the_adapted_models_logits(lm) -> None:
    cfg, params = lm
    model, ids = GPTModel(cfg), _ids(cfg)
    before = jax.tree.map(np.array, params)
    lora = _random_b(init_lora(params, jax.random.key(1), rank=RANK, alpha=ALPHA))
    merged = merge_lora(params, lora)
    adapted = np.asarray(lora_apply(model, params, lora, ids))  # (B, T, V)
    plain = np.asarray(model.apply({"params": merged}, ids))
    np.testing.assert_allclose(plain, adapted, atol=1e-5, rtol=0)
    assert np.abs(adapted - np.asarray(model.apply({"params": params}, ids))).max() > 1e-3
    # the merge is W + (alpha / rank) A B, layer by layer; other leaves are the base's
    ab = lora.layers["trf_blocks_1/ff/fc2"]
    want = before["trf_blocks_1"]["ff"]["fc2"]["kernel"] + 2.0 * np.asarray(ab["A"]) @ np.asarray(ab["B"])
    np.testing.assert_allclose(merged["trf_blocks_1"]["ff"]["fc2"]["kernel"], want, atol=1e-6, rtol=0)
    assert np.array_equal(merged["trf_blocks_1"]["ff"]["fc2"]["bias"], before["trf_blocks_1"]["ff"]["fc2"]["bias"])
    assert merged["tok_emb"]["embedding"] is params["tok_emb"]["embedding"]
    assert jax.tree.structure(merged) == jax.tree.structure(params)
    # the base is not modified
    for name, x in flat_dict(params).items():
        assert np.asarray(x).tobytes() == flat_dict(before)[name].tobytes(), name
    # only the targets change
    attn = _random_b(init_lora(params, jax.random.key(1), rank=RANK, alpha=ALPHA, targets="attention"))
    m2 = merge_lora(params, attn)
    assert m2["trf_blocks_0"]["ff"]["fc1"]["kernel"] is params["trf_blocks_0"]["ff"]["fc1"]["kernel"]
    assert not np.array_equal(m2["trf_blocks_0"]["att"]["W_key"]["kernel"], before["trf_blocks_0"]["att"]["W_key"]["kernel"])
    # the train-state helpers
    train = lora_train_params(params, lora)
    assert is_lora_train_params(train) and not is_lora_train_params(params)
    assert inference_params(params) is params
    np.testing.assert_array_equal(inference_params(train)["out_head"]["kernel"], merged["out_head"]["kernel"])
    np.testing.assert_array_equal(LoRAApply(model)({"params": train}, ids), adapted)
    assert hash(LoRAApply(model)) == hash(LoRAApply(model))


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scanned_layout_gives_the_unrolled_logits(lm, remat: str) -> None:
    cfg, params = lm
    ids = _ids(cfg)
    lora = _random_b(init_lora(params, jax.random.key(1), rank=RANK, alpha=ALPHA))
    scfg = cfg.replace(scan_layers=True, remat=remat)
    sparams = convert_layout(params, scfg)
    slora = lora.replace(adapters=convert_layout(lora.adapters, scfg))  # stacked adapters
    assert slora.layers["trf_blocks/ff/fc1"]["A"].shape == (cfg.n_layers, 32, RANK)
    want = np.asarray(lora_apply(GPTModel(cfg), params, lora, ids))
    got = np.asarray(lora_apply(GPTModel(scfg), sparams, slora, ids))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    merged = convert_layout(merge_lora(sparams, slora), cfg)
    for name, x in flat_dict(merge_lora(params, lora)).items():
        np.testing.assert_allclose(flat_dict(merged)[name], x, atol=1e-6, rtol=0, err_msg=name)
    # the adapters of one layout do not fit the other
    with pytest.raises(ValueError, match="no linear layer"):
        lora_apply(GPTModel(scfg), sparams, lora, ids)


def test_last_position_and_hidden_state_paths_use_the_adapters(lm) -> None:
    cfg, params = lm
    model, ids = GPTModel(cfg), _ids(cfg)
    lora = _random_b(init_lora(params, jax.random.key(1), rank=RANK, alpha=ALPHA))
    full = np.asarray(lora_apply(model, params, lora, ids))  # (B, T, V)
    last = np.asarray(lora_apply(model, params, lora, ids, positions="last"))  # (B, V)
    np.testing.assert_allclose(last, full[:, -1], atol=1e-6, rtol=0)
    rows = np.asarray(lora_apply(model, params, lora, ids, positions=jnp.asarray([3, 7])))  # (B, V)
    np.testing.assert_allclose(rows, full[[0, 1], [3, 7]], atol=1e-6, rtol=0)
    hidden = lora_apply(model, params, lora, ids, positions="last", return_hidden=True)  # (B, C)
    assert hidden.shape == (2, cfg.emb_dim)
    head = np.asarray(lora_apply(model, params, lora, hidden, method=GPTModel.logits_from_hidden))  # (B, V)
    np.testing.assert_allclose(head, full[:, -1], atol=1e-6, rtol=0)
    plain_head = np.asarray(model.apply({"params": params}, hidden, method=GPTModel.logits_from_hidden))
    assert np.abs(plain_head - head).max() > 1e-3  # the head's adapter is applied there too


def test_generation_with_merged_params_follows_the_adapted_model(lm) -> None:
    cfg, params = lm
    model = GPTModel(cfg)
    lora = _random_b(init_lora(params, jax.random.key(1), rank=RANK, alpha=ALPHA), std=0.3)
    prompt = _ids(cfg, 1, 4, seed=2)[0]
    out = np.asarray(generate(model, merge_lora(params, lora), prompt, max_new_tokens=6))  # KV cache

    @jax.jit
    def next_token(seq: jax.Array, pos: jax.Array) -> jax.Array:  # causal: the padding after pos is never seen
        return jnp.argmax(lora_apply(model, params, lora, seq, positions=pos), axis=-1)  # (1,)

    seq = np.zeros((1, 10), np.int32)  # (1, T + 6)
    seq[0, :4] = prompt
    for t in range(4, 10):  # greedy without a cache, through the adapters
        seq[0, t] = int(next_token(seq, jnp.asarray([t - 1]))[0])
    assert out.tolist() == seq[0].tolist()
    # a KV-cache prefill through the adapters gives the cache-free logits
    ids = _ids(cfg)
    logits, cache = lora_apply(model, params, lora, ids, cache=init_cache(cfg, 2, cfg.context_length))
    np.testing.assert_allclose(logits, lora_apply(model, params, lora, ids), atol=1e-5, rtol=0)
    assert int(cache.index) == ids.shape[1]


# --------------------------------------------------------------------------- dropout


def test_lora_dropout_only_in_training_and_reproducible(lm) -> None:
    cfg, params = lm  # drop_rate 0: only the adapters' dropout acts
    model, ids = GPTModel(cfg), _ids(cfg)
    lora = _random_b(init_lora(params, jax.random.key(1), rank=RANK, alpha=ALPHA))
    drop = lora.replace(dropout=0.3)
    assert drop.dropout == 0.3 and jax.tree.structure(drop) != jax.tree.structure(lora)  # a static field
    ref = np.asarray(lora_apply(model, params, lora, ids, deterministic=True))
    assert np.array_equal(lora_apply(model, params, drop, ids, deterministic=True), ref)
    assert np.array_equal(lora_apply(model, params, drop, ids), ref)  # deterministic by default
    rngs = {"dropout": jax.random.key(2)}
    a = np.asarray(lora_apply(model, params, drop, ids, deterministic=False, rngs=rngs))
    b = np.asarray(lora_apply(model, params, drop, ids, False, rngs=rngs))  # positional deterministic
    c = np.asarray(lora_apply(model, params, drop, ids, deterministic=False, rngs={"dropout": jax.random.key(3)}))
    assert np.array_equal(a, b) and np.abs(a - ref).max() > 1e-4 and np.abs(a - c).max() > 1e-4
    # without LoRA dropout, training mode is the deterministic forward (the model's own dropout is 0)
    assert np.array_equal(lora_apply(model, params, lora, ids, deterministic=False, rngs=rngs), ref)


def test_lora_dropout_is_inverted_dropout_of_the_adapter_input(lm) -> None:
    cfg, params = lm
    model, ids = GPTModel(cfg), _ids(cfg)
    # only the head adapted: its input (the final hidden state) does not depend on the dropout, so the adapter
    # term is linear in the keep mask and its mean over masks is the deterministic term
    lora = _random_b(init_lora(params, jax.random.key(1), rank=RANK, alpha=ALPHA, targets="out_head"), std=1.0)
    drop = lora.replace(dropout=0.25)
    base = np.asarray(model.apply({"params": params}, ids))
    term = np.asarray(lora_apply(model, params, lora, ids)) - base  # (B, T, V)

    @jax.jit
    def sample(key: jax.Array) -> jax.Array:
        return lora_apply(model, params, drop, ids, deterministic=False, rngs={"dropout": key})

    draws = np.stack([np.asarray(sample(k)) for k in jax.random.split(jax.random.key(0), 200)]) - base
    err = np.abs(draws.mean(0) - term).mean() / np.abs(term).mean()
    assert err < 0.1, err
    assert np.abs(draws - term).mean() / np.abs(term).mean() > 0.2  # each draw really is perturbed


# --------------------------------------------------------------------------- errors


def test_bad_settings_are_named(lm) -> None:
    _, params = lm
    key = jax.random.key(0)
    for kwargs, match in (
        (dict(rank=0), "rank must be a positive int, got 0"),
        (dict(rank=2.5), "rank must be a positive int"),
        (dict(rank=True), "rank must be a positive int"),
        (dict(alpha=0), "alpha must be > 0"),
        (dict(alpha=float("nan")), "alpha must be a finite number"),
        (dict(dropout=1.0), "dropout must be < 1"),
        (dict(dropout=-0.1), "dropout must be >= 0"),
        (dict(targets="W_gate"), r"LoRA target 'W_gate' matches no linear layer"),
        (dict(targets="attn"), r"LoRA target 'attn' matches no linear layer"),  # not a preset: a pattern
        (dict(targets=["W_query", "nope/"]), r"'nope/' matches no linear layer"),
        (dict(targets="W_(query"), "is not a regular expression"),
        (dict(targets=[]), r"one of \['all', 'attention', 'feed_forward'\]"),
        (dict(targets=","), "LoRA targets must be one of"),
        (dict(targets=[3]), "LoRA targets must be one of"),
    ):
        with pytest.raises(ValueError, match=match):
            init_lora(params, key, **kwargs)


def test_adapters_that_do_not_fit_are_refused(lm, tiny_config) -> None:
    cfg, params = lm
    lora = init_lora(params, jax.random.key(0), rank=RANK, alpha=ALPHA)
    wide = init_params(tiny_config(qkv_bias=True, emb_dim=48), jax.random.key(0))
    other = init_lora(wide, jax.random.key(0), rank=RANK)
    ids = _ids(cfg)
    for fn in (check_lora, merge_lora, lambda p, a: lora_apply(GPTModel(cfg), p, a, ids), lora_train_params):
        with pytest.raises(ValueError, match=r"does not fit the base layer .*expected A \(32, 4\)"):
            fn(params, other)
    tied = init_params(tiny_config(tie_embeddings=True), jax.random.key(0))
    with pytest.raises(ValueError, match="'out_head' has no linear layer in the base params"):
        check_lora(tied, lora)
    with pytest.raises(ValueError, match="expected a flaxgpt LoRA, got dict"):
        check_lora(params, lora.adapters)
    with pytest.raises(ValueError, match="holds no adapters"):
        check_lora(params, LoRA({}, alpha=1.0))
    mixed = dict(flat_dict(lora.adapters))
    mixed["trf_blocks_1/ff/fc2/A"] = jnp.zeros((128, 2 * RANK))  # one adapter of another rank
    mixed["trf_blocks_1/ff/fc2/B"] = jnp.zeros((2 * RANK, 32))
    with pytest.raises(ValueError, match=r"'trf_blocks_1/ff/fc2' does not fit.*expected A \(128, 4\)"):
        check_lora(params, LoRA(unflatten_dict(mixed), alpha=ALPHA))
    del mixed["out_head/B"]
    mixed["out_head/A"] = jnp.zeros((32, RANK))
    with pytest.raises(ValueError, match=r"'out_head' does not fit.*got \{'A': \(32, 4\)\}"):
        check_lora(params, LoRA(unflatten_dict(mixed), alpha=ALPHA))
    assert check_lora(params, lora) is None
