"""Book chapter 5.3, compiled: text generation as one XLA program per shape bucket.

:func:`generate` left-pads the prompts to a bucket length, prefills them in one forward pass into a
preallocated :class:`flaxgpt.nn.kv_cache.KVCache`, then decodes one token per step inside a single jitted
``lax.while_loop`` (no Python loop over tokens, no growing arrays).

What compiles: one program per (model config, parameter shapes/dtypes, batch size, prompt bucket,
new-token bucket). Prompt buckets are powers of two >= 8 (capped at ``context_length``); new-token buckets are
8, 12, 16, 24, 32, 48, ... (powers of two and 1.5x powers of two, capped at ``context_length``). The
actual prompt lengths, ``max_new_tokens`` within its bucket, ``temperature``, ``top_k``, ``top_p``,
``eos_id`` and ``key`` are traced values: changing them reuses the compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.generation.buckets import new_tokens_bucket, prompt_bucket
from flaxgpt.generation.sampling import check_sampling, sample_next, sampling_args
from flaxgpt.nn.kv_cache import KVCache, init_cache
from flaxgpt.nn.model import GPTModel, Params
from flaxgpt.nn.params import unstack_layers
from flaxgpt.nn.quant import Int8Params, int8_apply
from flaxgpt.validation import check_int, check_language_model, check_token_ids

__all__ = ["left_pad", "prefill", "decode_step", "generate"]

_PAD_ID = 0  # token id of the left padding (masked out, so any valid id works)


# --------------------------------------------------------------------------- buckets and padding


def left_pad(prompts: Sequence[np.ndarray], context_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads prompts to one bucket length so that every row's last token sits in the last column.

    Args:
      prompts: B non-empty 1-D int token id arrays, each at most ``context_length`` long.
      context_length: the model's context length (caps the bucket).

    Returns:
      ``(idx, offset)``: (B, Tb) int32 padded ids and (B,) int32 first real column of each row.
    """
    lengths = [len(p) for p in prompts]
    tb = prompt_bucket(max(lengths), context_length)
    idx = np.full((len(prompts), tb), _PAD_ID, np.int32)  # (B, Tb)
    for row, p in zip(idx, prompts):
        row[tb - len(p) :] = p
    offset = np.asarray([tb - n for n in lengths], np.int32)  # (B,)
    return idx, offset


# --------------------------------------------------------------------------- the compiled decode


def prefill(
    model: GPTModel, params: Params, idx: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Runs the padded prompts through the model in one pass, filling the cache.

    Args:
      model: the model.
      params: its parameters (or int8 weights: :func:`flaxgpt.nn.quant.quantize_int8`).
      idx: (B, Tb) left-padded prompt ids (see :func:`left_pad`).
      cache: an empty cache whose ``offset`` marks each row's first real column.

    Returns:
      (B, V) float32 logits of every row's last prompt token, and the cache advanced by Tb.
    """
    # Only the last column goes through the head: no (B, Tb, V) logits are built.
    return _apply(model, params, idx, deterministic=True, cache=cache, positions="last")  # (B, V)


def decode_step(
    model: GPTModel, params: Params, tokens: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """Feeds one token per row at slot ``cache.index``.

    Args:
      model: the model.
      params: its parameters (or int8 weights: :func:`flaxgpt.nn.quant.quantize_int8`).
      tokens: (B,) int32 ids.
      cache: the cache so far.

    Returns:
      (B, V) float32 logits of the next token, and the cache advanced by one.
    """
    return _apply(model, params, tokens[:, None], deterministic=True, cache=cache, positions="last")  # (B, V)


def _apply(model: GPTModel, params: Params | Int8Params, *args: Any, **kwargs: Any) -> Any:
    """``model.apply`` on float params, or on int8 weights (:func:`flaxgpt.nn.quant.int8_apply`)."""
    if isinstance(params, Int8Params):
        return int8_apply(model, params, *args, **kwargs)
    return model.apply({"params": params}, *args, **kwargs)


@functools.partial(jax.jit, static_argnames=("model", "slots", "emit"))
def _generate_compiled(
    model: GPTModel,
    params: Params,
    idx: jax.Array,
    offset: jax.Array,
    n_new: jax.Array,
    temperature: jax.Array,
    top_k: jax.Array,
    top_p: jax.Array,
    eos_id: jax.Array,
    key: jax.Array,
    tag: jax.Array | None = None,
    *,
    slots: int,
    emit: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """Prefill plus a ``lax.while_loop`` of decode steps. Returns (B, slots) new ids, ``eos_id`` (or 0
    without one) after a row stops and in the unused slots.

    ``emit`` (static; None for plain generation) is traced into the program as ``emit(tag, step, tok)``
    after every step's (B,) tokens are picked; it returns a bool scalar that, when true, stops every
    row (see :mod:`flaxgpt.generation.stream`, which emits through a host callback)."""
    b, tb = idx.shape
    if model.cfg.scan_layers:
        # Decode unrolled: a scanned model's stacked (L, ...) cache is sliced and written back per layer
        # and token (copies that made decoding 1.9x slower on CPU); the parameters are split here instead.
        model = model.clone(cfg=model.cfg.replace(scan_layers=False))
        if not isinstance(params, Int8Params):  # quantize_int8 already gives the unrolled layout
            params = unstack_layers(params)
    cache = init_cache(model.cfg, b, tb + slots, offset)  # k, v: per-layer keys (B, H, D, S) and values (B, H, S, D); see init_cache
    logits, cache = prefill(model, params, idx, cache)  # (B, V)

    def pick(logits: jax.Array, step: jax.Array, done: jax.Array) -> tuple[jax.Array, jax.Array]:
        tok = sample_next(logits, jax.random.fold_in(key, step), temperature, top_k, top_p)  # (B,)
        tok = jnp.where(done, eos_id, tok)  # finished rows repeat eos_id
        done = done | (tok == eos_id)
        if emit is not None:
            done = done | emit(tag, step, tok)  # the host asked to stop: ends the loop
        return tok, done

    tok, done = pick(logits, jnp.int32(0), jnp.zeros((b,), bool))
    out = jnp.full((b, slots), jnp.maximum(eos_id, 0), jnp.int32)  # (B, slots)
    out = out.at[:, 0].set(tok)

    def cond(state: tuple) -> jax.Array:
        step, _, _, _, done = state
        return (step < n_new) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, out, cache, tok, done = state
        logits, cache = decode_step(model, params, tok, cache)  # (B, V)
        tok, done = pick(logits, step, done)
        out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))  # (B, slots)
        return step + 1, out, cache, tok, done

    state = (jnp.int32(1), out, cache, tok, done)
    _, out, _, _, _ = jax.lax.while_loop(cond, body, state)
    return out


# --------------------------------------------------------------------------- the public entry point


def _parse_prompt(prompt: Any, vocab_size: int) -> tuple[list[np.ndarray], str]:
    """Returns the prompt rows as int32 arrays and the prompt kind: "1d", "2d" or "list"."""
    if isinstance(prompt, (list, tuple)) and prompt and np.ndim(prompt[0]) > 0:
        rows = []
        for i, p in enumerate(prompt):
            arr = np.asarray(p)
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(f"prompt {i} must be a non-empty 1-D sequence of ids, got shape {arr.shape}")
            rows.append(check_token_ids(arr, vocab_size, f"prompt {i} token ids"))
        return rows, "list"
    arr = np.asarray(prompt)
    if arr.ndim not in (1, 2):
        raise ValueError(
            f"prompt must be a 1-D sequence, a 2-D (B, T) array or a list of sequences, got shape {arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(f"prompt is empty (shape {arr.shape}); give at least one token per row")
    arr = check_token_ids(arr, vocab_size, "prompt token ids")
    return (list(arr) if arr.ndim == 2 else [arr]), f"{arr.ndim}d"


def _as_key(key: Any) -> jax.Array:
    """A typed PRNG key from a typed or raw (uint32) key."""
    if not isinstance(key, jax.Array):
        raise ValueError(f"key must be a jax.random.key or jax.random.PRNGKey, got {type(key).__name__}")
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.dtype != jnp.uint32 or key.ndim != 1:
            raise ValueError(f"key must be a single PRNG key, got dtype {key.dtype} and shape {key.shape}")
        key = jax.random.wrap_key_data(key)
    if key.shape != ():
        raise ValueError(f"key must be a single PRNG key, got a batch of shape {key.shape}")
    return key


def _check_generate_args(
    model: GPTModel,
    prompt: Any,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_id: int | None,
    key: jax.Array | None,
) -> tuple[list[np.ndarray], str, int, int, jax.Array]:
    """Host-side checks of :func:`generate`'s arguments (see there for the errors).

    Returns:
      ``(rows, kind, max_new_tokens, eos, key)``: the prompt rows as int32 arrays, the prompt kind
      ("1d", "2d" or "list"), the checked token count, the EOS id (-1 for none) and a typed key.
    """
    cfg = model.cfg
    check_language_model(cfg)
    rows, kind = _parse_prompt(prompt, cfg.vocab_size)
    n = check_int("max_new_tokens", max_new_tokens, 0)
    eos = -1 if eos_id is None else check_int("eos_id", eos_id, 0, cfg.vocab_size)
    check_sampling(temperature, top_k, top_p)
    if float(temperature) > 0.0 and key is None:
        raise ValueError(
            f"sampling with temperature={temperature} needs a PRNG key: pass key=jax.random.key(seed)"
        )
    key = jax.random.key(0) if key is None else _as_key(key)
    longest = max(len(r) for r in rows)
    if longest + n > cfg.context_length:
        fixes = [f"shorten the prompt to its last {cfg.context_length - n} tokens"] if n < cfg.context_length else []
        if longest < cfg.context_length:
            fixes.append(f"ask for at most {cfg.context_length - longest} new tokens")
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens={n} exceeds the model's context_length "
            f"{cfg.context_length}; " + " or ".join(fixes or ["use a model with a longer context"])
        )
    return rows, kind, n, eos, key


def _run_decode(
    model: GPTModel,
    params: Params,
    rows: list[np.ndarray],
    n: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos: int,
    key: jax.Array,
    *,
    tag: np.ndarray | None = None,
    emit: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> np.ndarray:
    """Runs the compiled decode on checked arguments (see :func:`_check_generate_args`).

    Returns:
      (B, n) int32 new ids, ``eos`` (or 0 without one) from a row's EOS on.
    """
    cfg = model.cfg
    if n == 0:
        return np.zeros((len(rows), 0), np.int32)
    idx, offset = left_pad(rows, cfg.context_length)  # (B, Tb), (B,)
    t, k, p = sampling_args(temperature, top_k, top_p, cfg.vocab_size)
    out = _generate_compiled(
        model,
        params,
        idx,
        offset,
        np.int32(n),
        t,
        k,
        p,
        np.int32(eos),
        key,
        tag,
        slots=new_tokens_bucket(n, cfg.context_length),
        emit=emit,
    )  # (B, slots)
    return np.asarray(out)[:, :n]  # (B, n)


def generate(
    model: GPTModel,
    params: Params,
    prompt: Any,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    key: jax.Array | None = None,
) -> jax.Array | list[jax.Array]:
    """Generates up to ``max_new_tokens`` tokens after each prompt with a KV cache, in one compiled loop.

    Args:
      model: the model (its ``cfg`` fixes vocabulary and context length; parameters must be in the
        layout its ``cfg.scan_layers`` expects).
      params: its parameters, or int8 weights from :func:`flaxgpt.nn.quant.quantize_int8` (faster
        batch-1 decoding; see there).
      prompt: token ids: a 1-D sequence (one prompt), a 2-D (B, T) array, or a Python list of 1-D
        sequences of any lengths (a ragged batch, left-padded internally: greedy rows come out as if
        generated alone; sampled rows draw their own noise, row 0 as a lone prompt would).
      max_new_tokens: tokens to add, >= 0; prompt + new tokens must fit in ``context_length`` (no
        silent cropping of the context, unlike the book's loop: crop the prompt yourself).
      temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
      top_k: keep only logits >= the k-th largest (None, or k >= vocab_size: no filter).
      top_p: nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
        ``top_p`` (None: no filter). Applied after temperature and top-k.
      eos_id: a row stops when it draws this id, which is not included in its output; the loop ends
        when every row has stopped.
      key: PRNG key, required when ``temperature > 0``; row b of step s draws with
        ``fold_in(fold_in(key, s), b)``, so the same key gives the same output.

    Returns:
      For a 1-D prompt, a 1-D array: prompt + new tokens, cut before EOS. For a 2-D prompt, a
      (B, T + max_new_tokens) array with ``eos_id`` in every position from a row's EOS on. For a list,
      a list of 1-D arrays as for a 1-D prompt.

    Raises:
      ValueError: before any compute, on an empty prompt, ids outside the vocabulary, prompt +
        max_new_tokens > context_length, or bad sampling settings or key.
    """
    rows, kind, n, eos, key = _check_generate_args(
        model, prompt, max_new_tokens, temperature, top_k, top_p, eos_id, key
    )
    new = _run_decode(model, params, rows, n, temperature, top_k, top_p, eos, key)  # (B, n)

    if kind == "2d":
        return jax.device_put(np.concatenate([np.stack(rows), new], axis=1))  # (B, T + n)
    results = []
    for row, gen in zip(rows, new):
        if eos >= 0 and np.any(gen == eos):
            gen = gen[: int(np.argmax(gen == eos))]
        results.append(jax.device_put(np.concatenate([row, gen])))  # (jnp.asarray would compile per shape)
    return results[0] if kind == "1d" else results
