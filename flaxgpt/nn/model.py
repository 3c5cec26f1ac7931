"""Book chapter 4: the GPT model (token + position embeddings, pre-LN blocks, final norm, head)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxgpt.config import GPTConfig
from flaxgpt.nn.initializers import dense, embedding_init
from flaxgpt.nn.kv_cache import KVCache
from flaxgpt.nn.layers import LayerNorm, TransformerBlock
from flaxgpt.validation import check_token_ids

__all__ = ["GPTModel", "Params", "forward", "check_token_ids"]

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
