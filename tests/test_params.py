"""flaxgpt.nn.params: the parameter tree's names and shapes, counts and bytes (full sizes via eval_shape),
init_params against PyTorch's defaults and GPT-2's scheme, and the unrolled <-> scanned layouts."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.config import GPT_CONFIG_124M, GPTConfig
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import (
    convert_layout,
    count_params,
    init_params,
    param_bytes,
    param_shapes,
    stack_layers,
    unstack_layers,
)

# --------------------------------------------------------------------------- names and shapes


def test_model_init_entry_point_matches_init_params(tiny, ids):
    # model.init(key, ids) is the book-style entry point; any ids shape gives init_params' values.
    variables = jax.jit(GPTModel(tiny).init)(jax.random.key(0), jnp.asarray(ids))
    params = init_params(tiny, jax.random.key(0))
    assert set(variables) == {"params"}
    assert jax.tree.structure(variables["params"]) == jax.tree.structure(params)
    jax.tree.map(np.testing.assert_array_equal, variables["params"], params)


def test_param_tree_names_and_shapes(tiny, tiny_params):
    shapes = jax.tree.map(jnp.shape, tiny_params)
    c, v, ctx = tiny.emb_dim, tiny.vocab_size, tiny.context_length
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


def test_qkv_bias_adds_biases(tiny):
    params = param_shapes(tiny.replace(qkv_bias=True))
    for name in ("W_query", "W_key", "W_value"):
        assert params["trf_blocks_0"]["att"][name]["bias"].shape == (tiny.emb_dim,)


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


def test_count_params_on_arrays_and_bytes_follow_dtype(tiny, tiny_params):
    n = count_params(tiny_params)
    assert n == count_params(param_shapes(tiny))
    assert n == sum(x.size for x in jax.tree.leaves(tiny_params))
    assert param_bytes(tiny_params) == 4 * n
    assert param_bytes(param_shapes(tiny.replace(param_dtype="bfloat16"))) == 2 * n


def test_book_124m_count_by_hand():
    c, v, ctx, layers = 768, 50257, 1024, 12
    block = 3 * c * c + (c * c + c) + (c * 4 * c + 4 * c) + (4 * c * c + c) + 4 * c
    expected = v * c + ctx * c + layers * block + 2 * c + c * v
    assert count_params(param_shapes(GPT_CONFIG_124M)) == expected == 163_009_536


# --------------------------------------------------------------------------- initialisation


def test_init_params_is_one_jitted_program_and_traceable_at_full_size(tiny):
    cfg = tiny
    jaxpr = jax.make_jaxpr(functools.partial(init_params, cfg))(jax.random.key(0))
    assert [e.primitive.name for e in jaxpr.eqns] in (["jit"], ["pjit"])  # one compiled program
    full = jax.eval_shape(functools.partial(init_params, GPTConfig.preset("gpt2-small")), jax.random.key(0))
    assert count_params(full) == 163_009_536


def test_init_params_reproducible_per_key(tiny):
    a = init_params(tiny, jax.random.key(5))
    b = init_params(tiny, jax.random.key(5))
    c = init_params(tiny, jax.random.key(6))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["tok_emb"]["embedding"], c["tok_emb"]["embedding"])


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


# --------------------------------------------------------------------------- layouts


def test_stack_unstack_round_trip(tiny, tiny_params):
    stacked = stack_layers(tiny_params, tiny.n_layers)
    assert "trf_blocks_0" not in stacked
    assert stacked["trf_blocks"]["att"]["W_query"]["kernel"].shape == (2, 32, 32)
    back = unstack_layers(stacked)
    assert jax.tree.structure(back) == jax.tree.structure(tiny_params)
    jax.tree.map(np.testing.assert_array_equal, back, tiny_params)


def test_scanned_init_has_the_stacked_shapes(tiny):
    scanned = param_shapes(tiny.replace(scan_layers=True))
    stacked = jax.eval_shape(lambda p: stack_layers(p, tiny.n_layers), param_shapes(tiny))
    assert jax.tree.map(lambda s: s.shape, scanned) == jax.tree.map(lambda s: s.shape, stacked)


def test_convert_layout(tiny, tiny_params):
    scan_cfg = tiny.replace(scan_layers=True)
    stacked = convert_layout(tiny_params, scan_cfg)
    assert "trf_blocks" in stacked
    assert convert_layout(stacked, scan_cfg) is stacked
    assert convert_layout(tiny_params, tiny) is tiny_params
    jax.tree.map(np.testing.assert_array_equal, convert_layout(stacked, tiny), tiny_params)


def test_a_seed_gives_the_same_weights_in_both_layouts(tiny_config):
    cfg = tiny_config(qkv_bias=True)
    unrolled = init_params(cfg, jax.random.key(3))
    scanned = init_params(cfg.replace(scan_layers=True), jax.random.key(3))
    assert "trf_blocks" in scanned and "trf_blocks_0" not in scanned
    want = stack_layers(unrolled, cfg.n_layers)
    for a, b in zip(jax.tree.leaves(scanned), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)
    other = init_params(cfg.replace(scan_layers=True), jax.random.key(4))
    assert not np.array_equal(other["tok_emb"]["embedding"], scanned["tok_emb"]["embedding"])
