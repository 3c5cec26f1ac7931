"""int8 weight-only inference (flaxgpt.nn.quant): the quantiser's error bound, the int8 products against
the float model on the dequantised weights, and generation on int8 weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.generation.decode import generate
from flaxgpt.nn.matmul import int8_matmul
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params, stack_layers
from flaxgpt.nn.quant import Int8Params, int8_apply, quantize_int8, quantize_matrix


def test_quantize_matrix_error_is_at_most_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, 20)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero output channel
    qm = quantize_matrix(w)
    q, scale = np.asarray(qm["q"]), np.asarray(qm["scale"])
    assert q.dtype == np.int8 and q.shape == (20, 48) and scale.shape == (20,)
    assert np.abs(q).max() == 127 and np.all(q[3] == 0)
    back = (q.astype(np.float32) * scale[:, None]).T  # (in, out)
    assert np.all(np.abs(back - w) <= scale / 2 + 1e-7)


@pytest.mark.parametrize("rows", [(1,), (1, 1), (3, 5)], ids=["vector", "decode", "prompt"])
def test_int8_matmul_is_the_product_with_the_dequantised_kernel(rows):
    rng = np.random.default_rng(1)
    qm = quantize_matrix(rng.standard_normal((32, 12)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((*rows, 32)), jnp.float32)
    w = (qm["q"].astype(jnp.float32) * qm["scale"][:, None]).T  # (in, out)
    np.testing.assert_allclose(int8_matmul(x, qm["q"], qm["scale"]), x @ w, rtol=1e-5, atol=1e-5)


def _dequantised(q: Int8Params) -> dict:
    """Float params with each quantised kernel replaced by its dequantised value (the tied head aside)."""

    def walk(f, i):
        out = dict(f)
        for k, v in i.items():
            if k == "tied_head":
                continue
            if "q" in v:
                out[k] = {**out.get(k, {}), "kernel": (v["q"].astype(jnp.float32) * v["scale"][:, None]).T}
            else:
                out[k] = walk(out.get(k, {}), v)
        return out

    return walk(q.params, q.int8)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_int8_apply_runs_the_dequantised_model(tiny_config, tied):
    cfg = tiny_config(qkv_bias=True, tie_embeddings=tied)
    model, params = GPTModel(cfg), init_params(cfg, jax.random.key(0))
    q = quantize_int8(params, cfg)
    assert "kernel" not in q.params["trf_blocks_0"]["ff"]["fc1"]  # the float kernels are gone
    idx = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 7)), jnp.int32)
    deq = _dequantised(q)
    if tied:
        hidden = model.apply({"params": deq}, idx, return_hidden=True)  # (B, T, C)
        head = q.int8["tied_head"]
        want = hidden @ (head["q"].astype(jnp.float32) * head["scale"][:, None]).T  # (B, T, V)
    else:
        want = model.apply({"params": deq}, idx)
    got = int8_apply(model, q, idx)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    f32 = model.apply({"params": params}, idx)
    err = float(jnp.max(jnp.abs(got - f32)))
    assert 0 < err < 0.05 * float(jnp.max(jnp.abs(f32)))  # quantisation moves the logits, a little


def test_generate_on_int8_weights_decodes_like_the_dequantised_model(tiny_config):
    cfg = tiny_config(qkv_bias=True, tie_embeddings=False)
    model, params = GPTModel(cfg), init_params(cfg, jax.random.key(0))
    q = quantize_int8(params, cfg)
    prompt = np.asarray([3, 1, 4, 1, 5], np.int32)
    got = np.asarray(generate(model, q, prompt, max_new_tokens=10))
    want = np.asarray(generate(model, _dequantised(q), prompt, max_new_tokens=10))
    np.testing.assert_array_equal(got, want)
    # a scanned model quantises to the unrolled layout, and generate runs it
    scan_cfg = cfg.replace(scan_layers=True)
    q_scan = quantize_int8(stack_layers(params, cfg.n_layers), scan_cfg)
    got_scan = np.asarray(generate(GPTModel(scan_cfg), q_scan, prompt, max_new_tokens=10))
    np.testing.assert_array_equal(got_scan, want)


def test_int8_bytes_and_errors(tiny_config):
    cfg = tiny_config(qkv_bias=True, tie_embeddings=False)
    params = init_params(cfg, jax.random.key(0))
    q = quantize_int8(params, cfg)
    kernel = params["trf_blocks_0"]["ff"]["fc1"]["kernel"]
    assert q.int8["trf_blocks_0"]["ff"]["fc1"]["q"].nbytes * 4 == kernel.nbytes
    assert q.nbytes() < sum(x.nbytes for x in jax.tree.leaves(params)) / 2
    with pytest.raises(TypeError, match="quantize_int8"):
        int8_apply(GPTModel(cfg), params, jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="unrolled layout"):
        int8_apply(GPTModel(cfg.replace(scan_layers=True)), q, jnp.zeros((1, 2), jnp.int32))
