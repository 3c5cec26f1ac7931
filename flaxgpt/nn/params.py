"""Parameters of the GPT model: initialisation in one compiled program, shapes, counts, bytes, and the
unrolled <-> scanned layer layouts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.config import GPTConfig
from flaxgpt.nn.model import GPTModel, Params

__all__ = [
    "init_params",
    "param_shapes",
    "count_params",
    "param_bytes",
    "stack_layers",
    "unstack_layers",
    "convert_layout",
]


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: GPTConfig, key: jax.Array) -> Params:
    if cfg.scan_layers:  # the same weights as the unrolled layout: a seed means one model in either layout
        return stack_layers(_init(cfg.replace(scan_layers=False), key), cfg.n_layers)
    return GPTModel(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """Initialises a model's parameters in one compiled program (seconds even for gpt2-xl shapes).

    Args:
      cfg: the model config (its ``init`` field picks the scheme).
      key: a PRNG key. The same key gives the same weights in the unrolled and the scanned layout
        (``stack_layers`` of the unrolled ones).

    Returns:
      The ``params`` tree (without the ``{"params": ...}`` wrapper).
    """
    return _init(cfg, key)


def param_shapes(cfg: GPTConfig) -> Params:
    """The params tree as ``jax.ShapeDtypeStruct`` leaves, without allocating anything."""
    return jax.eval_shape(lambda k: _init(cfg, k), jax.random.key(0))


def count_params(params: Params) -> int:
    """Total number of parameters (works on arrays and on ``jax.eval_shape`` output)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)))


def param_bytes(params: Params) -> int:
    """Total bytes of the parameters at their dtypes (works on ``jax.eval_shape`` output too)."""
    return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(params)))


def stack_layers(params: Params, n_layers: int) -> Params:
    """Converts the unrolled layout (``trf_blocks_0`` ... ``trf_blocks_{L-1}``) to the scanned one
    (one ``trf_blocks`` entry with a leading layer axis)."""
    blocks = [params[f"trf_blocks_{i}"] for i in range(n_layers)]
    out = {k: v for k, v in params.items() if not k.startswith("trf_blocks_")}
    out["trf_blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
    return out


def unstack_layers(params: Params) -> Params:
    """Converts the scanned layout (``trf_blocks`` with a leading layer axis) to the unrolled one."""
    stacked = params["trf_blocks"]
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    out = {k: v for k, v in params.items() if k != "trf_blocks"}
    for i in range(n_layers):
        out[f"trf_blocks_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return out


def convert_layout(params: Params, cfg: GPTConfig) -> Params:
    """Returns ``params`` in the layout ``cfg.scan_layers`` asks for, whichever layout they are in."""
    scanned = "trf_blocks" in params
    if cfg.scan_layers and not scanned:
        return stack_layers(params, cfg.n_layers)
    if not cfg.scan_layers and scanned:
        return unstack_layers(params)
    return params
