"""LoRA (book appendix E): low-rank adapters kept as their own parameter tree beside the untouched base.

A target linear layer ``y = x W + b`` (``W`` of shape (in, out)) becomes
``y = x W + b + (alpha / rank) * dropout(x) A B`` with ``A`` (in, rank) and ``B`` (rank, out). ``A`` is
drawn as the book's ``torch.nn.init.kaiming_uniform_(A, a=sqrt(5))`` on an (in, rank) tensor, whose fan-in is
``rank``: U(-1/sqrt(rank), 1/sqrt(rank)); ``B`` starts at zero, so a fresh adapter changes nothing. The scaling
is ``alpha / rank``, as the book's current code (its first printing multiplied by ``alpha`` alone; with the
book's rank 16 and alpha 16 the two differ by a factor of 16).

Nothing in the model changes: the adapters are data. :class:`LoRA` holds them, nested by layer path as the
parameters are (``trf_blocks_0/att/W_query/{A, B}``; a leading layer axis in the scanned layout), with
``alpha`` and ``dropout`` as static fields. :func:`lora_apply` runs the plain :class:`GPTModel` with the
adapters as a second variable collection and adds their term to each target layer's output (a Flax method
interceptor on ``nn.Dense``); :func:`merge_lora` folds them into plain parameters (``W + scale * A B``) that
every other part of flaxgpt (generation, converters, ``save_pretrained``) takes as they are.

Targets are regular expressions searched in a layer's '/'-joined path (``"W_query|W_value"``,
``"trf_blocks_11/"``), or a preset: "all" (every linear layer: Q, K, V, the attention output, both
feed-forward layers and the head, the book's choice), "attention", "feed_forward".
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from flaxgpt.nn.model import GPTModel
from flaxgpt.pytree import unflatten_dict
from flaxgpt.validation import check_int, check_number

__all__ = [
    "LoRA",
    "LORA_TARGETS",
    "LoRAApply",
    "linear_layers",
    "target_layers",
    "init_lora",
    "check_lora",
    "lora_apply",
    "merge_lora",
    "lora_train_params",
    "is_lora_train_params",
    "inference_params",
]

Params = Any
COLLECTION = "lora"  # the variable collection the adapters are passed in
LORA_TARGETS: dict[str, str] = {
    "all": "",  # every linear layer (the book's replace_linear_with_lora)
    "attention": r"att/(W_query|W_key|W_value|out_proj)$",
    "feed_forward": r"ff/(fc1|fc2)$",
}


@flax.struct.dataclass
class LoRA:
    """Low-rank adapters: ``adapters`` (a pytree, the trainable leaves) and the static ``alpha``, ``dropout``.

    Attributes:
      adapters: ``{layer path...: {"A": (in, r), "B": (r, out)}}`` nested as the params (leading (L,) axis on
        both in the scanned layout).
      alpha: the LoRA alpha; the adapter term is scaled by ``alpha / rank``.
      dropout: dropout rate on the adapter's input (training only; 0 in the book).
    """

    adapters: dict[str, Any]
    alpha: float = flax.struct.field(pytree_node=False)
    dropout: float = flax.struct.field(pytree_node=False, default=0.0)

    @property
    def layers(self) -> dict[str, dict[str, Any]]:
        """``{"trf_blocks_0/att/W_query": {"A": ..., "B": ...}, ...}``."""
        return dict(_find_layers(self.adapters, "A"))

    @property
    def rank(self) -> int:
        """The adapters' rank (the last axis of ``A``)."""
        return int(next(iter(self.layers.values()))["A"].shape[-1])

    @property
    def scale(self) -> float:
        """``alpha / rank``, the factor on ``x A B``."""
        return float(self.alpha) / self.rank


def _find_layers(tree: Mapping[str, Any], leaf: str, prefix: str = "") -> list[tuple[str, Mapping[str, Any]]]:
    """(path, node) of every dict node holding ``leaf``, depth first in key order."""
    out = []
    for k in sorted(tree):
        v = tree[k]
        if not isinstance(v, Mapping):
            continue
        path = f"{prefix}{k}"
        if leaf in v and not isinstance(v[leaf], Mapping):
            out.append((path, v))
        else:
            out.extend(_find_layers(v, leaf, path + "/"))
    return out


def linear_layers(params: Params) -> dict[str, tuple[int, ...]]:
    """The linear layers of a params tree and their kernel shapes.

    Args:
      params: a GPT params tree (arrays or ``jax.eval_shape`` leaves), either layout.

    Returns:
      ``{"trf_blocks_0/att/W_query": (in, out), ...}``; (L, in, out) in the scanned layout.
    """
    return {path: tuple(node["kernel"].shape) for path, node in _find_layers(params, "kernel")}


def target_layers(params: Params, targets: str | Sequence[str] = "all") -> list[str]:
    """The paths of the linear layers that ``targets`` selects.

    Args:
      params: the base params.
      targets: a preset name (:data:`LORA_TARGETS`) or a list of regular expressions searched in each
        layer's path (a string holding "," is split into such a list).

    Returns:
      The selected layer paths, sorted.

    Raises:
      ValueError: an unknown preset, a bad regular expression, a pattern that selects no layer.
    """
    layers = sorted(linear_layers(params))
    if isinstance(targets, str) and targets in LORA_TARGETS:
        patterns = [LORA_TARGETS[targets]]
    elif isinstance(targets, str):
        patterns = [p for p in targets.split(",") if p]
    else:
        patterns = list(targets)
    if not patterns or not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"LoRA targets must be one of {sorted(LORA_TARGETS)} or path patterns, got {targets!r}")
    chosen: set[str] = set()
    for p in patterns:
        try:
            rx = re.compile(p)
        except re.error as e:
            raise ValueError(f"LoRA target {p!r} is not a regular expression: {e}") from e
        hits = [name for name in layers if rx.search(name)]
        if not hits:
            raise ValueError(f"LoRA target {p!r} matches no linear layer (they look like {layers[:3]}; the presets "
                             f"are {sorted(LORA_TARGETS)})")
        chosen.update(hits)
    return sorted(chosen)


def init_lora(
    params: Params,
    key: jax.Array,
    *,
    rank: int = 16,
    alpha: float = 16.0,
    targets: str | Sequence[str] = "all",
    dropout: float = 0.0,
    dtype: Any = jnp.float32,
) -> LoRA:
    """Fresh adapters for the target layers of ``params``: ``A`` as the book, ``B`` zero.

    Args:
      params: the base params (arrays or ``jax.eval_shape`` leaves: with the latter, call this inside
        ``jax.eval_shape`` too, e.g. to count full-size adapters without allocating them).
      key: PRNG key; layer ``i`` of the sorted target list draws from ``fold_in(key, i)``.
      rank: the rank r (the book: 16).
      alpha: the LoRA alpha (the book: 16); the scaling is ``alpha / rank``.
      targets: see :func:`target_layers` (the book: "all").
      dropout: dropout rate on the adapter input, in [0, 1).
      dtype: the adapters' dtype (float32 by default, whatever the base's).

    Returns:
      The adapters.
    """
    rank = check_int("rank", rank, 1)
    alpha = check_number("alpha", alpha, 0.0, open_low=True)
    dropout = check_number("dropout", dropout, 0.0, 1.0)
    if dropout == 1.0:
        raise ValueError("dropout must be < 1 (1 drops every adapter input)")
    shapes = linear_layers(params)
    bound = 1.0 / math.sqrt(rank)  # kaiming_uniform_(a=sqrt(5)) with fan_in = rank
    flat = {}
    for i, path in enumerate(target_layers(params, targets)):
        *lead, d_in, d_out = shapes[path]
        a = jax.random.uniform(jax.random.fold_in(key, i), (*lead, d_in, rank), dtype, -bound, bound)
        flat[f"{path}/A"] = a  # (L?, in, r)
        flat[f"{path}/B"] = jnp.zeros((*lead, rank, d_out), dtype)  # (L?, r, out)
    return LoRA(unflatten_dict(flat), alpha=float(alpha), dropout=float(dropout))


def check_lora(params: Params, lora: LoRA) -> None:
    """Checks that every adapter fits a linear layer of ``params`` (works on shapes only, also under ``jit``).

    Args:
      params: the base params.
      lora: the adapters.

    Raises:
      ValueError: an adapter for a layer the params lack, a shape that does not fit, ranks that differ.
    """
    if not isinstance(lora, LoRA):
        raise ValueError(f"expected a flaxgpt LoRA, got {type(lora).__name__}")
    shapes = linear_layers(params)
    layers = lora.layers
    if not layers:
        raise ValueError("the LoRA holds no adapters")
    rank = lora.rank
    for path, ab in layers.items():
        if path not in shapes:
            raise ValueError(
                f"LoRA adapter {path!r} has no linear layer in the base params (layers: {sorted(shapes)[:4]}...; "
                "another model or layer layout?)"
            )
        *lead, d_in, d_out = shapes[path]
        want_a, want_b = (*lead, d_in, rank), (*lead, rank, d_out)
        if set(ab) != {"A", "B"} or tuple(ab["A"].shape) != want_a or tuple(ab["B"].shape) != want_b:
            got = {k: tuple(v.shape) for k, v in ab.items()}
            raise ValueError(
                f"LoRA adapter {path!r} does not fit the base layer {tuple(shapes[path])}: got {got}, expected "
                f"A {want_a} and B {want_b}"
            )


def _interceptor(lora: LoRA, deterministic: bool) -> Any:
    """A Flax method interceptor adding ``scale * dropout(x) A B`` to each adapted ``nn.Dense``'s output."""
    scale, rate = lora.scale, lora.dropout

    def intercept(next_fun: Any, args: tuple[Any, ...], kwargs: dict[str, Any], context: Any) -> Any:
        mod = context.module
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(mod, nn.Dense) or not mod.has_variable(COLLECTION, "A"):
            return y
        x = args[0]  # (..., in)
        a = mod.get_variable(COLLECTION, "A").astype(x.dtype)  # (in, r)
        b = mod.get_variable(COLLECTION, "B").astype(x.dtype)  # (r, out)
        if rate > 0.0 and not deterministic:
            keep = jax.random.bernoulli(mod.make_rng("dropout"), 1.0 - rate, x.shape)
            x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in): 2-D dots, cheaper to differentiate on XLA:CPU than batched
        delta = ((x2 @ a) @ b).reshape(*x.shape[:-1], b.shape[-1])  # (..., out)
        return y + (scale * delta).astype(y.dtype)

    return intercept


def lora_apply(model: GPTModel, params: Params, lora: LoRA, *args: Any, **kwargs: Any) -> Any:
    """``model.apply`` with the adapters: the base params untouched, the adapter term added to each target.

    Args:
      model: the plain model.
      params: its base params.
      lora: adapters for these params (checked: :func:`check_lora`).
      *args: ``model.apply``'s positional arguments after the variables (``idx``, ``deterministic``, ...).
      **kwargs: its keyword arguments (``deterministic``, ``rngs``, ``positions``, ``method``, ...); LoRA
        dropout, when set, draws from the "dropout" stream of ``rngs`` when not ``deterministic``.

    Returns:
      What ``model.apply`` returns.
    """
    check_lora(params, lora)
    deterministic = kwargs.get("deterministic", args[1] if len(args) > 1 else True)
    with nn.intercept_methods(_interceptor(lora, bool(deterministic))):
        return model.apply({"params": params, COLLECTION: lora.adapters}, *args, **kwargs)


def merge_lora(params: Params, lora: LoRA) -> Params:
    """Plain parameters with the adapters folded in: ``kernel + (alpha / rank) * A B`` on each target.

    The result has the base's structure and dtypes and runs on the plain model (no LoRA dropout: that is a
    training-time regulariser); its logits equal :func:`lora_apply`'s up to float rounding.

    Args:
      params: the base params.
      lora: the adapters.

    Returns:
      A new params tree (the base is not modified).
    """
    check_lora(params, lora)
    out = jax.tree.map(lambda x: x, params)  # a new tree of the same leaves

    for path, ab in lora.layers.items():
        node = out
        for k in path.split("/"):
            node = node[k]
        kernel = node["kernel"]
        delta = jnp.matmul(ab["A"].astype(jnp.float32), ab["B"].astype(jnp.float32))  # (L?, in, out)
        node["kernel"] = (kernel.astype(jnp.float32) + lora.scale * delta).astype(kernel.dtype)
    return out


@dataclasses.dataclass(frozen=True)
class LoRAApply:
    """The ``apply_fn`` of a LoRA train state: takes ``{"params": {"base": ..., "lora": LoRA}}`` as
    :func:`lora_train_params` builds, and runs :func:`lora_apply`. Hashable (a static field of the state)."""

    model: GPTModel

    def __call__(self, variables: Mapping[str, Any], *args: Any, **kwargs: Any) -> Any:
        p = variables["params"]
        return lora_apply(self.model, p["base"], p["lora"], *args, **kwargs)


def lora_train_params(params: Params, lora: LoRA) -> dict[str, Any]:
    """The params of a LoRA train state: ``{"base": params, "lora": lora}`` (the base is frozen there).

    Args:
      params: the base params.
      lora: the adapters.

    Returns:
      The combined tree (checked).
    """
    check_lora(params, lora)
    return {"base": params, "lora": lora}


def is_lora_train_params(params: Any) -> bool:
    """True for a tree built by :func:`lora_train_params`."""
    return isinstance(params, Mapping) and set(params) == {"base", "lora"} and isinstance(params["lora"], LoRA)


def inference_params(params: Any) -> Params:
    """Plain params for the plain model: the adapters merged into a LoRA train state's params, or
    ``params`` as they are.

    Args:
      params: plain params or :func:`lora_train_params` output.

    Returns:
      Plain params.
    """
    return merge_lora(params["base"], params["lora"]) if is_lora_train_params(params) else params
