"""The benchmarks' FLOP accounting (benchmarks/flops.py) against hand counts and the model's own
parameter tree. No timing here: the benchmarks themselves are run by ``benchmarks/run_all.py``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxgpt.config import GPTConfig
from flaxgpt.nn.params import param_shapes

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "flops.py"


@pytest.fixture(scope="module")
def flops():
    spec = importlib.util.spec_from_file_location("flaxgpt_bench_flops", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


TINY = GPTConfig(vocab_size=10, context_length=8, emb_dim=8, n_heads=2, n_layers=2, qkv_bias=True)


def test_hand_count_tiny(flops):
    # per layer: W_query, W_key, W_value 3 * 8*8 + out_proj 8*8 + fc1 8*32 + fc2 32*8 = 768; head 8*10.
    assert flops.matmul_params(TINY) == 2 * 768 + 80 == 1616
    # forward per token at T=4: 2 * 1616 + (Q K^T: 2*T*d + weights @ V: 2*T*d) per layer = 3232 + 2*128.
    assert flops.forward_flops_per_token(TINY, 4) == 3232 + 256 == 3488
    assert flops.train_flops_per_token(TINY, 4) == 3 * 3488
    # decode: prompt of 3, 3 new tokens -> positions 0..4 are run through the model (5 forwards of one
    # token each), attending to 1..5 positions.
    assert flops.decode_flops(TINY, 3, 3) == 5 * 3232 + 4 * 2 * 8 * (1 + 2 + 3 + 4 + 5)


@pytest.mark.parametrize("tie", [False, True])
def test_matmul_params_match_the_model(flops, tie):
    """N is every 2-D matmul kernel of the model plus the head (the token table when tied)."""
    cfg = TINY.replace(tie_embeddings=tie)
    shapes = param_shapes(cfg)
    kernels = [
        x for path, x in jax.tree_util.tree_leaves_with_path(shapes)
        if jax.tree_util.keystr(path).endswith("['kernel']")
    ]
    n = sum(int(np.prod(x.shape)) for x in kernels)
    if tie:
        n += int(np.prod(shapes["tok_emb"]["embedding"].shape))
    assert flops.matmul_params(cfg) == n


def test_gpt2_small_forward_flops(flops):
    # 12 layers * 12 * 768^2 = 84.9M in the blocks, 768 * 50257 = 38.6M in the head.
    cfg = GPTConfig.preset("gpt2-small")
    assert flops.matmul_params(cfg) == 84_934_656 + 38_597_376
    assert flops.forward_flops_per_token(cfg, 256) == 2 * (84_934_656 + 38_597_376) + 4 * 12 * 256 * 768
    assert flops.mfu(1e6, 100.0, 1e9) == pytest.approx(0.1)


def _bench_module(name):
    spec = importlib.util.spec_from_file_location(f"flaxgpt_bench_{name}", _PATH.parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_check_rows_run_on_a_tiny_config():
    """The GPU script's train row runs (here on CPU, tiny shapes) and its MFU uses the model FLOPs formula."""
    gpu = _bench_module("gpu_check")
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu.peak_tflops("NVIDIA H100 PCIe", None) == 756.0  # the longest matching name wins
    assert gpu.peak_tflops("Some GPU", None) is None and gpu.peak_tflops("Some GPU", 50.0) == 50.0
    row = gpu.train_row("gpt2-small", 2, 16, "none", 1, 1.0, n_layers=1, emb_dim=32, n_heads=2, vocab_size=64)
    assert "error" not in row and row["tokens_per_s"] > 0
    cfg = GPTConfig.preset("gpt2-small", n_layers=1, emb_dim=32, n_heads=2, vocab_size=64, context_length=16)
    want = 100 * gpu.flops.mfu(gpu.flops.train_flops_per_token(cfg, 16), row["tokens_per_s"], 1e12)
    assert row["mfu_pct"] == pytest.approx(want)


def test_breakdown_names_ops_by_model_path():
    bd = _bench_module("breakdown")
    assert bd.jax_category("jit(f)/jvp(GPTModel)/GPTModel._trunk/trf_blocks_3/att/W_query/dot_general") == bd.PROJ
    assert bd.jax_category("jit(f)/transpose(jvp(GPTModel))/x/trf_blocks/ff/fc1/dot_general") == bd.FFN
    assert bd.jax_category("jit(f)/GPTModel/trf_blocks_0/att/bhtd,bhsd->bhts/dot_general") == bd.ATT
    assert bd.jax_category("jit(f)/GPTModel/GPTModel.logits_from_hidden/dot_general") == bd.HEAD
    assert bd.jax_category("jit(f)/transpose(jvp(cross_entropy))/exp") == bd.CE
    assert bd.jax_category("jit(f)/optimizer/add") == bd.OPT
    assert bd.torch_category("aten::mm", [[512, 768], [768, 50257]], "") == bd.HEAD
    assert bd.torch_category("aten::addmm", [[3072], [512, 768]], "") == bd.FFN
    assert bd.torch_category("aten::mul", [[2, 3]], "Optimizer.step#AdamW.step") == bd.OPT
    # instruction names from compiled HLO, with an op that has no metadata named after its user
    hlo = (
        '  %dot.1 = f32[2,3]{1,0} dot(%a, %b), lhs_contracting_dims={1}\n'
        '  ROOT %add.2 = f32[2,3]{1,0} add(%dot.1, %c), metadata={op_name="jit(f)/GPTModel/ff/fc1/add"}\n'
    )
    assert bd._hlo_op_names(hlo) == {"add.2": "jit(f)/GPTModel/ff/fc1/add", "dot.1": "jit(f)/GPTModel/ff/fc1/add"}
