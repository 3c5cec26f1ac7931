"""The book's PyTorch ``GPTModel`` state-dict names <-> flaxgpt params.

The book's readers train and save PyTorch models whose state dict reads (``nn.Linear`` weights are
(out, in), so every projection is transposed)::

    tok_emb.weight (V, C)                       -> tok_emb/embedding
    pos_emb.weight (ctx, C)                     -> pos_emb/embedding
    trf_blocks.N.att.{W_query,W_key,W_value}.weight (C, C) [+ .bias]  -> trf_blocks_N/att/*/kernel.T
    trf_blocks.N.att.out_proj.{weight,bias}     -> trf_blocks_N/att/out_proj
    trf_blocks.N.ff.layers.0.{weight,bias}      -> trf_blocks_N/ff/fc1   (layers.2 -> fc2)
    trf_blocks.N.norm{1,2}.{scale,shift}        -> trf_blocks_N/norm{1,2}
    final_norm.{scale,shift}                    -> final_norm
    out_head.weight (V, C)                      -> out_head/kernel.T (a copy of tok_emb when tied)
    trf_blocks.N.att.mask (ctx, ctx)            the causal-mask buffer: ignored on import, written on export

Store such a state dict as safetensors (``safetensors.torch.save_file(model.state_dict(), path)``) and
load it with :func:`flaxgpt.io.pretrained.load_book`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flaxgpt.config import PRESETS, GPTConfig
from flaxgpt.io.mapping import Params, TensorSpec, export_tensors, import_tensors
from flaxgpt.io.safetensors_io import OutTensor

__all__ = ["params_from_book", "params_to_book", "book_tensors", "book_config"]

_BOOK_IGNORED = re.compile(r"^trf_blocks\.\d+\.att\.mask$")  # the book's registered mask buffer


def _book_table(cfg: GPTConfig) -> list[TensorSpec]:
    v, c, ctx = cfg.vocab_size, cfg.emb_dim, cfg.context_length
    t = [
        TensorSpec("tok_emb.weight", (v, c), (("tok_emb", "embedding"),)),
        TensorSpec("pos_emb.weight", (ctx, c), (("pos_emb", "embedding"),)),
    ]
    for i in range(cfg.n_layers):
        b = f"trf_blocks.{i}."
        for name in ("W_query", "W_key", "W_value"):
            t.append(TensorSpec(f"{b}att.{name}.weight", (c, c), (("att", name, "kernel"),), i, "T"))
            if cfg.qkv_bias:
                t.append(TensorSpec(f"{b}att.{name}.bias", (c,), (("att", name, "bias"),), i))
        t += [
            TensorSpec(b + "att.out_proj.weight", (c, c), (("att", "out_proj", "kernel"),), i, "T"),
            TensorSpec(b + "att.out_proj.bias", (c,), (("att", "out_proj", "bias"),), i),
            TensorSpec(b + "ff.layers.0.weight", (4 * c, c), (("ff", "fc1", "kernel"),), i, "T"),
            TensorSpec(b + "ff.layers.0.bias", (4 * c,), (("ff", "fc1", "bias"),), i),
            TensorSpec(b + "ff.layers.2.weight", (c, 4 * c), (("ff", "fc2", "kernel"),), i, "T"),
            TensorSpec(b + "ff.layers.2.bias", (c,), (("ff", "fc2", "bias"),), i),
        ]
        for norm in ("norm1", "norm2"):
            t += [
                TensorSpec(f"{b}{norm}.scale", (c,), ((norm, "scale"),), i),
                TensorSpec(f"{b}{norm}.shift", (c,), ((norm, "shift"),), i),
            ]
    t += [
        TensorSpec("final_norm.scale", (c,), (("final_norm", "scale"),)),
        TensorSpec("final_norm.shift", (c,), (("final_norm", "shift"),)),
    ]
    if cfg.tie_embeddings:
        t.append(
            TensorSpec(
                "out_head.weight", (v, c), (("tok_emb", "embedding"),), None, "tied", False, "tok_emb.weight"
            )
        )
    else:
        t.append(TensorSpec("out_head.weight", (v, c), (("out_head", "kernel"),), None, "T"))
    return t


def params_from_book(
    state_dict: Mapping[str, Any],
    cfg: GPTConfig,
    *,
    shapes: Mapping[str, Sequence[int]] | None = None,
    source: str = "book GPTModel weights",
    allow_non_finite: bool = False,
) -> Params:
    """The book's PyTorch ``GPTModel`` state dict (as numpy) -> flaxgpt params.

    Args:
      state_dict: name -> array with the book's names (``tok_emb.weight``,
        ``trf_blocks.0.att.W_query.weight``, ...); the ``att.mask`` buffers are ignored. With
        ``cfg.tie_embeddings`` ``out_head.weight`` must equal ``tok_emb.weight`` (or be absent).
      cfg: the model config (see :func:`book_config` to infer one from the shapes).
      shapes: the tensors' shapes, when ``state_dict`` reads lazily; by default ``np.shape`` of each value.
      source: what to call the weights in error messages.
      allow_non_finite: accept tensors holding NaN or inf (refused by default).

    Returns:
      The params tree in the layout ``cfg.scan_layers`` asks for, in ``cfg.param_dtype``.

    Raises:
      ValueError: as :func:`flaxgpt.io.hf.params_from_hf`.
    """
    if shapes is not None:
        found = {name: tuple(s) for name, s in shapes.items()}
    else:
        found = {name: tuple(np.shape(v)) for name, v in state_dict.items()}
    return import_tensors(
        _book_table(cfg), state_dict.__getitem__, found, _BOOK_IGNORED, cfg, source,
        allow_non_finite=allow_non_finite,
    )


def book_tensors(params: Params, cfg: GPTConfig, masks: bool = True) -> list[OutTensor]:
    """The tensors :func:`params_to_book` returns, each read on demand (for streaming writers).

    Args:
      params: a params tree in either layout.
      cfg: its config.
      masks: add the ``trf_blocks.N.att.mask`` buffers.

    Returns:
      One :class:`~flaxgpt.io.safetensors_io.OutTensor` per tensor.
    """
    out = export_tensors(_book_table(cfg), params, cfg, write_tied=True)
    if masks:
        ctx = cfg.context_length
        mask = lambda: np.triu(np.ones((ctx, ctx), np.float32), k=1)  # (ctx, ctx) 1 = masked  # noqa: E731
        out += [
            OutTensor(f"trf_blocks.{i}.att.mask", (ctx, ctx), np.dtype(np.float32), mask)
            for i in range(cfg.n_layers)
        ]
    return out


def params_to_book(params: Params, cfg: GPTConfig, masks: bool = True) -> dict[str, np.ndarray]:
    """flaxgpt params -> the book's PyTorch ``GPTModel`` state dict (numpy).

    Args:
      params: a params tree in either layout.
      cfg: its config; with ``tie_embeddings`` ``out_head.weight`` is a copy of ``tok_emb.weight`` (the
        book's model always has its own head).
      masks: include the ``trf_blocks.N.att.mask`` buffers the book's ``load_state_dict`` expects.

    Returns:
      name -> array; ``model.load_state_dict({k: torch.from_numpy(v) ...})`` loads it into the book's model.
    """
    return {t.name: t.read() for t in book_tensors(params, cfg, masks)}


def book_config(
    shapes: Mapping[str, Sequence[int]], n_heads: int | None = None, **overrides: Any
) -> GPTConfig:
    """Infers a GPTConfig from the shapes of a book ``GPTModel`` state dict.

    Sizes, depth and ``qkv_bias`` come from the shapes; ``n_heads`` cannot, so it is ``n_heads`` or the
    GPT-2 preset with the same width (768 -> 12, 1024 -> 16, 1280 -> 20, 1600 -> 25).

    Args:
      shapes: name -> shape (e.g. ``{k: v.shape for k, v in state_dict.items()}``).
      n_heads: attention heads, when the width is not a GPT-2 preset's.
      **overrides: other GPTConfig fields.

    Returns:
      The config (``tie_embeddings=False``: the book's model has its own head).
    """
    for name in ("tok_emb.weight", "pos_emb.weight"):
        if name not in shapes or len(shapes[name]) != 2:
            raise ValueError(f"not a book GPTModel state dict: no 2-D tensor {name!r}")
    vocab, emb = (int(s) for s in shapes["tok_emb.weight"])
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"^trf_blocks\.(\d+)\.", k))}
    if not layers:
        raise ValueError("not a book GPTModel state dict: no trf_blocks.N.* tensors")
    if n_heads is None:
        by_width = {p["emb_dim"]: p["n_heads"] for p in PRESETS.values()}
        if emb not in by_width:
            raise ValueError(
                f"cannot infer n_heads for emb_dim={emb} (not a GPT-2 size); pass n_heads (--n-heads)"
            )
        n_heads = by_width[emb]
    fields = dict(
        vocab_size=vocab,
        context_length=int(shapes["pos_emb.weight"][0]),
        emb_dim=emb,
        n_heads=n_heads,
        n_layers=max(layers) + 1,
        qkv_bias="trf_blocks.0.att.W_query.bias" in shapes,
        tie_embeddings=False,
    )
    return GPTConfig(**{**fields, **overrides})
