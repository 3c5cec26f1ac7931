"""Hugging Face PEFT export (flaxgpt.io.peft) against PEFT itself: ``PeftModel.from_pretrained(
GPT2LMHeadModel.from_pretrained(base), adapters)`` gives lora_apply's logits within 1e-4, for every target
mix (fused q|k|v with k = 1, 2, 3 projections adapted), both layer layouts, tied and untied heads; and the
merged export (merge_lora -> save_pretrained -> GPT2LMHeadModel) gives them too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from _weights import random_params  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from flaxgpt.files import read_json  # noqa: E402
from flaxgpt.io.peft import PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE, load_peft, peft_module, save_peft  # noqa: E402
from flaxgpt.io.pretrained import save_pretrained  # noqa: E402
from flaxgpt.nn.lora import LoRA, init_lora, lora_apply, merge_lora  # noqa: E402
from flaxgpt.nn.model import GPTModel  # noqa: E402
from flaxgpt.nn.params import param_shapes  # noqa: E402

ATOL = 1e-4
RANK, ALPHA = 4, 6.0  # scale 1.5: folding it into B is checked, not hidden by alpha == rank
# PEFT warns once that lm_head (nn.Linear) takes fan_in_fan_out=False where the blocks' Conv1D take True
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True:UserWarning")


def make_case(cfg, targets, seed: int = 0):
    """Random base params (every leaf, scale 0.2) and adapters with random non-zero A and B."""
    params = jax.tree.map(jnp.asarray, random_params(cfg, seed, scale=0.2))
    lora = init_lora(params, jax.random.key(seed + 1), rank=RANK, alpha=ALPHA, targets=targets)
    rng = np.random.default_rng(seed + 2)
    adapters = jax.tree.map(lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype), lora.adapters)
    return params, LoRA(adapters, alpha=lora.alpha)


def ids(cfg, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, cfg.context_length))


def torch_logits(model, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(idx)).logits.numpy()


CASES = {
    "all-untied": ("all", False, False, 3),
    "all-untied-scanned": ("all", False, True, 3),
    "q-and-v": ("W_query|W_value", False, False, 2),
    "all-tied": ("all", True, False, 3),
    "k-of-block0-q-of-block1-head": ("trf_blocks_0/att/W_key|trf_blocks_1/att/W_query|out_head", False, False, 1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_peft_model_gives_lora_apply_logits(tmp_path, tiny_config, case):
    targets, tie, scan, k = CASES[case]
    cfg = tiny_config(qkv_bias=True, tie_embeddings=tie, scan_layers=scan)
    params, lora = make_case(cfg, targets)
    idx = ids(cfg)
    want = np.asarray(lora_apply(GPTModel(cfg), params, lora, jnp.asarray(idx)))  # (B, T, V)
    base_dir = save_pretrained(cfg, params, tmp_path / "base")
    adapter_dir = save_peft(tmp_path / "adapters", cfg, lora, base_model_name_or_path=str(base_dir))

    conf = read_json(adapter_dir / PEFT_CONFIG_FILE)
    modules = sorted({peft_module(p.replace("trf_blocks/", f"trf_blocks_{i}/"))[0]
                      for p in lora.layers for i in range(cfg.n_layers)})
    assert conf["target_modules"] == modules
    head = not tie and (targets == "all" or "out_head" in targets)  # a tied head has no kernel to adapt
    assert ("lm_head" in modules) == ("out_head" in lora.layers) == head
    assert (conf["r"], conf["lora_alpha"], conf["peft_type"], conf["task_type"]) == (RANK, RANK, "LORA", "CAUSAL_LM")
    fused = [m for m in modules if m.endswith("c_attn")]
    assert conf["rank_pattern"] == conf["alpha_pattern"] == ({m: k * RANK for m in fused} if k > 1 else {})
    tensors = load_file(str(adapter_dir / PEFT_WEIGHTS_FILE))
    a = tensors[f"base_model.model.{fused[0]}.lora_A.weight"]
    b = tensors[f"base_model.model.{fused[0]}.lora_B.weight"]
    assert a.shape == (k * RANK, cfg.emb_dim) and b.shape == (3 * cfg.emb_dim, k * RANK)
    assert len(tensors) == 2 * len(modules)  # adapters only: no base weights

    hf = transformers.GPT2LMHeadModel.from_pretrained(base_dir).eval()
    base_logits = torch_logits(hf, idx)
    assert np.abs(base_logits - want).max() > 1e-2  # the adapters matter, so the comparison below can fail
    model = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
    for name, mod in model.named_modules():
        if hasattr(mod, "scaling") and hasattr(mod, "r") and mod.r:
            assert mod.scaling == {"default": 1.0}, name
    np.testing.assert_allclose(torch_logits(model, idx), want, atol=ATOL, rtol=0)
    # PEFT's own merge uses fan_in_fan_out per module (Conv1D blocks, nn.Linear head): same logits
    np.testing.assert_allclose(torch_logits(model.merge_and_unload(), idx), want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("tie", [False, True])
def test_merged_export_loads_in_transformers(tmp_path, tiny_config, tie):
    cfg = tiny_config(qkv_bias=True, tie_embeddings=tie)
    params, lora = make_case(cfg, "all", seed=3)
    idx = ids(cfg, 1)
    want = np.asarray(lora_apply(GPTModel(cfg), params, lora, jnp.asarray(idx)))
    hf = transformers.GPT2LMHeadModel.from_pretrained(save_pretrained(cfg, merge_lora(params, lora), tmp_path / "m"))
    got = torch_logits(hf.eval(), idx)
    assert np.abs(got - torch_logits(transformers.GPT2LMHeadModel.from_pretrained(
        save_pretrained(cfg, params, tmp_path / "b")).eval(), idx)).max() > 1e-2
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_load_peft_splits_the_ranks_back(tmp_path, tiny_config, scan):
    cfg = tiny_config(qkv_bias=True, tie_embeddings=False, scan_layers=scan)
    lora = make_case(cfg, "W_query|W_value|fc1|out_head")[1]
    back = load_peft(save_peft(tmp_path / "a", cfg, lora), cfg)
    assert back.layers.keys() == lora.layers.keys() and (back.alpha, back.dropout) == (lora.alpha, lora.dropout)
    for path, ab in lora.layers.items():
        np.testing.assert_array_equal(back.layers[path]["A"], ab["A"], err_msg=path)
        np.testing.assert_allclose(back.layers[path]["B"], ab["B"], rtol=1e-6, atol=0, err_msg=path)
    # the other layout
    other = load_peft(tmp_path / "a", cfg.replace(scan_layers=not scan))
    assert len(other.layers) == (3 * cfg.n_layers + 1 if scan else 4)


def test_load_peft_refuses_foreign_and_modified_files(tmp_path, tiny_config):
    cfg = tiny_config(qkv_bias=True, tie_embeddings=False)
    out = save_peft(tmp_path / "a", cfg, make_case(cfg, "W_key|W_value")[1])
    tensors = load_file(str(out / PEFT_WEIGHTS_FILE))
    name = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tensors[name][0, 0] = 1.0  # a query column of a module whose q is not adapted
    save_file(tensors, str(out / PEFT_WEIGHTS_FILE), metadata=_metadata(out / PEFT_WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"'transformer.h.1.attn.c_attn' is not the block-diagonal rank-2x4 adapter"):
        load_peft(out, cfg)
    save_file(tensors, str(out / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"was not exported by flaxgpt's save_peft"):
        load_peft(out, cfg)
    (out / PEFT_CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json is missing"):
        load_peft(out, cfg)


def _metadata(file) -> dict:
    from safetensors import safe_open

    with safe_open(str(file), framework="numpy") as f:
        return f.metadata()


def test_save_peft_refuses_classifiers_and_misfits(tmp_path, tiny_config):
    clf = tiny_config(qkv_bias=True, tie_embeddings=False, num_classes=2)
    lora = init_lora(param_shapes(clf), jax.random.key(0), rank=2, targets="W_query")
    with pytest.raises(ValueError, match=r"cfg.num_classes=2 is a classifier"):
        save_peft(tmp_path / "a", clf, lora)
    with pytest.raises(ValueError, match=r"'trf_blocks_0/att/W_query' does not fit the base layer \(64, 64\)"):
        save_peft(tmp_path / "a", tiny_config(qkv_bias=True, emb_dim=64), lora)
    assert not (tmp_path / "a").exists()
