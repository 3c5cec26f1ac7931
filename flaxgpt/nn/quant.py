"""Opt-in int8 weight-only inference: every matrix of the model stored as int8 with one float32 scale per
output channel, dequantised inside the product. For memory-bound batch-1 decoding, where a step reads
every weight once, the weights' bytes drop 4x.

    q = quantize_int8(params, cfg)                        # once
    ids = generate(model, q, prompt, max_new_tokens=50)   # flaxgpt.generation.decode.generate takes it
    logits = int8_apply(model, q, idx)                    # or any model.apply call

Quantisation is symmetric per output channel: ``scale[j] = max_i |W[i, j]| / 127`` and
``q = round(W / scale)`` in [-127, 127], so ``x @ W ~= (x @ q) * scale`` with at most ``scale / 2`` error
per weight. What is quantised: the kernels of every Dense layer (attention projections, feed-forward,
an untied or classifier head) and, for a tied head, a copy of the token table used as the head (the
embedding lookup keeps the float table: it reads one row per token). Biases, LayerNorms and the position
table stay float32.

The products, for x of N rows: N = 1 (a decode step) reads the int8 kernel, stored (out, in), once, in a
fused multiply-reduce along its contiguous rows (XLA:CPU's dot on a converted operand was 5x slower than
the float32 product); N > 1 (a prompt, a batch) dequantises the kernel and runs the float32 product,
so only batch-1 decoding gets faster.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from flaxgpt.config import GPTConfig
from flaxgpt.nn.matmul import int8_matmul
from flaxgpt.nn.model import INT8, INT8_HEAD, GPTModel, Params
from flaxgpt.nn.params import unstack_layers
from flaxgpt.pytree import flat_dict, unflatten_dict

__all__ = ["COLLECTION", "Int8Params", "quantize_int8", "int8_apply", "quantize_matrix"]

COLLECTION = INT8  # the variable collection of the quantised weights


@struct.dataclass
class Int8Params:
    """Parameters of an int8 weight-only model (unrolled layout).

    Attributes:
      params: the float parameters that stay float (biases, LayerNorms, embeddings); no Dense kernels.
      int8: the quantised matrices, a tree mirroring the module paths: ``{..., "W_query": {"q": (out, in)
        int8, "scale": (out,) float32}}``, and ``"tied_head"`` for a tied head.
    """

    params: Params
    int8: Params

    def nbytes(self) -> int:
        """Bytes of all arrays (float and int8)."""
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((self.params, self.int8))))


def quantize_matrix(w: jax.Array) -> dict[str, jax.Array]:
    """Symmetric per-output-channel int8 quantisation of an (in, out) kernel.

    Args:
      w: (in, out) float weights.

    Returns:
      ``{"q": (out, in) int8, "scale": (out,) float32}`` with ``w ~= (q * scale[:, None]).T``.
    """
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=0) / 127.0  # (out,)
    scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero column: any scale gives q = 0
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)  # (in, out)
    return {"q": q.T, "scale": scale}


def quantize_int8(params: Params, cfg: GPTConfig) -> Int8Params:
    """Quantises a model's matrices to int8 (see the module docstring).

    Args:
      params: float parameters of ``GPTModel(cfg)``, in either layer layout.
      cfg: the model config.

    Returns:
      :class:`Int8Params` in the unrolled layout (run with ``cfg.replace(scan_layers=False)``;
      :func:`flaxgpt.generation.decode.generate` does this itself).
    """
    if "trf_blocks" in params:
        params = unstack_layers(params)
    floats: dict[str, Any] = {}
    int8: dict[str, Any] = {}
    for name, leaf in flat_dict(params).items():  # "trf_blocks_0/ff/fc1/kernel" -> leaf
        layer, _, field = name.rpartition("/")
        if field == "kernel" and leaf.ndim == 2:  # a Dense layer's (in, out) kernel
            int8.update({f"{layer}/{k}": v for k, v in quantize_matrix(leaf).items()})
        else:
            floats[name] = leaf
    if cfg.tie_embeddings:  # q (V, C), scale (V,)
        table = jnp.asarray(params["tok_emb"]["embedding"]).T
        int8.update({f"{INT8_HEAD}/{k}": v for k, v in quantize_matrix(table).items()})
    return Int8Params(params=unflatten_dict(floats), int8=unflatten_dict(int8))


def _intercept(next_fun: Any, args: tuple[Any, ...], kwargs: dict[str, Any], context: Any) -> Any:
    """Runs a quantised ``nn.Dense`` from its int8 kernel (it never reads a float kernel)."""
    mod = context.module
    if context.method_name != "__call__" or not isinstance(mod, nn.Dense) or not mod.has_variable(COLLECTION, "q"):
        return next_fun(*args, **kwargs)
    x = args[0]  # (..., in)
    y = int8_matmul(x, mod.get_variable(COLLECTION, "q"), mod.get_variable(COLLECTION, "scale"))  # (..., out)
    if mod.use_bias:
        y = y + mod.get_variable("params", "bias").astype(y.dtype)
    return y


def int8_apply(model: GPTModel, params: Int8Params, *args: Any, **kwargs: Any) -> Any:
    """``model.apply`` on int8 weights (same arguments as ``model.apply`` after the variables).

    Args:
      model: a ``GPTModel`` with ``scan_layers=False``.
      params: from :func:`quantize_int8`.
      *args: ``model.apply``'s positional arguments (``idx``, ``deterministic``, ...).
      **kwargs: its keyword arguments (``cache``, ``positions``, ...).

    Returns:
      What ``model.apply`` returns.
    """
    if not isinstance(params, Int8Params):
        raise TypeError(f"int8_apply takes quantize_int8(...) output, got {type(params).__name__}")
    if model.cfg.scan_layers:
        raise ValueError("int8 weights use the unrolled layout: apply them with cfg.replace(scan_layers=False)")
    with nn.intercept_methods(_intercept):
        return model.apply({"params": params.params, COLLECTION: params.int8}, *args, **kwargs)
