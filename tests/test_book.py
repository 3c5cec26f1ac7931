"""The book's PyTorch GPTModel state-dict names <-> flaxgpt params (flaxgpt.io.book; numpy only)."""

from __future__ import annotations

import numpy as np
import pytest
from _weights import assert_same_params, random_params

from flaxgpt.io.book import book_config, book_tensors, params_from_book, params_to_book

# --------------------------------------------------------------------------- the book's names


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_book_round_trip_and_layout(qkv_bias, tiny_config):
    cfg = tiny_config(qkv_bias=qkv_bias)
    params = random_params(cfg)
    sd = params_to_book(params, cfg)
    att = params["trf_blocks_1"]["att"]
    np.testing.assert_array_equal(
        sd["trf_blocks.1.att.W_value.weight"], np.asarray(att["W_value"]["kernel"]).T
    )
    assert sd["trf_blocks.0.ff.layers.0.weight"].shape == (128, 32)  # torch Linear: (out, in)
    assert ("trf_blocks.0.att.W_query.bias" in sd) == qkv_bias
    np.testing.assert_array_equal(sd["trf_blocks.1.att.mask"], np.triu(np.ones((16, 16)), k=1))
    assert_same_params(params_from_book(sd, cfg), params)
    inferred = book_config({k: v.shape for k, v in sd.items()}, n_heads=4, drop_rate=0.0)
    assert inferred == cfg


def test_book_tied_head_is_written_and_checked(tiny_config):
    cfg = tiny_config(tie_embeddings=True)
    params = random_params(cfg)
    sd = params_to_book(params, cfg, masks=False)
    np.testing.assert_array_equal(sd["out_head.weight"], sd["tok_emb.weight"])
    assert not any(k.endswith("att.mask") for k in sd)
    assert_same_params(params_from_book(sd, cfg), params)
    sd["out_head.weight"] = sd["out_head.weight"] + 1
    with pytest.raises(ValueError, match="'out_head.weight' differs from 'tok_emb.weight'"):
        params_from_book(sd, cfg)
    untied = params_from_book(sd, cfg.replace(tie_embeddings=False))
    np.testing.assert_array_equal(untied["out_head"]["kernel"], sd["out_head.weight"].T)


def test_book_config_needs_heads_unless_a_preset_width():
    shapes = {
        "tok_emb.weight": (50257, 768),
        "pos_emb.weight": (1024, 768),
        "trf_blocks.11.norm1.scale": (768,),
    }
    cfg = book_config(shapes)
    assert (cfg.n_heads, cfg.n_layers, cfg.qkv_bias, cfg.tie_embeddings) == (12, 12, False, False)
    with pytest.raises(ValueError, match=r"cannot infer n_heads for emb_dim=16.*--n-heads"):
        book_config({"tok_emb.weight": (5, 16), "pos_emb.weight": (4, 16), "trf_blocks.0.norm1.scale": (16,)})
    with pytest.raises(ValueError, match="no 2-D tensor 'tok_emb.weight'"):
        book_config({"wte.weight": (5, 16)})


def test_book_errors_name_the_tensor(tiny_config):
    cfg = tiny_config()
    sd = params_to_book(random_params(cfg), cfg)
    sd["trf_blocks.0.att.W_query.weight"] = np.zeros((32, 8), np.float32)
    with pytest.raises(
        ValueError, match=r"'trf_blocks.0.att.W_query.weight' has shape \(32, 8\), expected \(32, 32\)"
    ):
        params_from_book(sd, cfg)


def test_book_non_finite_tensor_is_refused(tiny_config):
    cfg = tiny_config()
    sd = params_to_book(random_params(cfg), cfg)
    sd["final_norm.shift"] = np.full_like(sd["final_norm.shift"], -np.inf)
    with pytest.raises(ValueError, match=rf"'final_norm.shift' holds {cfg.emb_dim} non-finite values"):
        params_from_book(sd, cfg)
    assert np.isneginf(params_from_book(sd, cfg, allow_non_finite=True)["final_norm"]["shift"]).all()


def test_book_tensors_stream_what_params_to_book_returns(tiny_config):
    cfg = tiny_config(qkv_bias=True)
    params = random_params(cfg)
    streamed = {t.name: t for t in book_tensors(params, cfg)}
    eager = params_to_book(params, cfg)
    assert streamed.keys() == eager.keys()
    for name, t in streamed.items():
        arr = t.read()
        assert (tuple(t.shape), t.dtype) == (arr.shape, arr.dtype), name
        np.testing.assert_array_equal(arr, eager[name], err_msg=name)
