"""GPTModel: shapes and parameter counts (full sizes via eval_shape), initialisation schemes against
PyTorch's defaults and GPT-2's, dropout, causality, the layout/remat/dtype/attention switches, the KV
cache path, and the book's greedy generation loop."""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.book.generate import generate_text_simple
from flaxgpt.config import GPT_CONFIG_124M, GPTConfig
from flaxgpt.nn.kv_cache import KVCache, init_cache
from flaxgpt.nn.model import GPTModel, forward
from flaxgpt.nn.params import (
    convert_layout,
    count_params,
    init_params,
    param_bytes,
    param_shapes,
    stack_layers,
    unstack_layers,
)
from flaxgpt.validation import check_token_ids

TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1)


@pytest.fixture(scope="module")
def tiny_params():
    return init_params(TINY, jax.random.key(0))


def _ids(key: int, shape: tuple[int, int], vocab: int = TINY.vocab_size) -> jax.Array:
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


# Most tests share these ids so that their jitted forwards share compiles.
IDS = np.asarray(jax.random.randint(jax.random.key(1), (2, 10), 0, TINY.vocab_size), np.int32)


def _logits(cfg: GPTConfig, params, ids, deterministic: bool = True, rngs=None):
    """Jitted ``model.apply`` (the config is static, so equal configs and shapes share a compile)."""
    key = None if rngs is None else rngs["dropout"]
    return _jit_logits(cfg, params, jnp.asarray(ids), deterministic, key)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _jit_logits(cfg: GPTConfig, params, ids, deterministic, key):
    rngs = None if key is None else {"dropout": key}
    return GPTModel(cfg).apply({"params": params}, ids, deterministic=deterministic, rngs=rngs)


# --------------------------------------------------------------------------- shapes and names


def test_logits_shape_and_dtype(tiny_params):
    logits = _logits(TINY, tiny_params, IDS)
    assert logits.shape == (2, 10, TINY.vocab_size) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_model_init_entry_point_matches_init_params():
    # model.init(key, ids) is the book-style entry point; any ids shape gives init_params' values.
    variables = jax.jit(GPTModel(TINY).init)(jax.random.key(0), jnp.asarray(IDS))
    params = init_params(TINY, jax.random.key(0))
    assert set(variables) == {"params"}
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], params)


def test_param_tree_names_and_shapes(tiny_params):
    shapes = jax.tree.map(jnp.shape, tiny_params)
    c, v, ctx = TINY.emb_dim, TINY.vocab_size, TINY.context_length
    assert set(shapes) == {"tok_emb", "pos_emb", "trf_blocks_0", "trf_blocks_1", "final_norm", "out_head"}
    assert shapes["tok_emb"] == {"embedding": (v, c)}
    assert shapes["pos_emb"] == {"embedding": (ctx, c)}
    assert shapes["final_norm"] == {"scale": (c,), "shift": (c,)}
    assert shapes["out_head"] == {"kernel": (c, v)}
    block = shapes["trf_blocks_1"]
    assert block["att"] == {
        "W_query": {"kernel": (c, c)},
        "W_key": {"kernel": (c, c)},
        "W_value": {"kernel": (c, c)},
        "out_proj": {"kernel": (c, c), "bias": (c,)},
    }
    assert block["ff"] == {
        "fc1": {"kernel": (c, 4 * c), "bias": (4 * c,)},
        "fc2": {"kernel": (4 * c, c), "bias": (c,)},
    }
    assert block["norm1"] == block["norm2"] == {"scale": (c,), "shift": (c,)}


def test_tied_embeddings_have_no_out_head_and_use_tok_emb(tiny_params):
    cfg = TINY.replace(tie_embeddings=True)
    tied = {k: v for k, v in tiny_params.items() if k != "out_head"}
    assert jax.tree.structure(param_shapes(cfg)) == jax.tree.structure(tied)
    untied = {**tied, "out_head": {"kernel": tied["tok_emb"]["embedding"].T}}
    np.testing.assert_allclose(_logits(cfg, tied, IDS), _logits(TINY, untied, IDS), rtol=1e-5, atol=1e-5)


def test_qkv_bias_adds_biases():
    params = param_shapes(TINY.replace(qkv_bias=True))
    for name in ("W_query", "W_key", "W_value"):
        assert params["trf_blocks_0"]["att"][name]["bias"].shape == (TINY.emb_dim,)


# --------------------------------------------------------------------------- parameter counts

FULL_SIZES = {
    # name: (untied count, MiB at float32, tied count)
    "gpt2-small": (163_009_536, 621.83, 124_412_160),
    "gpt2-medium": (406_212_608, 1549.58, 354_749_440),
    "gpt2-large": (838_220_800, 3197.56, 773_891_840),
    "gpt2-xl": (1_637_792_000, 6247.68, 1_557_380_800),
}


@pytest.mark.parametrize("name", list(FULL_SIZES))
def test_full_size_parameter_counts_from_shapes(name):
    untied, mib, tied = FULL_SIZES[name]
    shapes = param_shapes(GPTConfig.preset(name))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    assert count_params(shapes) == untied
    assert round(param_bytes(shapes) / 2**20, 2) == mib
    # Tied (GPT-2's checkpoints); the scanned layout keeps the trace short and must count the same.
    tied_shapes = param_shapes(GPTConfig.preset(name, tie_embeddings=True, scan_layers=True))
    assert count_params(tied_shapes) == tied
    assert untied - tied == 50257 * GPTConfig.preset(name).emb_dim


def test_count_params_on_arrays_and_bytes_follow_dtype(tiny_params):
    n = count_params(tiny_params)
    assert n == count_params(param_shapes(TINY))
    assert n == sum(x.size for x in jax.tree.leaves(tiny_params))
    assert param_bytes(tiny_params) == 4 * n
    assert param_bytes(param_shapes(TINY.replace(param_dtype="bfloat16"))) == 2 * n


def test_book_124m_count_by_hand():
    c, v, ctx, layers = 768, 50257, 1024, 12
    block = 3 * c * c + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c) + 4 * c
    expected = v * c + ctx * c + layers * block + 2 * c + c * v
    assert count_params(param_shapes(GPT_CONFIG_124M)) == expected == 163_009_536


# --------------------------------------------------------------------------- initialisation


def test_init_params_is_one_jitted_program_and_traceable_at_full_size():
    cfg = TINY
    jaxpr = jax.make_jaxpr(functools.partial(init_params, cfg))(jax.random.key(0))
    assert [e.primitive.name for e in jaxpr.eqns] in (["jit"], ["pjit"])  # one compiled program
    full = jax.eval_shape(functools.partial(init_params, GPTConfig.preset("gpt2-small")), jax.random.key(0))
    assert count_params(full) == 163_009_536


def test_init_params_reproducible_per_key():
    a = init_params(TINY, jax.random.key(5))
    b = init_params(TINY, jax.random.key(5))
    c = init_params(TINY, jax.random.key(6))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["tok_emb"]["embedding"], c["tok_emb"]["embedding"])


# Shapes big enough for tight statistics, small enough to init in well under a second.
STATS = GPTConfig(vocab_size=1000, context_length=128, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True)


def _flat(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {"/".join(k.key for k in path): np.asarray(x) for path, x in leaves}


def _fan_in(flat: dict[str, np.ndarray], path: str) -> int:
    return flat[path.rsplit("/", 1)[0] + "/kernel"].shape[0]


def _assert_stats(
    name: str, x: np.ndarray, mean: float, std: float, kurtosis: float = 3.0, sampled: bool = False
) -> None:
    """x's mean and std agree with (mean, std) within ~6 standard errors for x's size.

    ``sampled``: (mean, std) are themselves sample statistics of a same-size tensor (sqrt(2) more slack).
    """
    n = x.size
    if std == 0.0:
        assert np.all(x == mean), f"{name}: expected constant {mean}"
        return
    slack = 6 * (math.sqrt(2) if sampled else 1)
    assert abs(x.mean() - mean) <= slack * std / math.sqrt(n), f"{name}: mean {x.mean():.4g} vs {mean:.4g}"
    rel = slack * math.sqrt((kurtosis - 1) / (4 * n))  # standard error of a sample std, relative
    assert abs(x.std() / std - 1) <= max(rel, 0.02), f"{name}: std {x.std():.4g} vs {std:.4g} (n={n})"


def _check_torch_init(params, torch) -> None:
    """Each tensor against a freshly made torch module of the same shape (nn.Embedding, nn.Linear,
    nn.LayerNorm): same mean and std, and uniform weights within torch's bound 1/sqrt(fan_in)."""
    torch.manual_seed(0)
    flat = _flat(params)
    for path, x in flat.items():
        leaf = path.rsplit("/", 1)[1]
        if leaf == "embedding":
            ref = torch.nn.Embedding(*x.shape).weight
        elif leaf in ("scale", "shift"):
            ln = torch.nn.LayerNorm(x.shape[0])
            ref = ln.weight if leaf == "scale" else ln.bias
        elif leaf == "kernel":
            ref = torch.nn.Linear(*x.shape).weight  # (out, in): same distribution as our (in, out)
        elif leaf == "bias":
            ref = torch.nn.Linear(_fan_in(flat, path), x.shape[0]).bias
        else:
            raise AssertionError(f"unexpected parameter {path}")
        ref = ref.detach().numpy()
        assert ref.size == x.size
        uniform = leaf in ("kernel", "bias")
        kurtosis = 1.8 if uniform else 3.0  # U(-a, a) or N(0, 1)
        _assert_stats(path, x, float(ref.mean()), float(ref.std()), kurtosis, sampled=True)
        if uniform:
            bound = 1 / math.sqrt(_fan_in(flat, path) if leaf == "bias" else x.shape[0])
            assert np.abs(x).max() <= bound * (1 + 1e-6), f"{path}: outside U(-{bound:.4g}, {bound:.4g})"
            assert np.abs(ref).max() <= bound * (1 + 1e-6)  # torch agrees on the bound


def test_torch_init_matches_pytorch_defaults():
    torch = pytest.importorskip("torch")
    _check_torch_init(init_params(STATS, jax.random.key(0)), torch)


def test_torch_init_check_can_fail():
    torch = pytest.importorskip("torch")
    with pytest.raises(AssertionError):
        _check_torch_init(init_params(STATS.replace(init="gpt2"), jax.random.key(0)), torch)
    # A N(0, 0.02) init of the Linear kernels alone must fail too.
    params = init_params(STATS, jax.random.key(0))
    normal = jax.tree_util.tree_map_with_path(
        lambda p, x: 0.02 * jax.random.normal(jax.random.key(1), x.shape) if p[-1].key == "kernel" else x,
        params,
    )
    with pytest.raises(AssertionError, match="kernel"):
        _check_torch_init(normal, torch)


def test_gpt2_init_scheme():
    params = init_params(STATS.replace(init="gpt2"), jax.random.key(0))
    residual_std = 0.02 / math.sqrt(2 * STATS.n_layers)
    seen = set()
    for path, x in _flat(params).items():
        parent, leaf = path.rsplit("/", 1)
        if leaf == "scale":
            _assert_stats(path, x, 1.0, 0.0)
        elif leaf in ("shift", "bias"):
            _assert_stats(path, x, 0.0, 0.0)
        elif parent.endswith(("out_proj", "fc2")):
            _assert_stats(path, x, 0.0, residual_std)
            seen.add("residual")
        else:  # embeddings, W_query/W_key/W_value, fc1, out_head
            _assert_stats(path, x, 0.0, 0.02)
            seen.add(leaf)
    assert seen == {"residual", "kernel", "embedding"}


def test_gpt2_init_check_can_fail():
    w_query = np.asarray(init_params(STATS, jax.random.key(0))["trf_blocks_0"]["att"]["W_query"]["kernel"])
    with pytest.raises(AssertionError):
        _assert_stats("W_query", w_query, 0.0, 0.02)
    gpt2_params = init_params(STATS.replace(init="gpt2"), jax.random.key(0))
    fc2 = np.asarray(gpt2_params["trf_blocks_0"]["ff"]["fc2"]["kernel"])
    with pytest.raises(AssertionError):
        _assert_stats("fc2 unscaled", fc2, 0.0, 0.02)


# --------------------------------------------------------------------------- forward-pass behaviour


def test_sequence_longer_than_context_is_an_error_at_trace_time(tiny_params):
    ids = jnp.zeros((1, TINY.context_length + 1), jnp.int32)
    with pytest.raises(ValueError, match="context_length"):
        _logits(TINY, tiny_params, ids)
    with pytest.raises(ValueError, match="context_length"):
        jax.eval_shape(lambda p, i: _logits(TINY, p, i), tiny_params, ids)
    _logits(TINY, tiny_params, ids[:, :-1])  # exactly context_length is fine


def test_dropout_reproducible_per_key_and_inactive_when_deterministic(tiny_params):
    ids = IDS
    clean = _logits(TINY, tiny_params, ids, deterministic=True)

    def train(seed):
        return _logits(TINY, tiny_params, ids, deterministic=False, rngs={"dropout": jax.random.key(seed)})

    np.testing.assert_array_equal(train(1), train(1))
    assert not np.allclose(train(1), train(2))
    assert not np.allclose(train(1), clean)
    det = _logits(TINY, tiny_params, ids, deterministic=True, rngs={"dropout": jax.random.key(1)})
    np.testing.assert_array_equal(det, clean)
    with pytest.raises(flax.errors.InvalidRngError, match="dropout"):  # training mode needs a dropout key
        _logits(TINY, tiny_params, ids, deterministic=False)


def test_future_tokens_never_change_past_logits(tiny_params):
    ids = jnp.asarray(IDS)
    changed = ids.at[:, 6:].set((ids[:, 6:] + 1) % TINY.vocab_size)
    a, b = _logits(TINY, tiny_params, ids), _logits(TINY, tiny_params, changed)
    np.testing.assert_allclose(a[:, :6], b[:, :6], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, 6:], b[:, 6:])


def test_rows_are_independent(tiny_params):
    batch = _logits(TINY, tiny_params, IDS)
    np.testing.assert_allclose(batch[1:2], _logits(TINY, tiny_params, IDS[1:2]), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- layout, remat, dtype


def test_stack_unstack_round_trip(tiny_params):
    stacked = stack_layers(tiny_params, TINY.n_layers)
    assert "trf_blocks_0" not in stacked
    assert stacked["trf_blocks"]["att"]["W_query"]["kernel"].shape == (2, 32, 32)
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tiny_params)
    jax.tree.map(np.testing.assert_array_equal, back, tiny_params)


def test_scanned_init_has_the_stacked_shapes():
    scanned = param_shapes(TINY.replace(scan_layers=True))
    stacked = jax.eval_shape(lambda p: stack_layers(p, TINY.n_layers), param_shapes(TINY))
    assert jax.tree.map(lambda s: s.shape, scanned) == jax.tree.map(lambda s: s.shape, stacked)


def test_convert_layout(tiny_params):
    scan_cfg = TINY.replace(scan_layers=True)
    stacked = convert_layout(tiny_params, scan_cfg)
    assert "trf_blocks" in stacked
    assert convert_layout(stacked, scan_cfg) is stacked
    assert convert_layout(tiny_params, TINY) is tiny_params
    jax.tree.map(np.testing.assert_array_equal, convert_layout(stacked, TINY), tiny_params)


def test_scan_layers_gives_the_same_logits(tiny_params):
    ids = IDS
    scan_cfg = TINY.replace(scan_layers=True)
    scanned = _logits(scan_cfg, stack_layers(tiny_params, TINY.n_layers), ids)
    np.testing.assert_allclose(scanned, _logits(TINY, tiny_params, ids), rtol=1e-6, atol=1e-6)


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
def test_remat_gives_identical_gradients(tiny_params, remat, scan):
    # Dropout on (TINY has drop_rate 0.1): remat must also replay the same dropout masks. An "rbg" key
    # compiles faster on CPU than the default threefry; the equivalence does not depend on the generator.
    ids, targets, key = IDS, _ids(2, IDS.shape), jax.random.key(3, impl="rbg")
    params = stack_layers(tiny_params, TINY.n_layers) if scan else tiny_params
    base = TINY.replace(scan_layers=scan)
    loss0, g0 = _loss_grads(base, params, ids, targets, key)
    loss1, g1 = _loss_grads(base.replace(remat=remat), params, ids, targets, key)
    np.testing.assert_allclose(loss1, loss0, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), g1, g0)


def test_bfloat16_compute(tiny_params):
    cfg = TINY.replace(dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    jax.tree.map(np.testing.assert_array_equal, params, tiny_params)  # same init, only compute differs
    ids = IDS
    low = _logits(cfg, params, ids)
    high = _logits(TINY, tiny_params, ids)
    assert low.dtype == jnp.float32 and low.shape == high.shape
    assert not np.array_equal(low, high)  # really computed in bfloat16
    scale = float(jnp.abs(high).max())
    np.testing.assert_allclose(low, high, atol=0.03 * scale, rtol=0)
    np.testing.assert_array_equal(jnp.argmax(low[:, -1], -1), jnp.argmax(high[:, -1], -1))


def test_dot_product_attention_equals_xla(tiny_params):
    ids = IDS
    cfg = TINY.replace(attention="dot_product")
    fused, xla = _logits(cfg, tiny_params, ids), _logits(TINY, tiny_params, ids)
    np.testing.assert_allclose(fused, xla, rtol=1e-5, atol=1e-5)


def test_dot_product_with_training_dropout_raises(tiny_params):
    cfg = TINY.replace(attention="dot_product")
    ids = _ids(1, (1, 4))
    with pytest.raises(ValueError, match="dot_product.*dropout|dropout.*dot_product"):
        _logits(cfg, tiny_params, ids, deterministic=False, rngs={"dropout": jax.random.key(0)})
    no_drop = cfg.replace(drop_rate=0.0)
    _logits(no_drop, tiny_params, ids, deterministic=False, rngs={"dropout": jax.random.key(0)})


# --------------------------------------------------------------------------- KV cache


def test_init_cache_shapes():
    cache = init_cache(TINY, batch_size=3, length=10)  # unrolled: one array per layer
    assert len(cache.k) == len(cache.v) == 2
    assert all(k.shape == (3, 4, 8, 10) for k in cache.k)  # (B, H, D, S)
    assert all(v.shape == (3, 4, 10, 8) for v in cache.v)  # (B, H, S, D)
    assert cache.k[0].dtype == jnp.float32 and cache.length == 10
    assert int(cache.index) == 0 and cache.offset.tolist() == [0, 0, 0]
    scanned = init_cache(TINY.replace(scan_layers=True), batch_size=3, length=10)  # stacked
    assert scanned.k.shape == (2, 3, 4, 8, 10) and scanned.v.shape == (2, 3, 4, 10, 8)
    assert scanned.length == 10
    assert init_cache(TINY.replace(dtype="bfloat16"), 1, 4).k[0].dtype == jnp.bfloat16
    assert init_cache(TINY, 2, 4, offset=[0, 3]).offset.tolist() == [0, 3]


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
def test_cached_decode_equals_full_forward(tiny_params, overrides):
    cfg = TINY.replace(**overrides)
    params = convert_layout(tiny_params, cfg)
    ids = IDS
    full = _logits(TINY, tiny_params, ids)
    np.testing.assert_allclose(_cached_logits(cfg, params, ids, prefill=6), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["xla", "dot_product"])
def test_left_padded_row_equals_the_row_alone(tiny_params, attention):
    cfg = TINY.replace(attention=attention)
    pad = 3
    short_row = IDS[1:, pad:]  # (1, 7)
    batch = IDS.copy()
    batch[1, :pad] = 0  # row 1 is a 7-token prompt left-padded to 10
    cached = _cached_logits(cfg, tiny_params, batch, prefill=6, offset=[0, pad])
    # Row 0 (offset 0) equals its full forward; row 1's real positions equal row 1 run alone.
    np.testing.assert_allclose(cached[0], _logits(TINY, tiny_params, IDS)[0], rtol=1e-5, atol=1e-5)
    alone = _logits(TINY, tiny_params, short_row)[0]  # (T - pad, V)
    np.testing.assert_allclose(cached[1, pad:], alone, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(cached))


def test_cache_layout_must_match_scan_layers(tiny_params):
    ids = jnp.zeros((1, 2), jnp.int32)
    with pytest.raises(ValueError, match="scan_layers=False"):
        GPTModel(TINY).apply(
            {"params": tiny_params}, ids, cache=init_cache(TINY.replace(scan_layers=True), 1, 8)
        )


def test_cache_rejects_overflowing_context(tiny_params):
    params = tiny_params
    with pytest.raises(ValueError, match="context_length"):
        GPTModel(TINY).apply(
            {"params": params},
            jnp.zeros((1, TINY.context_length + 1), jnp.int32),
            cache=init_cache(TINY, 1, 32),
        )


# --------------------------------------------------------------------------- token ids and generation


def test_check_token_ids():
    out = check_token_ids([[1, 2, 3]], vocab_size=4)
    assert out.dtype == np.int32 and out.tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="4.*outside.*\\[0, 4\\)"):
        check_token_ids([[1, 4]], vocab_size=4)
    with pytest.raises(ValueError, match="-1"):
        check_token_ids([[-1, 2]], vocab_size=4)
    with pytest.raises(ValueError, match="integers"):
        check_token_ids([[1.5]], vocab_size=4)


def test_forward_validates_and_matches_apply(tiny_params):
    model = GPTModel(TINY)
    ids = IDS
    np.testing.assert_allclose(forward(model, tiny_params, ids), _logits(TINY, tiny_params, ids), atol=1e-6)
    with pytest.raises(ValueError, match=str(TINY.vocab_size)):
        forward(model, tiny_params, [[0, TINY.vocab_size]])
    with pytest.raises(ValueError, match="shape"):
        forward(model, tiny_params, [1, 2, 3])


def _assert_book_greedy(cfg, params, out, prompt_len: int, context_size: int) -> None:
    """Each generated token is the argmax of the model's last logits on the window before it, where the
    window is the last ``context_size`` tokens (the book's loop). All windows go through one batched
    forward, so the check compiles once instead of once per length."""
    out = np.asarray(out)
    steps = range(prompt_len, out.shape[1])
    if prompt_len >= context_size:  # every window is cropped to exactly context_size
        windows = np.concatenate([out[:, t - context_size : t] for t in steps])  # (steps * B, ctx)
        last = _logits(cfg, params, windows)[:, -1]  # (steps * B, V)
        expected = np.asarray(jnp.argmax(last, -1)).reshape(len(steps), -1).T  # (B, steps)
    else:  # no cropping: causality makes each window's last logits a row of one forward
        assert out.shape[1] - 1 <= context_size
        logits = _logits(cfg, params, out[:, :-1])  # (B, T - 1, V)
        expected = np.asarray(jnp.argmax(logits[:, prompt_len - 1 :], -1))  # (B, steps)
    np.testing.assert_array_equal(out[:, prompt_len:], expected)


def test_generate_text_simple_is_the_books_greedy_loop(tiny_params):
    # Windows of 4..9 tokens are right-padded to buckets of 8 and 16: padding must not leak.
    model = GPTModel(TINY)
    idx = IDS[:, :4]
    out = generate_text_simple(model, tiny_params, idx, max_new_tokens=6, context_size=16)
    assert out.shape == (2, 10) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :4], idx)
    _assert_book_greedy(TINY, tiny_params, out, prompt_len=4, context_size=16)


@pytest.mark.parametrize("prompt_len, context_size", [(6, 5), (18, TINY.context_length)])
def test_generate_text_simple_crops_to_context_size(tiny_params, prompt_len, context_size):
    model = GPTModel(TINY)
    idx = np.concatenate([IDS, IDS], axis=1)[:, :prompt_len]  # (2, prompt_len)
    out = generate_text_simple(model, tiny_params, idx, max_new_tokens=8, context_size=context_size)
    assert out.shape == (2, prompt_len + 8)
    _assert_book_greedy(TINY, tiny_params, out, prompt_len, context_size)


def test_generate_text_simple_validates_inputs(tiny_params):
    model = GPTModel(TINY)
    ok = [[1, 2, 3]]
    np.testing.assert_array_equal(generate_text_simple(model, tiny_params, ok, 0, 8), ok)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_text_simple(model, tiny_params, [[1, TINY.vocab_size]], 2, 8)
    with pytest.raises(ValueError, match="-3"):
        generate_text_simple(model, tiny_params, [[-3, 1]], 2, 8)
    with pytest.raises(ValueError, match="context_size"):
        generate_text_simple(model, tiny_params, ok, 2, TINY.context_length + 1)
    with pytest.raises(ValueError, match="context_size"):
        generate_text_simple(model, tiny_params, ok, 2, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text_simple(model, tiny_params, ok, -1, 8)
    with pytest.raises(ValueError, match="shape"):
        generate_text_simple(model, tiny_params, [1, 2, 3], 2, 8)


def test_init_gpt2_small_needs_at_most_one_extra_copy_of_params():
    """Initialising gpt2-small is one compiled program whose scratch space stays below the size of the
    parameters themselves (the PRNG draws big tables in row blocks)."""
    from flaxgpt.nn.params import _init, param_bytes, param_shapes

    cfg = GPTConfig.preset("gpt2-small")
    compiled = _init.lower(cfg, jax.random.key(0)).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
        pytest.skip("this backend reports no memory analysis")
    assert analysis.temp_size_in_bytes <= param_bytes(param_shapes(cfg))
