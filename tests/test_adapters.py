"""Adapters alone on disk (flaxgpt.io.adapters): bit-exact round trips in both layouts, a folder holding only
the adapters, and clear errors for corrupt, tampered, missing or mismatched files and NaN adapters."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from flaxgpt.files import read_json, sha256_file, write_json
from flaxgpt.io.adapters import INFO_FILE, TENSORS_FILE, load_lora, read_lora_info, save_lora
from flaxgpt.nn.lora import LoRA, init_lora
from flaxgpt.nn.params import param_bytes, param_shapes
from flaxgpt.pytree import flat_dict


def random_lora(params, rank: int = 4, alpha: float = 6.0, targets="all", seed: int = 1, dtype=jnp.float32) -> LoRA:
    """Adapters with random non-zero B (a fresh B = 0 would hide a lost or swapped B)."""
    lora = jax.eval_shape(lambda k: init_lora(params, k, rank=rank, alpha=alpha, targets=targets, dropout=0.1,
                                              dtype=dtype), jax.random.key(seed))
    rng = np.random.default_rng(seed)
    adapters = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), lora.adapters)
    return LoRA(adapters, alpha=lora.alpha, dropout=lora.dropout)


@pytest.fixture(scope="module")
def base(tiny_config):
    cfg = tiny_config(qkv_bias=True, tie_embeddings=False)
    return cfg, param_shapes(cfg)


def assert_same_lora(a: LoRA, b: LoRA) -> None:
    fa, fb = flat_dict(a.adapters), flat_dict(b.adapters)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)
    assert (a.alpha, a.dropout, a.rank) == (b.alpha, b.dropout, b.rank)


@pytest.mark.parametrize("scan", [False, True])
def test_round_trip_is_bit_exact(tmp_path, tiny_config, scan):
    cfg = tiny_config(qkv_bias=True, tie_embeddings=False, scan_layers=scan)
    params = param_shapes(cfg)  # shapes are all the adapters and check_lora need
    lora = random_lora(params, targets=["W_query", "ff/fc2", "out_head"])
    out = save_lora(tmp_path / "ad", lora, targets=["W_query", "ff/fc2", "out_head"],
                    base={"config": cfg.to_dict(), "source": "tiny"})
    loaded = load_lora(out, params)
    assert_same_lora(loaded, lora)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(loaded.adapters))
    info = read_lora_info(out)
    assert (info["format"], info["version"], info["rank"], info["alpha"], info["dropout"]) == (
        "flaxgpt-lora", 1, 4, 6.0, 0.1)
    assert info["targets"] == ["W_query", "ff/fc2", "out_head"]
    assert info["base"] == {"config": cfg.to_dict(), "source": "tiny"}
    assert info["tensors"]["sha256"] == sha256_file(out / TENSORS_FILE)
    lead = [cfg.n_layers] if scan else []
    c, r = cfg.emb_dim, 4
    layers = {e["path"]: (e["A"], e["B"]) for e in info["layers"]}
    block = "trf_blocks" if scan else "trf_blocks_1"
    assert layers[f"{block}/ff/fc2"] == ([*lead, 4 * c, r], [*lead, r, c])
    assert layers["out_head"] == ([c, r], [r, cfg.vocab_size])
    assert info["n_params"] == sum(x.size for x in jax.tree.leaves(lora.adapters))


def test_bfloat16_adapters_keep_their_dtype(tmp_path, base):
    _, params = base
    lora = random_lora(params, dtype=jnp.bfloat16)
    assert_same_lora(load_lora(save_lora(tmp_path / "ad", lora), params), lora)


def test_folder_holds_only_the_adapters(tmp_path, base):
    _, params = base
    lora = random_lora(params, rank=2, targets="attention")
    out = save_lora(tmp_path / "ad", lora)
    assert sorted(p.name for p in out.iterdir()) == [TENSORS_FILE, INFO_FILE]  # no temporaries, no base
    with open(out / TENSORS_FILE, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    names = set(header) - {"__metadata__"}
    assert names == set(flat_dict(lora.adapters))
    assert "trf_blocks_0/att/W_query/A" in names and not any("kernel" in n or "emb" in n for n in names)
    size = (out / TENSORS_FILE).stat().st_size
    assert size < param_bytes(params) / 5
    assert size < 1.1 * sum(x.nbytes for x in jax.tree.leaves(lora.adapters)) + 4096


def test_save_refuses_nan_naming_the_tensor(tmp_path, base):
    _, params = base
    lora = random_lora(params)
    bad = jax.tree.map(lambda x: x, lora.adapters)
    bad["trf_blocks_1"]["ff"]["fc1"]["B"] = bad["trf_blocks_1"]["ff"]["fc1"]["B"].at[0, 3].set(jnp.nan)
    with pytest.raises(ValueError, match=r"'trf_blocks_1/ff/fc1/B' holds 1 non-finite value"):
        save_lora(tmp_path / "ad", LoRA(bad, alpha=lora.alpha))
    assert not (tmp_path / "ad" / INFO_FILE).exists()


def test_load_refuses_nan_in_the_file(tmp_path, base):
    _, params = base
    out = save_lora(tmp_path / "ad", random_lora(params, targets="out_head"))
    a = np.full((params["out_head"]["kernel"].shape[0], 4), np.inf, np.float32)
    b = np.zeros((4, params["out_head"]["kernel"].shape[1]), np.float32)
    save_file({"out_head/A": a, "out_head/B": b}, str(out / TENSORS_FILE))
    info = read_json(out / INFO_FILE)
    info["tensors"].update(sha256=sha256_file(out / TENSORS_FILE), bytes=(out / TENSORS_FILE).stat().st_size)
    write_json(out / INFO_FILE, info)
    with pytest.raises(ValueError, match=r"'out_head/A' holds \d+ non-finite"):
        load_lora(out)
    assert np.isinf(np.asarray(load_lora(out, allow_non_finite=True).layers["out_head"]["A"])).all()


def test_corrupt_and_missing_files(tmp_path, base):
    _, params = base
    out = save_lora(tmp_path / "ad", random_lora(params))
    data = bytearray((out / TENSORS_FILE).read_bytes())
    data[-5] ^= 0xFF  # one flipped byte in the last tensor's values
    (out / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{TENSORS_FILE} is corrupt or was replaced: its sha256 is [0-9a-f]{{64}}"):
        load_lora(out)
    (out / TENSORS_FILE).write_bytes(bytes(data[:-100]))
    with pytest.raises(ValueError, match=r"has \d+ bytes but lora.json records \d+ \(truncated"):
        load_lora(out)
    (out / TENSORS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{TENSORS_FILE} is missing"):
        load_lora(out)
    (out / INFO_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"lora.json is missing: .* is not a flaxgpt LoRA adapter folder"):
        load_lora(out)
    with pytest.raises(FileNotFoundError, match=r"no LoRA adapters at .*nowhere: no such folder"):
        load_lora(tmp_path / "nowhere")


def test_tampered_json_and_names(tmp_path, base):
    _, params = base
    lora = random_lora(params, targets="out_head")
    out = save_lora(tmp_path / "ad", lora)
    good = read_json(out / INFO_FILE)
    for change, pattern in [
        ({"format": "peft"}, r"format is 'peft', expected 'flaxgpt-lora'"),
        ({"version": 2}, r"version 2 is not supported \(this flaxgpt reads version 1\)"),
        ({"rank": 0}, r"missing or invalid field\(s\) \['rank'\]"),
        ({"layers": [{**good["layers"][0], "A": [32, 5]}]}, r"layer 'out_head' has A \(32, 5\) .* not of rank 4"),
    ]:
        write_json(out / INFO_FILE, {**good, **change})
        with pytest.raises(ValueError, match=pattern):
            load_lora(out)
    (out / INFO_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=r"lora.json is not valid JSON"):
        read_lora_info(out)
    # right checksum, wrong names: a file renamed from another adapter set
    other = lora.layers["out_head"]
    save_file({"head/A": np.asarray(other["A"]), "head/B": np.asarray(other["B"])}, str(out / TENSORS_FILE))
    good["tensors"].update(sha256=sha256_file(out / TENSORS_FILE), bytes=(out / TENSORS_FILE).stat().st_size)
    write_json(out / INFO_FILE, good)
    with pytest.raises(ValueError, match=r"missing tensors \['out_head/A', 'out_head/B'\], unexpected \['head/A'"):
        load_lora(out)


def test_base_that_does_not_fit(tmp_path, tiny_config, base):
    _, params = base
    out = save_lora(tmp_path / "ad", random_lora(params, targets="W_key"), base={"source": "tiny-32"})
    wider = param_shapes(tiny_config(qkv_bias=True, tie_embeddings=False, emb_dim=64))
    with pytest.raises(ValueError, match=r"\(saved for base 'tiny-32'\).*'trf_blocks_0/att/W_key' does not fit the "
                       r"base layer \(64, 64\): got \{'A': \(32, 4\), 'B': \(4, 32\)\}, expected A \(64, 4\)"):
        load_lora(out, wider)
    scanned = param_shapes(tiny_config(qkv_bias=True, tie_embeddings=False, scan_layers=True))
    with pytest.raises(ValueError, match=r"'trf_blocks_0/att/W_key' has no linear layer in the base params"):
        load_lora(out, scanned)
    assert load_lora(out, params).layers.keys() == {"trf_blocks_0/att/W_key", "trf_blocks_1/att/W_key"}


def test_save_refuses_bad_arguments(tmp_path, base):
    _, params = base
    lora = random_lora(params, targets="out_head")
    with pytest.raises(ValueError, match="expects a flaxgpt LoRA, got dict"):
        save_lora(tmp_path / "a", lora.adapters)
    with pytest.raises(ValueError, match="base must be JSON-serialisable"):
        save_lora(tmp_path / "a", lora, base={"params": np.zeros(2)})
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file; save_lora writes a folder"):
        save_lora(tmp_path / "f", lora)
