"""Logits parity with PyTorch references: Hugging Face ``GPT2LMHeadModel`` and the book's ``GPTModel``.

Needs the ``parity`` extra (torch + transformers); skipped without it. f32 on CPU, tolerance 1e-4.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
nn = torch.nn

from _book_torch import BookGPTModel  # noqa: E402

from flaxgpt.config import GPTConfig  # noqa: E402
from flaxgpt.io.book import params_from_book, params_to_book  # noqa: E402
from flaxgpt.io.hf import params_from_hf, params_to_hf  # noqa: E402
from flaxgpt.nn.model import GPTModel, forward  # noqa: E402

V, CTX, C, H, L = 97, 16, 32, 4, 2
ATOL = 1e-4


def hf_model(tie: bool, qkv_bias: bool, seed: int = 0):
    """A random GPT2LMHeadModel; every parameter redrawn so that LayerNorms and biases matter too."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=V,
        n_positions=CTX,
        n_embd=C,
        n_layer=L,
        n_head=H,
        tie_word_embeddings=tie,
        bos_token_id=None,
        eos_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2)
            if not qkv_bias and name.endswith("c_attn.bias"):
                p.zero_()
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    return model


def ids(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, (2, CTX))


def hf_logits(model, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(idx)).logits.numpy()


def tiny_config(tie: bool, qkv_bias: bool, scan: bool = False) -> GPTConfig:
    """The flaxgpt config matching `hf_model(tie, qkv_bias)`."""
    return GPTConfig(
        vocab_size=V, context_length=CTX, emb_dim=C, n_heads=H, n_layers=L,
        qkv_bias=qkv_bias, tie_embeddings=tie, scan_layers=scan,
    )


@pytest.mark.parametrize(
    "tie, qkv_bias, scan",
    [
        (True, True, False),
        (False, True, False),
        (True, False, False),
        (False, False, False),
        (True, True, True),
    ],
)
def test_hf_weights_give_hf_logits(tie, qkv_bias, scan):
    model = hf_model(tie, qkv_bias)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    cfg = tiny_config(tie, qkv_bias, scan)
    params = params_from_hf(sd, cfg)
    idx = ids()
    np.testing.assert_allclose(
        np.asarray(forward(GPTModel(cfg), params, idx)), hf_logits(model, idx), atol=ATOL, rtol=0
    )


@pytest.mark.parametrize("tie, qkv_bias", [(True, False), (False, True)])
def test_exported_weights_give_flaxgpt_logits_in_hf(tie, qkv_bias):
    cfg = tiny_config(tie, qkv_bias)
    # flaxgpt params from a different random HF model, so that no weight is at its init value
    params = params_from_hf(
        {k: v.numpy() for k, v in hf_model(tie, qkv_bias, seed=1).state_dict().items()}, cfg
    )
    model = hf_model(tie, True, seed=2)
    sd = {k: torch.from_numpy(v) for k, v in params_to_hf(params, cfg).items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tie else [])
    idx = ids(1)
    np.testing.assert_allclose(
        hf_logits(model, idx), np.asarray(forward(GPTModel(cfg), params, idx)), atol=ATOL, rtol=0
    )


# --------------------------------------------------------------------------- the book's PyTorch model


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_book_state_dict_round_trip_matches_the_book_model(qkv_bias):
    book_cfg = dict(
        vocab_size=V, context_length=CTX, emb_dim=C, n_heads=H, n_layers=L, drop_rate=0.0, qkv_bias=qkv_bias
    )
    torch.manual_seed(3)
    model = BookGPTModel(book_cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    cfg = GPTConfig(**book_cfg)
    params = params_from_book({k: v.numpy() for k, v in model.state_dict().items()}, cfg)
    idx = ids(2)
    with torch.no_grad():
        want = model(torch.as_tensor(idx)).numpy()
    np.testing.assert_allclose(np.asarray(forward(GPTModel(cfg), params, idx)), want, atol=ATOL, rtol=0)

    fresh = BookGPTModel(book_cfg).eval()
    fresh.load_state_dict(
        {k: torch.from_numpy(v) for k, v in params_to_book(params, cfg).items()}, strict=True
    )
    with torch.no_grad():
        np.testing.assert_allclose(fresh(torch.as_tensor(idx)).numpy(), want, atol=1e-6, rtol=0)
