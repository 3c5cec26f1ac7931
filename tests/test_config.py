"""GPTConfig: validation on construction, presets, round trips."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import pytest

from flaxgpt.config import GPT_CONFIG_124M, PRESETS, GPTConfig


def test_book_config_values():
    cfg = GPT_CONFIG_124M
    assert (cfg.vocab_size, cfg.context_length, cfg.emb_dim, cfg.n_heads, cfg.n_layers) == (
        50257,
        1024,
        768,
        12,
        12,
    )
    assert cfg.drop_rate == 0.1 and cfg.qkv_bias is False
    assert cfg.head_dim == 64
    assert cfg.init == "torch" and cfg.ln_eps == 1e-5 and cfg.tie_embeddings is False


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        GPT_CONFIG_124M.emb_dim = 10  # type: ignore[misc]


def test_hashable_and_equal_by_value():
    # init_params jits with the config as a static argument: it must hash by value.
    a = GPTConfig(emb_dim=64, n_heads=4)
    b = GPTConfig(emb_dim=64, n_heads=4)
    assert a == b and hash(a) == hash(b)
    assert a != a.replace(n_layers=3)


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (dict(emb_dim=100, n_heads=12), "divisible by n_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(context_length=-1), "context_length"),
        (dict(emb_dim=0), "emb_dim"),
        (dict(n_heads=0), "n_heads"),
        (dict(n_layers=0), "n_layers"),
        (dict(n_layers=2.0), "n_layers"),
        (dict(n_layers=True), "n_layers"),
        (dict(drop_rate=1.0), "drop_rate"),
        (dict(drop_rate=-0.1), "drop_rate"),
        (dict(ln_eps=0.0), "ln_eps"),
        (dict(init="xavier"), "init"),
        (dict(remat="some"), "remat"),
        (dict(attention="flash"), "attention"),
        (dict(dtype="float64"), "dtype"),
        (dict(param_dtype="int8"), "param_dtype"),
    ],
)
def test_invalid_values_raise_clear_value_error(overrides, needle):
    with pytest.raises(ValueError, match=needle):
        GPTConfig(**overrides)


def test_error_names_the_bad_value():
    with pytest.raises(ValueError, match=r"100.*12"):
        GPTConfig(emb_dim=100, n_heads=12)
    with pytest.raises(ValueError, match=r"1\.5"):
        GPTConfig(drop_rate=1.5)


def test_drop_rate_zero_is_valid():
    assert GPTConfig(drop_rate=0.0).drop_rate == 0.0


def test_replace_validates():
    with pytest.raises(ValueError, match="divisible"):
        GPT_CONFIG_124M.replace(n_heads=5)
    assert GPT_CONFIG_124M.replace(context_length=256).context_length == 256


@pytest.mark.parametrize(
    "name, emb_dim, n_layers, n_heads",
    [
        ("gpt2-small", 768, 12, 12),
        ("gpt2-medium", 1024, 24, 16),
        ("gpt2-large", 1280, 36, 20),
        ("gpt2-xl", 1600, 48, 25),
    ],
)
def test_presets(name, emb_dim, n_layers, n_heads):
    cfg = GPTConfig.preset(name)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (emb_dim, n_layers, n_heads)
    assert cfg.vocab_size == 50257 and cfg.context_length == 1024
    assert PRESETS[name] == dict(emb_dim=emb_dim, n_layers=n_layers, n_heads=n_heads)


def test_preset_small_is_the_book_config():
    assert GPTConfig.preset("gpt2-small") == GPT_CONFIG_124M


def test_preset_aliases_and_overrides():
    assert GPTConfig.preset("124M") == GPTConfig.preset("gpt2-small")
    assert GPTConfig.preset("GPT2-XL") == GPTConfig.preset("1558M")
    cfg = GPTConfig.preset("gpt2-medium", context_length=256, drop_rate=0.0, qkv_bias=True)
    assert (cfg.emb_dim, cfg.context_length, cfg.drop_rate, cfg.qkv_bias) == (1024, 256, 0.0, True)


def test_preset_unknown_name():
    with pytest.raises(ValueError, match="gpt2-tiny"):
        GPTConfig.preset("gpt2-tiny")


def test_preset_override_validated():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig.preset("gpt2-small", n_heads=7)


def test_dict_round_trip():
    cfg = GPTConfig.preset("gpt2-large", tie_embeddings=True, init="gpt2", dtype="bfloat16")
    d = cfg.to_dict()
    assert d["emb_dim"] == 1280 and d["dtype"] == "bfloat16"
    assert GPTConfig.from_dict(d) == cfg


def test_from_dict_unknown_key():
    with pytest.raises(ValueError, match="n_embd"):
        GPTConfig.from_dict({"n_embd": 768})


def test_dtype_properties():
    cfg = GPTConfig(dtype="bfloat16")
    assert cfg.compute_dtype == jnp.bfloat16
    assert cfg.weight_dtype == jnp.float32


@pytest.mark.parametrize("bad", [124, 355.0, None, ("gpt2",)])
def test_preset_name_must_be_a_string(bad):
    # preset(124) used to fail with AttributeError: 'int' object has no attribute 'lower'
    with pytest.raises(ValueError, match=rf"preset name must be a str, got {re.escape(repr(bad))}.*gpt2-small.*124M"):
        GPTConfig.preset(bad)


def test_dtypes_come_from_the_one_dtype_table():
    from flaxgpt.dtypes import COMPUTE_DTYPES

    for name, dtype in COMPUTE_DTYPES.items():
        cfg = GPTConfig(dtype=name, param_dtype=name)
        assert cfg.compute_dtype == dtype and cfg.weight_dtype == dtype
