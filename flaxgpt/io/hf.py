"""Weight mapping: flaxgpt's params <-> Hugging Face GPT-2 tensor names, and GPT-2 configs.

Both directions work on numpy arrays, one tensor at a time, and accept either param layout (unrolled
``trf_blocks_N`` or scanned ``trf_blocks``; the output layout follows ``cfg.scan_layers``). The table
machinery is in :mod:`flaxgpt.io.mapping`; file I/O in :mod:`flaxgpt.io.pretrained`.

Hugging Face ``GPT2LMHeadModel`` (``Conv1D`` weights are (in, out), like flax kernels)::

    transformer.wte.weight (V, C)        -> tok_emb/embedding
    transformer.wpe.weight (ctx, C)      -> pos_emb/embedding
    transformer.h.N.ln_1.{weight,bias}   -> trf_blocks_N/norm1/{scale,shift}      (ln_2 -> norm2)
    transformer.h.N.attn.c_attn.weight (C, 3C) = W_query | W_key | W_value kernels (+ .bias (3C,))
    transformer.h.N.attn.c_proj.*        -> trf_blocks_N/att/out_proj/*
    transformer.h.N.mlp.c_fc.* / c_proj.* -> trf_blocks_N/ff/fc1/* / ff/fc2/*
    transformer.ln_f.{weight,bias}       -> final_norm/{scale,shift}
    lm_head.weight (V, C)                -> out_head/kernel (C, V); absent or equal to wte when tied
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from flaxgpt.config import GPTConfig
from flaxgpt.io.mapping import Params, TensorSpec, export_tensors, import_tensors
from flaxgpt.io.safetensors_io import OutTensor

__all__ = ["params_from_hf", "params_to_hf", "config_from_hf", "config_to_hf", "hf_tensors"]

_HF_IGNORED = re.compile(r"^h\.\d+\.attn\.(bias|masked_bias)$")  # causal-mask buffers of older versions
_HF_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")  # both are the tanh approximation flaxgpt uses


# --------------------------------------------------------------------------- tables


def _hf_table(cfg: GPTConfig) -> list[TensorSpec]:
    v, c, ctx = cfg.vocab_size, cfg.emb_dim, cfg.context_length
    qkv = tuple(("att", n) for n in ("W_query", "W_key", "W_value"))
    t = [
        TensorSpec("wte.weight", (v, c), (("tok_emb", "embedding"),)),
        TensorSpec("wpe.weight", (ctx, c), (("pos_emb", "embedding"),)),
    ]
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        t += [
            TensorSpec(h + "ln_1.weight", (c,), (("norm1", "scale"),), i),
            TensorSpec(h + "ln_1.bias", (c,), (("norm1", "shift"),), i),
            TensorSpec(
                h + "attn.c_attn.weight", (c, 3 * c), tuple(p + ("kernel",) for p in qkv), i, "split3"
            ),
            TensorSpec(h + "attn.c_attn.bias", (3 * c,), tuple(p + ("bias",) for p in qkv), i, "split3")
            if cfg.qkv_bias
            else TensorSpec(
                h + "attn.c_attn.bias", (3 * c,), (("att", "W_query", "kernel"),), i, "zero", False
            ),
            TensorSpec(h + "attn.c_proj.weight", (c, c), (("att", "out_proj", "kernel"),), i),
            TensorSpec(h + "attn.c_proj.bias", (c,), (("att", "out_proj", "bias"),), i),
            TensorSpec(h + "ln_2.weight", (c,), (("norm2", "scale"),), i),
            TensorSpec(h + "ln_2.bias", (c,), (("norm2", "shift"),), i),
            TensorSpec(h + "mlp.c_fc.weight", (c, 4 * c), (("ff", "fc1", "kernel"),), i),
            TensorSpec(h + "mlp.c_fc.bias", (4 * c,), (("ff", "fc1", "bias"),), i),
            TensorSpec(h + "mlp.c_proj.weight", (4 * c, c), (("ff", "fc2", "kernel"),), i),
            TensorSpec(h + "mlp.c_proj.bias", (c,), (("ff", "fc2", "bias"),), i),
        ]
    t += [
        TensorSpec("ln_f.weight", (c,), (("final_norm", "scale"),)),
        TensorSpec("ln_f.bias", (c,), (("final_norm", "shift"),)),
    ]
    if cfg.tie_embeddings:
        t.append(
            TensorSpec(
                "lm_head.weight", (v, c), (("tok_emb", "embedding"),), None, "tied", False, "wte.weight"
            )
        )
    else:
        t.append(TensorSpec("lm_head.weight", (v, c), (("out_head", "kernel"),), None, "T"))
    return t


# --------------------------------------------------------------------------- import and export


def _strip_transformer_prefix(names: Iterable[str]) -> dict[str, str]:
    """Maps names without the optional ``transformer.`` prefix to the names as given."""
    out: dict[str, str] = {}
    for name in names:
        short = name[len("transformer.") :] if name.startswith("transformer.") else name
        if short in out:
            raise ValueError(f"tensor {short!r} appears twice: as {out[short]!r} and as {name!r}")
        out[short] = name
    return out


def params_from_hf(
    state_dict: Mapping[str, Any],
    cfg: GPTConfig,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    source: str = "Hugging Face GPT-2 weights",
    allow_non_finite: bool = False,
) -> Params:
    """Hugging Face ``GPT2LMHeadModel`` tensors -> flaxgpt params (numpy, ``cfg.param_dtype``).

    Args:
      state_dict: name -> array (numpy, or anything ``np.asarray`` reads); the ``transformer.`` prefix is
        optional. The ``h.N.attn.bias``/``masked_bias`` mask buffers are ignored; ``lm_head.weight`` may be
        absent or equal to ``wte`` when ``cfg.tie_embeddings``; ``c_attn.bias`` may be absent or all zero
        when not ``cfg.qkv_bias``.
      cfg: the model config (sizes, qkv_bias, tie_embeddings, layout and dtype of the result).
      shapes: the tensors' shapes, when ``state_dict`` reads lazily (each tensor is then read once);
        by default ``np.shape`` of each value.
      source: what to call the weights in error messages (e.g. a file name).
      allow_non_finite: accept tensors holding NaN or inf (refused by default).

    Returns:
      The params tree in the layout ``cfg.scan_layers`` asks for.

    Raises:
      ValueError: a missing, unexpected or wrongly shaped tensor (named with expected and found shapes),
        a tensor holding NaN or inf, a non-zero qkv bias without ``qkv_bias``, or an untied head with
        ``tie_embeddings``.
    """
    names = _strip_transformer_prefix(shapes if shapes is not None else state_dict)
    found = {
        short: tuple(shapes[name] if shapes is not None else np.shape(state_dict[name]))
        for short, name in names.items()
    }
    get = lambda n: state_dict[names[n]]  # noqa: E731
    return import_tensors(
        _hf_table(cfg), get, found, _HF_IGNORED, cfg, source, allow_non_finite=allow_non_finite
    )


def hf_tensors(params: Params, cfg: GPTConfig, prefix: bool = True) -> list[OutTensor]:
    """The tensors :func:`params_to_hf` returns, each read on demand (for streaming writers).

    Args:
      params: a params tree in either layout.
      cfg: its config.
      prefix: prefix the names with ``transformer.`` (not ``lm_head.weight``).

    Returns:
      One :class:`~flaxgpt.io.safetensors_io.OutTensor` per tensor.
    """
    out = export_tensors(_hf_table(cfg), params, cfg, write_tied=False)
    if prefix:
        out = [
            dataclasses.replace(t, name=t.name if t.name == "lm_head.weight" else f"transformer.{t.name}")
            for t in out
        ]
    return out


def params_to_hf(params: Params, cfg: GPTConfig, prefix: bool = True) -> dict[str, np.ndarray]:
    """flaxgpt params -> Hugging Face ``GPT2LMHeadModel`` tensors (numpy, the params' dtypes).

    Args:
      params: a params tree in either layout.
      cfg: its config. Without ``qkv_bias`` zero ``c_attn`` biases are written (GPT-2 has them); with
        ``tie_embeddings`` no ``lm_head.weight`` is written (``transformers`` ties it to ``wte``).
      prefix: prefix the names with ``transformer.`` as ``GPT2LMHeadModel.state_dict()`` does.

    Returns:
      name -> array.
    """
    return {t.name: t.read() for t in hf_tensors(params, cfg, prefix)}


# --------------------------------------------------------------------------- configs


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> GPTConfig:
    """A Hugging Face GPT-2 ``config.json`` dict -> GPTConfig.

    GPT-2 has q/k/v biases and a tied head: ``qkv_bias=True`` (unless the file was written by flaxgpt from
    a model without them), ``tie_embeddings`` from ``tie_word_embeddings`` (default True), the checkpoint's
    ``n_positions``, its ``layer_norm_epsilon`` (1e-5) and ``init="gpt2"``.

    Args:
      hf: the parsed config.json.
      **overrides: other GPTConfig fields (e.g. ``scan_layers=True``, ``drop_rate=0.0``).

    Returns:
      The config.

    Raises:
      ValueError: a config for another architecture or with settings flaxgpt does not implement.
    """
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"config.json has model_type {hf.get('model_type')!r}, expected 'gpt2'")
    n_embd = hf.get("n_embd")
    checks = {
        "activation_function": (
            hf.get("activation_function", "gelu_new") in _HF_ACTIVATIONS,
            _HF_ACTIVATIONS,
        ),
        "n_inner": (
            hf.get("n_inner") in (None, 4 * n_embd if isinstance(n_embd, int) else None),
            "null or 4 * n_embd",
        ),
        "scale_attn_weights": (hf.get("scale_attn_weights", True) is True, True),
        "scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False) is False, False),
        "add_cross_attention": (hf.get("add_cross_attention", False) is False, False),
    }
    for key, (ok, expected) in checks.items():
        if not ok:
            raise ValueError(f"config.json has {key}={hf.get(key)!r}; flaxgpt implements {expected!r}")
    missing = [k for k in ("vocab_size", "n_embd", "n_head", "n_layer") if k not in hf]
    if "n_positions" not in hf and "n_ctx" not in hf:
        missing.append("n_positions")
    if missing:
        raise ValueError(f"config.json lacks {missing}")
    fields = dict(
        vocab_size=hf["vocab_size"],
        context_length=hf.get("n_positions", hf.get("n_ctx")),
        emb_dim=hf["n_embd"],
        n_heads=hf["n_head"],
        n_layers=hf["n_layer"],
        drop_rate=float(hf.get("resid_pdrop", 0.1)),
        qkv_bias=bool(hf.get("flaxgpt_qkv_bias", True)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        init="gpt2",
        ln_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
    )
    return GPTConfig(**{**fields, **overrides})


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    """GPTConfig -> a ``config.json`` dict that ``transformers.GPT2Config`` reads.

    Args:
      cfg: the model config.

    Returns:
      The dict; ``flaxgpt_qkv_bias: false`` records a model without q/k/v biases (written as zeros).
    """
    eos = 50256 if cfg.vocab_size > 50256 else None  # GPT-2's <|endoftext|>, when the vocabulary has it
    out: dict[str, Any] = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_ctx": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_head": cfg.n_heads,
        "n_layer": cfg.n_layers,
        "n_inner": None,
        "layer_norm_epsilon": cfg.ln_eps,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "dtype": cfg.param_dtype,
    }
    if not cfg.qkv_bias:
        out["flaxgpt_qkv_bias"] = False
    return out
