"""Book chapter 4: the GPT model, parameter initialisation and counting, and the book's greedy loop."""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.config import GPTConfig
from flaxgpt.initializers import dense, embedding_init
from flaxgpt.kv_cache import KVCache
from flaxgpt.layers import LayerNorm, TransformerBlock

Params = Any  # a nested dict of arrays

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_class(cfg: GPTConfig) -> type[nn.Module]:
    """TransformerBlock, wrapped in ``nn.remat`` and/or ``nn.scan`` as the config asks."""
    block: Any = TransformerBlock
    if cfg.remat != "none":
        # static_argnums counts self as 0: argument 2 is `deterministic`.
        block = nn.remat(block, policy=_REMAT_POLICIES[cfg.remat], static_argnums=(2,))
    if cfg.scan_layers:
        block = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast),  # deterministic, kv, index, offset
            length=cfg.n_layers,
        )
    return block


class GPTModel(nn.Module):
    """GPT: token + learned position embeddings, ``n_layers`` pre-LN blocks, final LayerNorm, linear head.

    Parameter names follow the book (``tok_emb``, ``pos_emb``, ``trf_blocks_N/{norm1,att,norm2,ff}``,
    ``final_norm``, ``out_head``); with ``cfg.scan_layers`` the blocks are one ``trf_blocks`` entry whose
    arrays have a leading layer axis. With ``cfg.tie_embeddings`` there is no ``out_head``: the logits
    use ``tok_emb``'s table.

    Call ``model.apply({"params": p}, idx, deterministic=True)`` for (B, T, vocab) float32 logits, or pass
    ``cache=`` (a :class:`flaxgpt.kv_cache.KVCache`) to get ``(logits, new_cache)`` for generation.
    """

    cfg: GPTConfig

    def setup(self) -> None:
        cfg = self.cfg
        emb = dict(
            features=cfg.emb_dim,
            embedding_init=embedding_init(cfg.init),
            dtype=cfg.compute_dtype,
            param_dtype=cfg.weight_dtype,
        )
        self.tok_emb = nn.Embed(cfg.vocab_size, **emb)
        self.pos_emb = nn.Embed(cfg.context_length, **emb)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        block = _block_class(cfg)
        if cfg.scan_layers:
            self.trf_blocks = block(cfg)
        else:
            self.trf_blocks = [block(cfg, name=f"trf_blocks_{i}") for i in range(cfg.n_layers)]
        self.final_norm = LayerNorm(cfg.ln_eps, cfg.weight_dtype)
        if not cfg.tie_embeddings:
            self.out_head = dense(
                cfg.vocab_size,
                cfg.emb_dim,
                use_bias=False,
                init=cfg.init,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype,
            )

    def __call__(
        self, idx: jax.Array, deterministic: bool = True, cache: KVCache | None = None
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Args:
          idx: (B, T) int token ids in [0, vocab_size) (validate on the host: see :func:`check_token_ids`).
          deterministic: disables dropout; otherwise pass ``rngs={"dropout": key}``.
          cache: a KV cache from ``init_cache(cfg, ...)`` for this config (its layout follows
            ``cfg.scan_layers``); the tokens are written at ``cache.index`` and the cache comes back
            advanced.

        Returns:
          (B, T, vocab_size) float32 logits, or ``(logits, cache)`` when a cache is given.
        """
        cfg = self.cfg
        b, t = idx.shape
        if t > cfg.context_length:
            raise ValueError(
                f"sequence length {t} exceeds the model's context_length {cfg.context_length}"
            )
        if cache is None:
            pos = jnp.arange(t)[None, :]  # (1, T)
            index = offset = None
        else:
            if isinstance(cache.k, (tuple, list)) == cfg.scan_layers:
                want = "stacked (L, ...) arrays" if cfg.scan_layers else "tuples of per-layer arrays"
                raise ValueError(
                    f"cache layout does not match scan_layers={cfg.scan_layers}: expected k/v as {want}; "
                    "build the cache with init_cache(cfg, ...) for this config"
                )
            index, offset = cache.index, cache.offset
            pos = jnp.maximum(index + jnp.arange(t)[None, :] - offset[:, None], 0)  # (B, T)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        x = self.drop_emb(x, deterministic=deterministic)

        if cfg.scan_layers:
            kv = None if cache is None else (cache.k, cache.v)  # (L, B, H, D, S), (L, B, H, S, D)
            x, kv = self.trf_blocks(x, deterministic, kv, index, offset)
        else:
            # The cache holds one array per layer: each layer updates its own slots in place, with no
            # restacking copy of the whole cache per step.
            new_k, new_v = [], []
            for i, block in enumerate(self.trf_blocks):
                layer_kv = None if cache is None else (cache.k[i], cache.v[i])  # (B, H, D, S), (B, H, S, D)
                x, layer_kv = block(x, deterministic, layer_kv, index, offset)
                if layer_kv is not None:
                    new_k.append(layer_kv[0])
                    new_v.append(layer_kv[1])
            kv = None if cache is None else (tuple(new_k), tuple(new_v))  # L x each

        x = self.final_norm(x)  # (B, T, C)
        if cfg.tie_embeddings:
            logits = self.tok_emb.attend(x)  # (B, T, V)
        else:
            logits = self.out_head(x)  # (B, T, V)
        logits = logits.astype(jnp.float32)
        if cache is None:
            return logits
        return logits, cache.replace(k=kv[0], v=kv[1], index=cache.index + t)


# --------------------------------------------------------------------------- parameters


@functools.partial(jax.jit, static_argnums=0)
def _init(cfg: GPTConfig, key: jax.Array) -> Params:
    return GPTModel(cfg).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def init_params(cfg: GPTConfig, key: jax.Array) -> Params:
    """Initialises a model's parameters in one compiled program (seconds even for gpt2-xl shapes).

    Args:
      cfg: the model config (its ``init`` field picks the scheme).
      key: a PRNG key.

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


# --------------------------------------------------------------------------- the book's greedy loop


def check_token_ids(ids: Any, vocab_size: int, name: str = "token ids") -> np.ndarray:
    """Validates token ids on the host (JAX's gather would silently clamp bad ones).

    Args:
      ids: an integer array-like.
      vocab_size: ids must lie in [0, vocab_size).
      name: what to call the ids in the error message.

    Returns:
      The ids as an int32 numpy array.
    """
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contain {bad}, outside the vocabulary [0, {vocab_size})")
    return arr.astype(np.int32)


@functools.partial(jax.jit, static_argnums=0)
def _last_logits(model: GPTModel, params: Params, idx: jax.Array, last: jax.Array) -> jax.Array:
    logits = model.apply({"params": params}, idx, deterministic=True)  # (B, T, V)
    return logits[:, last]  # (B, V)


def _bucket(t: int, limit: int) -> int:
    """Smallest power of two >= t (at least 8), capped at ``limit``."""
    return min(max(8, 1 << (t - 1).bit_length()), limit)


def generate_text_simple(
    model: GPTModel, params: Params, idx: Any, max_new_tokens: int, context_size: int
) -> jax.Array:
    """The book's greedy loop: crop to the last ``context_size`` tokens, take the argmax of the last
    position, append, repeat. No KV cache (see :func:`flaxgpt.generate.generate` for the fast path).

    The window is right-padded to a power-of-two bucket, so the forward compiles once per bucket rather
    than once per length; causal attention makes the padding invisible to the real positions.

    Args:
      model: the model.
      params: its parameters.
      idx: (B, T) token ids.
      max_new_tokens: tokens to append.
      context_size: the longest window fed to the model (<= the model's context_length).

    Returns:
      (B, T + max_new_tokens) int32 ids.
    """
    cfg = model.cfg
    idx = check_token_ids(idx, cfg.vocab_size)
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must have shape (B, T) with T >= 1, got {idx.shape}")
    if not 0 < context_size <= cfg.context_length:
        raise ValueError(f"context_size must be in [1, {cfg.context_length}], got {context_size}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for _ in range(max_new_tokens):
        window = idx[:, -context_size:]  # (B, t)
        t = window.shape[1]
        padded = np.zeros((idx.shape[0], _bucket(t, context_size)), np.int32)  # (B, bucket)
        padded[:, :t] = window
        logits = _last_logits(model, params, jnp.asarray(padded), jnp.int32(t - 1))  # (B, V)
        next_id = np.asarray(jnp.argmax(logits, axis=-1), np.int32)  # (B,)
        idx = np.concatenate([idx, next_id[:, None]], axis=1)
    return jnp.asarray(idx)


def forward(model: GPTModel, params: Params, idx: Sequence[Sequence[int]] | Any) -> jax.Array:
    """Validated, deterministic forward pass: (B, T) ids -> (B, T, V) float32 logits.

    Args:
      model: the model.
      params: its parameters.
      idx: (B, T) token ids.

    Returns:
      The logits.
    """
    idx = check_token_ids(idx, model.cfg.vocab_size)
    if idx.ndim != 2:
        raise ValueError(f"idx must have shape (B, T), got {idx.shape}")
    return _forward(model, params, jnp.asarray(idx))


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: GPTModel, params: Params, idx: jax.Array) -> jax.Array:
    return model.apply({"params": params}, idx, deterministic=True)
