"""GPTModel: logits and their shapes, tied heads, dropout, causality, the layout/remat/dtype/attention
switches, the KV cache path, id validation, and the model's outputs for heads and prefill (hidden states,
the last or chosen positions' logits). Parameters and their init are in test_params.py."""

from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _logits import logits as _logits

from flaxgpt.config import GPTConfig
from flaxgpt.nn.kv_cache import KVCache, init_cache
from flaxgpt.nn.model import GPTModel, forward
from flaxgpt.nn.params import (
    convert_layout,
    init_params,
    param_shapes,
    stack_layers,
)


def _ids(key: int, shape: tuple[int, int], vocab: int) -> jax.Array:
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


# --------------------------------------------------------------------------- shapes


def test_logits_shape_and_dtype(tiny, ids, tiny_params):
    logits = _logits(tiny, tiny_params, ids)
    assert logits.shape == (2, 10, tiny.vocab_size) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_tied_embeddings_have_no_out_head_and_use_tok_emb(tiny, ids, tiny_params):
    cfg = tiny.replace(tie_embeddings=True)
    tied = {k: v for k, v in tiny_params.items() if k != "out_head"}
    assert jax.tree.structure(param_shapes(cfg)) == jax.tree.structure(tied)
    untied = {**tied, "out_head": {"kernel": tied["tok_emb"]["embedding"].T}}
    np.testing.assert_allclose(_logits(cfg, tied, ids), _logits(tiny, untied, ids), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- forward-pass behaviour


def test_sequence_longer_than_context_is_an_error_at_trace_time(tiny, tiny_params):
    ids = jnp.zeros((1, tiny.context_length + 1), jnp.int32)
    with pytest.raises(ValueError, match="context_length"):
        _logits(tiny, tiny_params, ids)
    with pytest.raises(ValueError, match="context_length"):
        jax.eval_shape(lambda p, i: _logits(tiny, p, i), tiny_params, ids)
    _logits(tiny, tiny_params, ids[:, :-1])  # exactly context_length is fine


def test_dropout_reproducible_per_key_and_inactive_when_deterministic(tiny, ids, tiny_params):
    clean = _logits(tiny, tiny_params, ids, deterministic=True)

    def train(seed):
        return _logits(tiny, tiny_params, ids, deterministic=False, rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), clean)
    det = _logits(tiny, tiny_params, ids, deterministic=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(det, clean)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):  # training mode needs a dropout key
        _logits(tiny, tiny_params, ids, deterministic=False)


def test_future_tokens_never_change_past_logits(tiny, ids, tiny_params):
    ids = jnp.asarray(ids)
    changed = ids.at[:, 6:].set((ids[:, 6:] + 1) % tiny.vocab_size)
    a, b = _logits(tiny, tiny_params, ids), _logits(tiny, tiny_params, changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_rows_are_independent(tiny, ids, tiny_params):
    batch = _logits(tiny, tiny_params, ids)
    np.testing.assert_allclose(batch[1:2], _logits(tiny, tiny_params, ids[1:2]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- layout, remat, dtype


def test_scan_layers_gives_the_same_logits(tiny, ids, tiny_params):
    scan_cfg = tiny.replace(scan_layers=True)
    scanned = _logits(scan_cfg, stack_layers(tiny_params, tiny.n_layers), ids)
    np.testing.assert_allclose(scanned, _logits(tiny, tiny_params, ids), rtol=1e-6, atol=1e-6)


@functools.partial(jax.jit, static_argnums=0)
def _loss_grads(cfg: GPTConfig, params, ids, targets, dropout_key):
    """Mean cross-entropy and its gradients; dropout on when ``dropout_key`` is not None."""

    def loss(p):
        rngs = None if dropout_key is None else {"dropout": dropout_key}
        logits = GPTModel(cfg).apply({"params": p}, ids, deterministic=rngs is None, rngs=rngs)
        logp = jax.nn.log_softmax(logits, axis=-1)  # (B, T, V)
        return -jnp.take_along_axis(logp, targets[..., None], axis=-1).mean()

    return jax.value_and_grad(loss)(params)


@pytest.mark.slow
@pytest.mark.parametrize("remat, scan", [("full", False), ("dots", False), ("dots", True)])
def test_remat_gives_identical_gradients(tiny, ids, tiny_params, remat, scan):
    # Dropout on (tiny has drop_rate 0.1): remat must also replay the same dropout masks. An "rbg" key
    # compiles faster on CPU than the default threefry; the equivalence does not depend on the generator.
    ids, targets, key = ids, _ids(2, ids.shape, tiny.vocab_size), jax.random.key(3, impl="rbg")
    params = stack_layers(tiny_params, tiny.n_layers) if scan else tiny_params
    base = tiny.replace(scan_layers=scan)
    loss0, g0 = _loss_grads(base, params, ids, targets, key)
    loss1, g1 = _loss_grads(base.replace(remat=remat), params, ids, targets, key)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g1, g0)


def test_bfloat16_compute(tiny, ids, tiny_params):
    cfg = tiny.replace(dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    jax.tree.map(np.testing.assert_array_equal, params, tiny_params)  # same init, only compute differs
    low = _logits(cfg, params, ids)
    high = _logits(tiny, tiny_params, ids)
    assert low.dtype == jnp.float32 and low.shape == high.shape
    assert not np.array_equal(low, high)  # really computed in bfloat16
    scale = float(jnp.abs(high).max())
    np.testing.assert_allclose(low, high, atol=0.03 * scale, rtol=0)
    np.testing.assert_array_equal(jnp.argmax(low[:, -1], -1), jnp.argmax(high[:, -1], -1))


def test_dot_product_attention_equals_xla(tiny, ids, tiny_params):
    cfg = tiny.replace(attention="dot_product")
    fused, xla = _logits(cfg, tiny_params, ids), _logits(tiny, tiny_params, ids)
    np.testing.assert_allclose(fused, xla, rtol=1e-5, atol=1e-5)


def test_dot_product_with_training_dropout_raises(tiny, tiny_params):
    cfg = tiny.replace(attention="dot_product")
    ids = _ids(1, (1, 4), tiny.vocab_size)
    with pytest.raises(ValueError, match="dot_product.*dropout|dropout.*dot_product"):
        _logits(cfg, tiny_params, ids, deterministic=False, rngs={"dropout": jax.random.key(0)})
    no_drop = cfg.replace(drop_rate=0.0)
    _logits(no_drop, tiny_params, ids, deterministic=False, rngs={"dropout": jax.random.key(0)})


# --------------------------------------------------------------------------- KV cache


@functools.partial(jax.jit, static_argnums=0)
def _cached_step(cfg: GPTConfig, params, ids, cache):
    return GPTModel(cfg).apply({"params": params}, ids, cache=cache)


def _cached_logits(cfg, params, ids, prefill: int, offset=None):
    """Prefill ``prefill`` tokens, then decode the rest one at a time; returns (B, T, V) logits."""
    cache = init_cache(cfg, ids.shape[0], cfg.context_length, offset=offset)
    logits, cache = _cached_step(cfg, params, ids[:, :prefill], cache)
    outs = [logits]
    for i in range(prefill, ids.shape[1]):
        logits, cache = _cached_step(cfg, params, ids[:, i : i + 1], cache)
        outs.append(logits)
    assert isinstance(cache, KVCache) and int(cache.index) == ids.shape[1]
    return jnp.concatenate(outs, axis=1)


@pytest.mark.parametrize(
    "overrides", [{}, {"attention": "dot_product"}, {"scan_layers": True}], ids=["xla", "dot_product", "scan"]
)
def test_cached_decode_equals_full_forward(tiny, ids, tiny_params, overrides):
    cfg = tiny.replace(**overrides)
    params = convert_layout(tiny_params, cfg)
    full = _logits(tiny, tiny_params, ids)
    np.testing.assert_allclose(_cached_logits(cfg, params, ids, prefill=6), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["xla", "dot_product"])
def test_left_padded_row_equals_the_row_alone(tiny, ids, tiny_params, attention):
    cfg = tiny.replace(attention=attention)
    pad = 3
    short_row = ids[1:, pad:]  # (1, 7)
    batch = ids.copy()
    batch[1, :pad] = 0  # row 1 is a 7-token prompt left-padded to 10
    cached = _cached_logits(cfg, tiny_params, batch, prefill=6, offset=[0, pad])
    # Row 0 (offset 0) equals its full forward; row 1's real positions equal row 1 run alone.
    np.testing.assert_allclose(cached[0], _logits(tiny, tiny_params, ids)[0], rtol=1e-5, atol=1e-5)
    alone = _logits(tiny, tiny_params, short_row)[0]  # (T - pad, V)
    np.testing.assert_allclose(cached[1, pad:], alone, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(cached))


# --------------------------------------------------------------------------- token ids


def test_forward_validates_and_matches_apply(tiny, ids, tiny_params):
    model = GPTModel(tiny)
    np.testing.assert_allclose(forward(model, tiny_params, ids), _logits(tiny, tiny_params, ids), atol=1e-6)
    with pytest.raises(ValueError, match=str(tiny.vocab_size)):
        forward(model, tiny_params, [[0, tiny.vocab_size]])
    with pytest.raises(ValueError, match="shape"):
        forward(model, tiny_params, [1, 2, 3])


def test_concrete_out_of_vocabulary_ids_raise_before_compute(tiny, tiny_params):
    # The README's forward: eager apply on concrete ids is checked (JAX's gather would give NaN rows for
    # vocab_size and wrap -1 silently).
    model = GPTModel(tiny)
    for bad in (tiny.vocab_size, -1):
        for ids in (np.array([[1, bad, 2]]), jnp.array([[1, bad, 2]])):
            with pytest.raises(ValueError, match=rf"{bad}, outside the vocabulary \[0, {tiny.vocab_size}\)"):
                model.apply({"params": tiny_params}, ids, deterministic=True)
    with pytest.raises(ValueError, match="integers"):
        model.apply({"params": tiny_params}, np.array([[1.0, 2.0]]), deterministic=True)
    ok = model.apply({"params": tiny_params}, np.array([[1, tiny.vocab_size - 1]]), deterministic=True)
    assert np.all(np.isfinite(ok))


def test_traced_ids_are_not_checked(tiny, tiny_params):
    # Under jit the ids are tracers: no host check (and no host transfer); the gather's own rule applies.
    model = GPTModel(tiny)
    out = jax.jit(lambda p, i: model.apply({"params": p}, i))(tiny_params, jnp.array([[1, tiny.vocab_size]]))
    assert out.shape == (1, 2, tiny.vocab_size)
    variables = GPTModel(tiny).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))  # eager init: no check
    assert set(variables["params"]) == set(tiny_params)


# --------------------------------------------------------------------------- outputs for heads and prefill


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("positions", "return_hidden"))
def _out(cfg: GPTConfig, params, ids, positions_array=None, *, positions="all", return_hidden=False):
    pos = positions if positions_array is None else positions_array
    return GPTModel(cfg).apply({"params": params}, ids, positions=pos, return_hidden=return_hidden)


OUTPUT_CASES = [{}, {"tie_embeddings": True}, {"scan_layers": True}, {"scan_layers": True, "tie_embeddings": True}]
OUTPUT_IDS = ["untied", "tied", "scan", "scan-tied"]


def _params_for(cfg, tiny_params):
    params = convert_layout(tiny_params, cfg)
    if cfg.tie_embeddings:
        params = {k: v for k, v in params.items() if k != "out_head"}
    return params


@pytest.mark.parametrize("overrides", OUTPUT_CASES, ids=OUTPUT_IDS)
def test_last_and_chosen_positions_equal_the_full_logits_sliced(tiny, tiny_params, ids, overrides):
    cfg = tiny.replace(**overrides)
    params = _params_for(cfg, tiny_params)
    full = _out(cfg, params, ids)  # (B, T, V)
    last = _out(cfg, params, ids, positions="last")  # (B, V)
    assert last.shape == (2, cfg.vocab_size) and last.dtype == jnp.float32
    np.testing.assert_allclose(last, full[:, -1], rtol=1e-6, atol=1e-6)
    one = np.array([3, 7], np.int32)  # (B,)
    np.testing.assert_allclose(_out(cfg, params, ids, one), full[np.arange(2), one], rtol=1e-6, atol=1e-6)
    many = np.array([[0, 9, 4], [5, 5, 1]], np.int32)  # (B, K)
    chosen = _out(cfg, params, ids, many)  # (B, K, V)
    assert chosen.shape == (2, 3, cfg.vocab_size)
    np.testing.assert_allclose(chosen, np.take_along_axis(full, many[:, :, None], 1), rtol=1e-6, atol=1e-6)
    assert not np.allclose(chosen[0, 0], chosen[0, 1])  # different positions really differ


@pytest.mark.parametrize("overrides", OUTPUT_CASES, ids=OUTPUT_IDS)
def test_hidden_states_through_the_head_equal_the_logits(tiny, tiny_params, ids, overrides):
    cfg = tiny.replace(**overrides)
    params = _params_for(cfg, tiny_params)
    model = GPTModel(cfg)
    full = _out(cfg, params, ids)  # (B, T, V)
    hidden = _out(cfg, params, ids, return_hidden=True)  # (B, T, C)
    assert hidden.shape == (2, 10, cfg.emb_dim)
    head = model.apply({"params": params}, hidden, method=GPTModel.logits_from_hidden)  # (B, T, V)
    # two programs (eager head vs one fused forward) round differently: logits of |x| ~ 10 agree to 1e-5
    np.testing.assert_allclose(head, full, rtol=1e-5, atol=1e-5)
    last_hidden = _out(cfg, params, ids, positions="last", return_hidden=True)  # (B, C): a classifier's input
    np.testing.assert_allclose(last_hidden, hidden[:, -1], rtol=1e-6, atol=1e-6)
    # after final_norm: each position's features have mean ~shift and std ~scale (init: 0 and 1)
    np.testing.assert_allclose(hidden.mean(-1), 0.0, atol=1e-5)
    np.testing.assert_allclose(hidden.std(-1), 1.0, atol=1e-3)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_last_position_with_cache_equals_full_cached_logits(tiny, tiny_params, ids, scan):
    cfg = tiny.replace(scan_layers=scan)
    params = convert_layout(tiny_params, cfg)
    model = GPTModel(cfg)

    @jax.jit
    def both(params, ids, cache):
        full, c1 = model.apply({"params": params}, ids, cache=cache)  # (B, T, V)
        last, c2 = model.apply({"params": params}, ids, cache=cache, positions="last")  # (B, V)
        hid, c3 = model.apply({"params": params}, ids, cache=cache, positions="last", return_hidden=True)
        return full, last, hid, c1, c2, c3

    full, last, hidden, c1, c2, c3 = both(params, ids, init_cache(cfg, 2, cfg.context_length))
    np.testing.assert_allclose(last, full[:, -1], rtol=1e-6, atol=1e-6)
    assert hidden.shape == (2, cfg.emb_dim)
    for c in (c2, c3):
        assert int(c.index) == int(c1.index) == ids.shape[1]
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), c, c1)


def test_positions_are_validated(tiny, tiny_params, ids):
    model = GPTModel(tiny)
    apply = functools.partial(model.apply, {"params": tiny_params}, ids)
    with pytest.raises(ValueError, match="'first'"):
        apply(positions="first")
    with pytest.raises(ValueError, match=r"shape \(B,\) or \(B, K\) with B=2"):
        apply(positions=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="10, outside"):
        apply(positions=np.array([0, 10]))
    with pytest.raises(ValueError, match="-1, outside"):
        apply(positions=np.array([[0], [-1]]))
    with pytest.raises(ValueError, match="integers"):
        apply(positions=np.array([0.0, 1.0]))


def _prefill_hlo(model, params, idx, cache, full_logits: bool) -> str:
    """StableHLO text of the prefill: the library's (last position only) or the old full-logits one."""
    from flaxgpt.generation.decode import prefill

    def old(params, idx, cache):
        logits, cache = model.apply({"params": params}, idx, deterministic=True, cache=cache)  # (B, Tb, V)
        return logits[:, -1], cache

    fn = old if full_logits else functools.partial(prefill, model)
    return jax.jit(fn).lower(params, idx, cache).as_text()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_prefill_never_builds_the_full_logits(tiny, tiny_params, tied):
    cfg = tiny.replace(tie_embeddings=tied, vocab_size=101)  # a vocabulary size no other dim has
    params = _params_for(cfg, init_params(cfg.replace(tie_embeddings=False), jax.random.key(0)))
    model = GPTModel(cfg)
    b, tb = 3, 8
    idx = jnp.zeros((b, tb), jnp.int32)
    cache = init_cache(cfg, b, tb + 8)
    full_shape = f"tensor<{b}x{tb}x{cfg.vocab_size}xf32>"
    assert full_shape in _prefill_hlo(model, params, idx, cache, full_logits=True)  # the check can fail
    new = _prefill_hlo(model, params, idx, cache, full_logits=False)
    assert full_shape not in new and f"<{b}x{tb}x{cfg.vocab_size}x" not in new
    assert f"tensor<{b}x{cfg.vocab_size}xf32>" in new  # the last position's logits
