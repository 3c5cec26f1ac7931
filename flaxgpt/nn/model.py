"""Book chapter 4: the GPT model (token + position embeddings, pre-LN blocks, final norm, head)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.config import GPTConfig
from flaxgpt.nn.initializers import dense, embedding_init
from flaxgpt.nn.kv_cache import KVCache
from flaxgpt.nn.layers import LayerNorm, TransformerBlock
from flaxgpt.nn.matmul import int8_matmul, tied_logits
from flaxgpt.validation import check_token_ids, is_concrete

__all__ = ["GPTModel", "Params", "Positions", "forward", "check_token_ids"]

Params = Any  # a nested dict of arrays
# Which positions the model returns: "all", "last", or a (B,) / (B, K) int array of positions.
Positions = Any

# flaxgpt.nn.quant's variable collection, and its entry for a tied head's int8 table.
INT8, INT8_HEAD = "int8", "tied_head"

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
            variable_axes={"params": 0, "lora": 0},  # lora: flaxgpt.nn.lora adapters
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
    ``cache=`` (a :class:`flaxgpt.nn.kv_cache.KVCache`) to get ``(logits, new_cache)`` for generation.
    ``positions="last"`` (or an array of positions) gives the logits of those positions only, and
    ``return_hidden=True`` the final hidden states, for heads that take e.g. ``hidden[:, -1]``::

        last = model.apply({"params": p}, idx, positions="last")  # (B, V)
        h = model.apply({"params": p}, idx, positions="last", return_hidden=True)  # (B, C)
        logits = model.apply({"params": p}, h, method=GPTModel.logits_from_hidden)  # (B, V)
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
            classifier = cfg.num_classes is not None  # book ch. 6: nn.Linear(emb_dim, num_classes), with bias
            self.out_head = dense(
                cfg.num_classes if classifier else cfg.vocab_size,
                cfg.emb_dim,
                use_bias=classifier,
                init=cfg.init,
                dtype=cfg.compute_dtype,
                param_dtype=cfg.weight_dtype,
            )

    def __call__(
        self,
        idx: jax.Array,
        deterministic: bool = True,
        cache: KVCache | None = None,
        *,
        positions: Positions = "all",
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, KVCache]:
        """Args:
          idx: (B, T) int token ids in [0, vocab_size). Concrete ids (NumPy or a committed JAX array) are
            checked on the host before any compute (:func:`check_token_ids`); traced ids (inside ``jit``)
            are assumed valid.
          deterministic: disables dropout; otherwise pass ``rngs={"dropout": key}``.
          cache: a KV cache from ``init_cache(cfg, ...)`` for this config (its layout follows
            ``cfg.scan_layers``); the tokens are written at ``cache.index`` and the cache comes back
            advanced.
          positions: which positions to return: "all" (B, T, ...), "last" (B, ...), a (B,) int array
            (one position per row: (B, ...)) or a (B, K) int array (K per row: (B, K, ...)), positions
            in [0, T). Only the chosen positions go through the final norm and the output head, so
            "last" never builds (B, T, V) logits.
          return_hidden: return the final hidden states (after ``final_norm``, width ``emb_dim``, compute
            dtype) instead of logits; :meth:`logits_from_hidden` turns them into logits.

        Returns:
          float32 logits, (B, T, vocab_size) by default (shaped by ``positions``), or the hidden states
          when ``return_hidden``; ``(output, cache)`` when a cache is given.
        """
        cfg = self.cfg
        b, t = idx.shape
        if t > cfg.context_length:
            raise ValueError(
                f"sequence length {t} exceeds the model's context_length {cfg.context_length}"
            )
        if is_concrete(idx) and not self.is_initializing():
            check_token_ids(idx, cfg.vocab_size)
        positions = _check_positions(positions, b, t)
        if cache is not None:
            _check_cache_layout(cache, cfg.scan_layers)
        x, kv = self._trunk(idx, deterministic, cache)  # (B, T, C)
        x = self.final_norm(_select(x, positions))  # (B, T|K, C) or (B, C)
        out = x if return_hidden else self.logits_from_hidden(x)
        if return_hidden and self.is_initializing():
            self.logits_from_hidden(x)  # create the head's parameters too
        if cache is None:
            return out
        return out, cache.replace(k=kv[0], v=kv[1], index=cache.index + t)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """The output head: final hidden states (..., C) -> (..., vocab_size) float32 logits.

        Use it as ``model.apply({"params": p}, hidden, method=GPTModel.logits_from_hidden)`` on the
        output of ``return_hidden=True`` (tied configs use ``tok_emb``'s table).
        """
        if self.cfg.tie_embeddings and self.has_variable(INT8, INT8_HEAD):  # int8 weights (flaxgpt.nn.quant)
            head = self.get_variable(INT8, INT8_HEAD)
            logits = int8_matmul(hidden, head["q"], head["scale"])  # (..., V)
        elif self.cfg.tie_embeddings:
            logits = tied_logits(hidden, self.tok_emb.embedding, self.cfg.compute_dtype)  # (..., V)
        else:
            logits = self.out_head(hidden)  # (..., V)
        return logits.astype(jnp.float32)

    def _trunk(
        self, idx: jax.Array, deterministic: bool, cache: KVCache | None
    ) -> tuple[jax.Array, Any]:
        """Embeddings and blocks: (B, T) ids -> (B, T, C) before the final norm, and the new (k, v)."""
        cfg = self.cfg
        t = idx.shape[1]
        if cache is None:
            pos = jnp.arange(t)[None, :]  # (1, T)
            index = offset = None
        else:
            index, offset = cache.index, cache.offset
            pos = jnp.maximum(index + jnp.arange(t)[None, :] - offset[:, None], 0)  # (B, T)
        x = self.tok_emb(idx) + self.pos_emb(pos)  # (B, T, C)
        x = self.drop_emb(x, deterministic=deterministic)

        if cfg.scan_layers:
            kv = None if cache is None else (cache.k, cache.v)  # (L, B, H, D, S), (L, B, H, S, D)
            x, kv = self.trf_blocks(x, deterministic, kv, index, offset)
            return x, kv
        # The cache holds one array per layer: each layer updates its own slots in place, with no
        # restacking copy of the whole cache per step.
        new_k, new_v = [], []
        for i, block in enumerate(self.trf_blocks):
            layer_kv = None if cache is None else (cache.k[i], cache.v[i])  # (B, H, D, S), (B, H, S, D)
            x, layer_kv = block(x, deterministic, layer_kv, index, offset)
            if layer_kv is not None:
                new_k.append(layer_kv[0])
                new_v.append(layer_kv[1])
        return x, (None if cache is None else (tuple(new_k), tuple(new_v)))  # L x each


def _check_cache_layout(cache: KVCache, scan_layers: bool) -> None:
    if isinstance(cache.k, (tuple, list)) == scan_layers:
        want = "stacked (L, ...) arrays" if scan_layers else "tuples of per-layer arrays"
        raise ValueError(
            f"cache layout does not match scan_layers={scan_layers}: expected k/v as {want}; "
            "build the cache with init_cache(cfg, ...) for this config"
        )


def _check_positions(positions: Positions, b: int, t: int) -> Positions:
    """Validates ``positions`` (values only when concrete); returns "all", "last" or an int array."""
    if isinstance(positions, str):
        if positions not in ("all", "last"):
            raise ValueError(f'positions must be "all", "last" or an int array, got {positions!r}')
        return positions
    shape = getattr(positions, "shape", None)
    if shape is None:
        positions = np.asarray(positions)
        shape = positions.shape
    if len(shape) not in (1, 2) or shape[0] != b:
        raise ValueError(f"positions must have shape (B,) or (B, K) with B={b}, got {tuple(shape)}")
    if not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be integers, got dtype {positions.dtype}")
    if is_concrete(positions) and positions.size:
        arr = np.asarray(positions)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= t:
            raise ValueError(f"positions contain {lo if lo < 0 else hi}, outside [0, {t}) for T={t}")
    return positions


def _select(x: jax.Array, positions: Positions) -> jax.Array:
    """(B, T, C) -> the chosen positions: (B, T, C), (B, C) or (B, K, C)."""
    if isinstance(positions, str):
        return x if positions == "all" else x[:, -1]  # (B, T, C) or (B, C)
    pos = jnp.asarray(positions, jnp.int32)
    if pos.ndim == 1:
        return jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]  # (B, C)
    return jnp.take_along_axis(x, pos[:, :, None], axis=1)  # (B, K, C)


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
