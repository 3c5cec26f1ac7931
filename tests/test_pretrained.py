"""GPT-2 weight files: Hugging Face folders and files, sharded checkpoints, the hub cache, the book's
safetensors, and the refusal of pickles and broken files. No test touches the network."""

from __future__ import annotations

import json
import pickle  # only to show that the test payload below is live; the library never imports pickle
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _weights import assert_same_params, random_params
from safetensors import safe_open
from safetensors.numpy import save_file

from flaxgpt.config import GPTConfig
from flaxgpt.io.book import params_to_book
from flaxgpt.io.hf import config_to_hf, params_to_hf
from flaxgpt.io.hub import download
from flaxgpt.io.pretrained import (
    describe,
    detect_format,
    load_any,
    load_book,
    load_pretrained,
    save_book,
    save_pretrained,
)
from flaxgpt.nn.model import GPTModel, forward
from flaxgpt.nn.params import unstack_layers

TINY = dict(vocab_size=61, context_length=8, emb_dim=16, n_heads=4, n_layers=2, drop_rate=0.0)
GPT2_TINY = GPTConfig(**TINY, qkv_bias=True, tie_embeddings=True, init="gpt2")
SHA = "0123456789abcdef0123456789abcdef01234567"


def hub_layout(cfg: GPTConfig, params) -> dict[str, np.ndarray]:
    """Tensors as the published hub files hold them: no prefix, causal-mask buffers, no lm_head."""
    sd = params_to_hf(params, cfg, prefix=False)
    for i in range(cfg.n_layers):
        sd[f"h.{i}.attn.bias"] = np.tril(np.ones((cfg.context_length,) * 2, np.float32))[None, None]
    return sd


def write_hf_dir(folder: Path, cfg: GPTConfig, sd: dict[str, np.ndarray]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    return folder


# --------------------------------------------------------------------------- Hugging Face folders and files


@pytest.mark.parametrize("tie, qkv_bias", [(True, True), (False, False)])
def test_save_then_load_round_trip(tmp_path, tie, qkv_bias):
    cfg = GPTConfig(**TINY, qkv_bias=qkv_bias, tie_embeddings=tie, init="gpt2")
    params = random_params(cfg)
    out = save_pretrained(cfg, params, tmp_path / "model")
    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert ("lm_head.weight" in f.keys()) == (not tie)
        np.testing.assert_array_equal(
            f.get_tensor("transformer.h.1.mlp.c_fc.bias"), params["trf_blocks_1"]["ff"]["fc1"]["bias"]
        )
    cfg2, params2 = load_pretrained(out)
    assert cfg2 == cfg
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params2))
    assert_same_params(params2, params)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_load_options_dtype_and_layout(tmp_path):
    params = random_params(GPT2_TINY)
    out = save_pretrained(GPT2_TINY, params, tmp_path / "m")
    cfg, p16 = load_pretrained(out, dtype="bfloat16", scan_layers=True)
    assert (cfg.param_dtype, cfg.dtype, cfg.scan_layers) == ("bfloat16", "bfloat16", True)
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    assert p16["trf_blocks"]["norm1"]["scale"].shape == (2, 16)
    with pytest.raises(ValueError, match=r"dtype must be one of \('float32', 'bfloat16'\), got 'int8'"):
        load_pretrained(out, dtype="int8")
    # bfloat16 params are saved as bfloat16 and say so in config.json
    save_pretrained(cfg, p16, tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    cfg3, p32 = load_pretrained(tmp_path / "bf16")
    assert cfg3.param_dtype == "float32"
    assert_same_params(p32, jax.tree.map(lambda x: x.astype(jnp.float32), unstack_layers(p16)))


def test_bare_file_with_config_beside_it_and_hub_names(tmp_path):
    params = random_params(GPT2_TINY)
    folder = write_hf_dir(tmp_path / "hub", GPT2_TINY, hub_layout(GPT2_TINY, params))
    _, got = load_pretrained(folder / "model.safetensors")
    assert_same_params(got, params)
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_pretrained(lone / "model.safetensors")


def test_sharded_checkpoint(tmp_path):
    params = random_params(GPT2_TINY)
    sd = params_to_hf(params, GPT2_TINY)
    names = sorted(sd)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    folder = tmp_path / "sharded"
    folder.mkdir()
    for file_name, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(folder / file_name))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text(json.dumps(config_to_hf(GPT2_TINY)))
    _, got = load_pretrained(folder)
    assert_same_params(got, params)
    weight_map[names[0]] = "model-00002-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=f"maps tensor '{names[0]}' to model-00002-of-00002.safetensors"):
        load_pretrained(folder)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"wte.weight": "../x.safetensors"}})
    )
    with pytest.raises(ValueError, match="expected a .safetensors file name"):
        load_pretrained(folder)
    with pytest.raises(ValueError, match="sharded checkpoint"):
        save_pretrained(GPT2_TINY, params, folder)


# --------------------------------------------------------------------------- bad files


def test_config_that_disagrees_with_the_tensors(tmp_path):
    params = random_params(GPT2_TINY)
    folder = write_hf_dir(tmp_path / "m", GPT2_TINY.replace(n_layers=3), params_to_hf(params, GPT2_TINY))
    with pytest.raises(
        ValueError,
        match=r"model.safetensors does not match the config.*"
        r"missing tensor 'h.2.ln_1.weight' \(expected shape \(16,\)\)",
    ):
        load_pretrained(folder)
    write_hf_dir(folder, GPT2_TINY.replace(emb_dim=32), params_to_hf(params, GPT2_TINY))
    with pytest.raises(ValueError, match=r"tensor 'wte.weight' has shape \(61, 16\), expected \(61, 32\)"):
        load_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load_pretrained(folder)


def test_truncated_and_corrupt_files(tmp_path):
    folder = save_pretrained(GPT2_TINY, random_params(GPT2_TINY), tmp_path / "m")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-64])
    with pytest.raises(
        ValueError, match=r"model.safetensors is not a readable safetensors file \(truncated or corrupt\?\)"
    ):
        load_pretrained(folder)
    weights.write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(folder)
    weights.write_bytes(data[:8] + b"[" + data[9:])  # a broken JSON header
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(folder)


def _pickle_payload(target: Path) -> bytes:
    """A protocol-0 pickle whose loading calls os.mkdir(target)."""
    return b"cos\nmkdir\n(S'" + str(target).encode() + b"'\ntR."


def test_pickles_are_never_loaded(tmp_path):
    control = tmp_path / "control"
    pickle.loads(_pickle_payload(control))  # the payload is live: unpickling it creates a folder
    assert control.is_dir()

    sentinel = tmp_path / "pwned"
    payload = _pickle_payload(sentinel)
    folder = tmp_path / "torch_only"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_hf(GPT2_TINY)))
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(ValueError, match=r"pytorch_model.bin is a PyTorch pickle file.*save_pretrained"):
        load_pretrained(folder)
    for name in ("model.pt", "model.pth", "model.pkl"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(ValueError, match="pickle"):
            load_any(tmp_path / name)
        with pytest.raises(ValueError, match="pickle"):
            load_book(tmp_path / name)
    (folder / "model.safetensors").write_bytes(payload)  # a pickle under a safetensors name
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(folder)
    assert not sentinel.exists()


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a file or directory nor a model name"):
        load_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="only from .safetensors files"):
        load_pretrained(tmp_path / "notes.txt")


# --------------------------------------------------------------------------- the hub, from a local cache


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A huggingface_hub cache holding a tiny "openai-community/gpt2" in the hub's layout; offline mode."""
    constants = pytest.importorskip("huggingface_hub.constants")
    cache = tmp_path / "hf-cache"
    repo = cache / "models--openai-community--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    params = random_params(GPT2_TINY, seed=5)
    write_hf_dir(repo / "snapshots" / SHA, GPT2_TINY, hub_layout(GPT2_TINY, params))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # any network call would raise
    monkeypatch.chdir(tmp_path)  # so that no local folder named "gpt2" shadows the model name
    return params


def test_model_names_load_through_the_hub_cache(hub_cache):
    assert download("gpt2") == Path(download("openai-community/gpt2"))
    assert download("gpt2").name == SHA
    for name in ("gpt2", "GPT2", "openai-community/gpt2"):
        cfg, params = load_pretrained(name)
        assert cfg == GPT2_TINY
        assert_same_params(params, hub_cache)
    assert describe("gpt2")[0] == GPT2_TINY


def test_sharded_model_in_the_hub_cache(hub_cache, tmp_path):
    """A snapshot holding an index and shards, no model.safetensors: the shards are fetched instead."""
    import huggingface_hub.constants as constants

    snap = Path(constants.HF_HUB_CACHE) / "models--openai-community--gpt2-medium" / "snapshots" / SHA
    snap.mkdir(parents=True)
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text(SHA)
    sd = hub_layout(GPT2_TINY, hub_cache)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file_name, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(snap / file_name))
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (snap / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (snap / "config.json").write_text(json.dumps(config_to_hf(GPT2_TINY)))
    cfg, params = load_pretrained("gpt2-medium")
    assert cfg == GPT2_TINY
    assert_same_params(params, hub_cache)


def test_uncached_model_names_fail_cleanly_offline(hub_cache):
    with pytest.raises(FileNotFoundError, match="could not get openai-community/gpt2-medium"):
        load_pretrained("gpt2-medium")
    with pytest.raises(ValueError, match="unknown model name 'gpt3'"):
        download("gpt3")


def test_hub_extra_missing(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r'pip install "flaxgpt\[hub\]"'):
        load_pretrained("gpt2")


# --------------------------------------------------------------------------- the book's format, any format


def test_book_file_round_trip_and_detection(tmp_path):
    cfg = GPTConfig(**TINY, qkv_bias=True)
    params = random_params(cfg)
    path = save_book(cfg, params, tmp_path / "book.safetensors")
    assert detect_format(path) == "book"
    with pytest.raises(ValueError, match="cannot infer n_heads for emb_dim=16"):
        load_book(path)
    cfg2, got = load_book(path, n_heads=4, drop_rate=0.0)
    assert cfg2 == cfg
    assert_same_params(got, params)
    cfg3, got3 = load_book(path, cfg.replace(scan_layers=True))
    assert got3["trf_blocks"]["att"]["W_query"]["bias"].shape == (2, 16)
    assert describe(path, n_heads=4)[0].n_layers == 2
    (tmp_path / "config.json").write_text(json.dumps(config_to_hf(cfg)))
    with pytest.raises(ValueError, match="uses the book's GPTModel names; load it with load_book"):
        load_pretrained(path)


def test_book_file_loads_back_into_the_book_model(tmp_path):
    torch_sf = pytest.importorskip("safetensors.torch")
    pytest.importorskip("torch")
    cfg = GPTConfig(**TINY)
    path = save_book(cfg, random_params(cfg), tmp_path / "book.safetensors")
    sd = torch_sf.load_file(str(path))
    want = params_to_book(random_params(cfg), cfg)
    assert sorted(sd) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(sd[k].numpy(), want[k], err_msg=k)


def test_load_any_reads_a_flaxgpt_checkpoint(tmp_path):
    from flaxgpt.io.checkpoint import save_checkpoint

    cfg = GPTConfig(**TINY)
    params = jax.tree.map(jnp.asarray, random_params(cfg))
    save_checkpoint(
        tmp_path / "run", {"params": params, "step": jnp.int32(7)}, step=7, key=jax.random.key(0), config=cfg
    )
    assert detect_format(tmp_path / "run") == "checkpoint"
    cfg2, got, fmt = load_any(tmp_path / "run")
    assert (cfg2, fmt) == (cfg, "checkpoint")
    assert_same_params(got, params)
    cfg3, got16, _ = load_any(tmp_path / "run", dtype="bfloat16")
    assert cfg3.param_dtype == "bfloat16" and got16["tok_emb"]["embedding"].dtype == jnp.bfloat16
    assert describe(tmp_path / "run")[:2] == (cfg, "checkpoint")


# --------------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_save_pretrained_loads_with_the_same_logits(tmp_path, tie):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=61,
        n_positions=8,
        n_embd=16,
        n_layer=2,
        n_head=4,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.save_pretrained(tmp_path / "hf")
    cfg, params = load_pretrained(tmp_path / "hf")
    assert (cfg.tie_embeddings, cfg.qkv_bias, cfg.context_length) == (tie, True, 8)
    idx = np.random.default_rng(0).integers(0, 61, (2, 8))
    with torch.no_grad():
        want = model(torch.as_tensor(idx)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(GPTModel(cfg), params, idx)), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("tie, qkv_bias", [(True, False), (False, True)])
def test_flaxgpt_save_pretrained_loads_in_transformers(tmp_path, tie, qkv_bias):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = GPTConfig(**TINY, qkv_bias=qkv_bias, tie_embeddings=tie)
    params = jax.tree.map(lambda x: 0.3 * x, random_params(cfg, seed=1))
    save_pretrained(cfg, params, tmp_path / "out")
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = np.random.default_rng(1).integers(0, 61, (2, 8))
    with torch.no_grad():
        got = model(torch.as_tensor(idx)).logits.numpy()
    np.testing.assert_allclose(got, np.asarray(forward(GPTModel(cfg), params, idx)), atol=1e-4, rtol=0)


# --------------------------------------------------------------------------- non-finite weights


def test_weight_files_holding_nan_or_inf_are_refused(tmp_path):
    params = random_params(GPT2_TINY)
    params["trf_blocks_0"]["ff"]["fc2"]["bias"][:4] = [np.nan, np.inf, -np.inf, np.nan]
    folder = save_pretrained(GPT2_TINY, params, tmp_path / "hf")  # writing is not refused: reading is
    with pytest.raises(
        ValueError, match=r"model.safetensors: tensor 'h.0.mlp.c_proj.bias' holds 4 non-finite"
    ):
        load_pretrained(folder)
    with pytest.raises(ValueError, match="non-finite"):
        load_any(folder)
    cfg, got = load_pretrained(folder, allow_non_finite=True)
    assert int(jnp.isnan(got["trf_blocks_0"]["ff"]["fc2"]["bias"]).sum()) == 2
    assert load_any(folder, allow_non_finite=True)[2] == "hf"

    book = save_book(GPT2_TINY, params, tmp_path / "book.safetensors")
    with pytest.raises(ValueError, match=r"'trf_blocks.0.ff.layers.2.bias' holds 4 non-finite values"):
        load_book(book, n_heads=4)
    with pytest.raises(ValueError, match="non-finite"):
        load_any(book, n_heads=4)
    _, got = load_book(book, n_heads=4, allow_non_finite=True)
    assert int(jnp.isinf(got["trf_blocks_0"]["ff"]["fc2"]["bias"]).sum()) == 2
