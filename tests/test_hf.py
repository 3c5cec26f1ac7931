"""Hugging Face GPT-2 names and configs <-> flaxgpt params (flaxgpt.io.hf; numpy only, no files)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from _weights import assert_same_params, random_params

from flaxgpt.config import GPTConfig
from flaxgpt.io.hf import config_from_hf, config_to_hf, hf_tensors, params_from_hf, params_to_hf
from flaxgpt.io.mapping import check_params
from flaxgpt.nn.params import count_params, param_shapes

# --------------------------------------------------------------------------- Hugging Face names


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("qkv_bias", [True, False])
def test_hf_round_trip_and_names(tie, qkv_bias, tiny_config):
    cfg = tiny_config(qkv_bias=qkv_bias, tie_embeddings=tie)
    params = random_params(cfg)
    sd = params_to_hf(params, cfg)
    c = cfg.emb_dim
    assert sd["transformer.h.1.attn.c_attn.weight"].shape == (c, 3 * c)
    assert ("lm_head.weight" in sd) == (not tie)
    if not qkv_bias:  # GPT-2 always has the bias: written as zeros
        assert np.all(sd["transformer.h.0.attn.c_attn.bias"] == 0)
    # the fused q|k|v layout: query first, then key, then value, each (in, out)
    att = params["trf_blocks_1"]["att"]
    np.testing.assert_array_equal(
        sd["transformer.h.1.attn.c_attn.weight"][:, c : 2 * c], att["W_key"]["kernel"]
    )
    if not tie:
        np.testing.assert_array_equal(sd["lm_head.weight"], np.asarray(params["out_head"]["kernel"]).T)
    assert_same_params(params_from_hf(sd, cfg), params)


def test_hf_import_matches_the_model_tree_in_both_layouts(tiny_config):
    for scan in (False, True):
        cfg = tiny_config(qkv_bias=True, tie_embeddings=False, scan_layers=scan)
        sd = params_to_hf(random_params(cfg.replace(scan_layers=False)), cfg.replace(scan_layers=False))
        got = params_from_hf(sd, cfg)
        want = param_shapes(cfg)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert all(
            g.shape == w.shape for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
        )


def test_scanned_params_export_like_unrolled(tiny_config):
    cfg = tiny_config(qkv_bias=True)
    params = random_params(cfg)
    scanned = random_params(cfg.replace(scan_layers=True))  # a different tree, to check the layout is read
    from flaxgpt.nn.params import stack_layers, unstack_layers

    stacked = stack_layers(params, cfg.n_layers)
    a, b = params_to_hf(params, cfg), params_to_hf(stacked, cfg.replace(scan_layers=True))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert_same_params(params_from_hf(params_to_hf(scanned, cfg), cfg), unstack_layers(scanned))


def test_hub_layout_loads(tiny_config):
    """The published files: no prefix, (1, 1, ctx, ctx) causal-mask buffers named attn.bias, no lm_head."""
    cfg = tiny_config(qkv_bias=True, tie_embeddings=True)
    params = random_params(cfg)
    sd = params_to_hf(params, cfg, prefix=False)
    assert "wte.weight" in sd and "lm_head.weight" not in sd
    ctx = cfg.context_length
    for i in range(cfg.n_layers):
        sd[f"h.{i}.attn.bias"] = np.tril(np.ones((ctx, ctx), np.float32))[None, None]
        sd[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    assert_same_params(params_from_hf(sd, cfg), params)


def test_tied_lm_head_accepted_when_equal_and_refused_when_not(tiny_config):
    cfg = tiny_config(qkv_bias=True, tie_embeddings=True)
    params = random_params(cfg)
    sd = params_to_hf(params, cfg)
    sd["lm_head.weight"] = sd["transformer.wte.weight"].copy()
    assert_same_params(params_from_hf(sd, cfg), params)
    sd["lm_head.weight"][3, 2] += 1.0
    with pytest.raises(ValueError, match=r"'lm_head.weight' differs from 'wte.weight'.*tie_embeddings=False"):
        params_from_hf(sd, cfg)


def test_qkv_bias_must_be_zero_or_absent_without_qkv_bias(tiny_config):
    cfg = tiny_config(qkv_bias=False)
    params = random_params(cfg)
    sd = params_to_hf(params, cfg)
    assert_same_params(params_from_hf(sd, cfg), params)  # all-zero biases: accepted
    del sd["transformer.h.0.attn.c_attn.bias"]
    assert_same_params(params_from_hf(sd, cfg), params)  # absent: accepted
    sd["transformer.h.1.attn.c_attn.bias"] = np.full((3 * cfg.emb_dim,), 0.5, np.float32)
    with pytest.raises(ValueError, match=r"'h.1.attn.c_attn.bias' is non-zero.*qkv_bias=True"):
        params_from_hf(sd, cfg)


def test_hf_errors_name_the_tensor_and_shapes(tiny_config):
    cfg = tiny_config(qkv_bias=True)
    sd = params_to_hf(random_params(cfg), cfg)
    missing = dict(sd)
    del missing["transformer.h.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match=r"missing tensor 'h.1.mlp.c_fc.bias' \(expected shape \(128,\)\)"):
        params_from_hf(missing, cfg)
    extra = dict(sd, **{"transformer.h.2.ln_1.weight": np.ones(32, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected tensor 'h.2.ln_1.weight' with shape \(32,\)"):
        params_from_hf(extra, cfg)
    wrong = dict(sd, **{"transformer.wpe.weight": np.ones((17, 32), np.float32)})
    with pytest.raises(ValueError, match=r"'wpe.weight' has shape \(17, 32\), expected \(16, 32\)"):
        params_from_hf(wrong, cfg)
    ints = dict(sd, **{"transformer.ln_f.bias": np.ones(32, np.int64)})
    with pytest.raises(ValueError, match=r"'ln_f.bias' has dtype int64"):
        params_from_hf(ints, cfg)
    twice = dict(sd, **{"wte.weight": sd["transformer.wte.weight"]})
    with pytest.raises(ValueError, match="appears twice"):
        params_from_hf(twice, cfg)


def test_bfloat16_params_export_as_bfloat16_and_import_casts(tiny_config):
    cfg = tiny_config(qkv_bias=False, param_dtype="bfloat16")
    params = random_params(cfg)
    sd = params_to_hf(params, cfg)
    assert {a.dtype.name for a in sd.values()} == {"bfloat16"}
    back = params_from_hf(sd, cfg)
    assert {x.dtype.name for x in jax.tree.leaves(back)} == {"bfloat16"}
    assert_same_params(back, params)
    as_f32 = params_from_hf(sd, cfg.replace(param_dtype="float32"))
    assert {x.dtype.name for x in jax.tree.leaves(as_f32)} == {"float32"}


def test_export_checks_the_params_against_the_config(tiny_config):
    cfg = tiny_config()
    params = random_params(cfg)
    params["trf_blocks_0"]["ff"]["fc1"]["kernel"] = np.zeros((32, 64), np.float32)
    with pytest.raises(
        ValueError, match=r"'trf_blocks_0/ff/fc1/kernel' has shape \(32, 64\), expected \(32, 128\)"
    ):
        params_to_hf(params, cfg)
    with pytest.raises(ValueError, match="missing 'out_head/kernel'"):
        check_params(random_params(cfg.replace(tie_embeddings=True)), cfg)


def test_full_size_gpt2_mapping_by_shapes():
    """The 124M model's published tensors, checked without allocating: 148 tensors, 124,439,808 weights."""
    cfg = GPTConfig.preset("gpt2", qkv_bias=True, tie_embeddings=True)
    tensors = hf_tensors(param_shapes(cfg), cfg, prefix=False)
    shapes = {t.name: t.shape for t in tensors}
    assert len(shapes) == 2 + 12 * 12 + 2
    assert shapes["h.11.attn.c_attn.weight"] == (768, 2304)
    assert shapes["h.0.mlp.c_proj.weight"] == (3072, 768)
    assert sum(int(np.prod(s)) for s in shapes.values()) == count_params(param_shapes(cfg)) == 124_439_808


# --------------------------------------------------------------------------- configs


def test_hf_config_round_trip(tiny_config):
    for cfg in (tiny_config(qkv_bias=True, tie_embeddings=True), tiny_config(qkv_bias=False)):
        back = config_from_hf(config_to_hf(cfg), init=cfg.init)
        assert back == cfg


def test_published_gpt2_config_maps_to_gpt2_settings():
    hf = {  # openai-community/gpt2's config.json (abridged)
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": 1024,
        "n_embd": 768,
        "n_head": 12,
        "n_layer": 12,
        "n_positions": 1024,
        "resid_pdrop": 0.1,
        "vocab_size": 50257,
    }
    cfg = config_from_hf(hf)
    assert cfg == GPTConfig.preset("gpt2", qkv_bias=True, tie_embeddings=True, init="gpt2")
    assert config_from_hf(hf, scan_layers=True).scan_layers


@pytest.mark.parametrize(
    "change, match",
    [
        ({"model_type": "llama"}, "model_type 'llama'"),
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"n_inner": 100}, "n_inner=100"),
        ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True"),
        ({"n_head": None}, "n_heads must be a positive int"),
    ],
)
def test_unsupported_hf_configs_are_refused(change, match, tiny_config):
    hf = dict(config_to_hf(tiny_config()), **change)
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


# --------------------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_non_finite_tensors_are_refused_naming_the_tensor(tiny_config, dtype):
    cfg = tiny_config(qkv_bias=True, param_dtype=dtype)
    sd = params_to_hf(random_params(cfg), cfg)
    bad = sd["transformer.h.1.mlp.c_fc.weight"].copy()
    bad[0, :2] = np.nan
    bad[3, 4] = np.inf
    sd["transformer.h.1.mlp.c_fc.weight"] = bad
    with pytest.raises(ValueError, match=r"'h.1.mlp.c_fc.weight' holds 3 non-finite values .*allow_non_finite=True"):
        params_from_hf(sd, cfg)
    got = params_from_hf(sd, cfg, allow_non_finite=True)  # the explicit opt-out keeps the values
    assert np.isnan(np.asarray(got["trf_blocks_1"]["ff"]["fc1"]["kernel"], np.float32)).sum() == 2
