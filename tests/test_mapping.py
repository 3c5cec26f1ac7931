"""flaxgpt.io.mapping: the TensorSpec table machinery (import/export, name and shape checks)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

from flaxgpt.io.mapping import TensorSpec, check_names, check_params, export_tensors, import_tensors
from flaxgpt.nn.params import param_shapes
from flaxgpt.pytree import flat_dict

NONE = re.compile(r"^$")


def _table(cfg) -> list[TensorSpec]:
    """A made-up format: fused q|k|v per layer, transposed heads, everything else copied."""
    c, v = cfg.emb_dim, cfg.vocab_size
    qkv = tuple(("att", n, "kernel") for n in ("W_query", "W_key", "W_value"))
    table = [
        TensorSpec("emb", (v, c), (("tok_emb", "embedding"),)),
        TensorSpec("pos", (cfg.context_length, c), (("pos_emb", "embedding"),)),
        TensorSpec("head", (v, c), (("out_head", "kernel"),), None, "T"),
        TensorSpec("norm.s", (c,), (("final_norm", "scale"),)),
        TensorSpec("norm.b", (c,), (("final_norm", "shift"),)),
    ]
    blocks = param_shapes(cfg.replace(scan_layers=False))  # the table's shapes are per layer
    for i in range(cfg.n_layers):
        table.append(TensorSpec(f"{i}.qkv", (c, 3 * c), qkv, i, "split3"))
        for path, leaf in flat_dict(blocks[f"trf_blocks_{i}"]).items():
            if not path.startswith(("att/W_query", "att/W_key", "att/W_value")):
                table.append(TensorSpec(f"{i}.{path}", tuple(leaf.shape), (tuple(path.split("/")),), i))
    return table


def _random(cfg, seed=0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), param_shapes(cfg))


@pytest.mark.parametrize("scan", [False, True])
def test_export_then_import_is_the_identity(tiny_config, scan):
    cfg = tiny_config(tie_embeddings=False, scan_layers=scan)
    params = _random(cfg)
    out = {t.name: t.read() for t in export_tensors(_table(cfg), params, cfg, write_tied=True)}
    c = cfg.emb_dim
    q = params["trf_blocks"]["att"]["W_value"]["kernel"][1] if scan else params["trf_blocks_1"]["att"]["W_value"]["kernel"]
    np.testing.assert_array_equal(out["1.qkv"][:, 2 * c :], q)  # value is the last third
    np.testing.assert_array_equal(out["head"], np.asarray(params["out_head"]["kernel"]).T)
    shapes = {k: v.shape for k, v in out.items()}
    back = import_tensors(_table(cfg), out.__getitem__, shapes, NONE, cfg, "test")
    fa, fb = flat_dict(back), flat_dict(params)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def test_check_names_lists_every_problem(tiny_config):
    cfg = tiny_config(tie_embeddings=False)
    table = _table(cfg)
    found = {t.name: t.shape for t in table}
    del found["pos"], found["1.ff/fc1/bias"]
    found["emb"] = (5, 5)
    found["stray"] = (2,)
    found["buffer.mask"] = (3, 3)
    with pytest.raises(ValueError) as info:
        check_names(found, table, re.compile(r"^buffer\."), cfg, "my file")
    msg = str(info.value)
    assert msg.startswith("my file does not match the config (n_layers=2, emb_dim=32")
    assert "tensor 'emb' has shape (5, 5), expected (96, 32)" in msg
    assert "missing tensor 'pos' (expected shape (16, 32))" in msg
    assert "missing tensor '1.ff/fc1/bias' (expected shape (128,))" in msg
    assert "unexpected tensor 'stray' with shape (2,)" in msg and "buffer" not in msg


def test_check_params_names_leaves(tiny_config):
    cfg = tiny_config(tie_embeddings=False)
    params = _random(cfg)
    check_params(params, cfg)
    del params["out_head"]
    params["trf_blocks_0"]["norm1"]["scale"] = np.ones(3, np.float32)
    params["extra"] = {"w": np.ones(1)}
    with pytest.raises(ValueError) as info:
        check_params(params, cfg)
    msg = str(info.value)
    assert "missing 'out_head/kernel' (expected shape (32, 96))" in msg
    assert "'trf_blocks_0/norm1/scale' has shape (3,), expected (32,)" in msg
    assert "unexpected 'extra/w' with shape (1,)" in msg
    with pytest.raises(ValueError, match="nested dict of arrays, got list"):
        check_params([1], cfg)


def test_import_refuses_non_float_and_non_finite(tiny_config):
    cfg = tiny_config(tie_embeddings=False)
    out = {t.name: t.read() for t in export_tensors(_table(cfg), _random(cfg), cfg, write_tied=True)}
    shapes = {k: v.shape for k, v in out.items()}
    bad = dict(out, pos=np.zeros(shapes["pos"], np.int32))
    with pytest.raises(ValueError, match="f: tensor 'pos' has dtype int32, expected a float dtype"):
        import_tensors(_table(cfg), bad.__getitem__, shapes, NONE, cfg, "f")
    nan = dict(out, **{"0.qkv": np.full(shapes["0.qkv"], np.nan, np.float32)})
    with pytest.raises(ValueError, match=rf"f: tensor '0.qkv' holds {3 * 32 * 32} non-finite values"):
        import_tensors(_table(cfg), nan.__getitem__, shapes, NONE, cfg, "f")
    got = import_tensors(_table(cfg), nan.__getitem__, shapes, NONE, cfg, "f", allow_non_finite=True)
    assert np.isnan(got["trf_blocks_0"]["att"]["W_key"]["kernel"]).all()
