"""Table-driven weight mapping between flaxgpt's params tree and a flat dict of named tensors.

A format (Hugging Face GPT-2 in :mod:`flaxgpt.io.hf`, the book's PyTorch names in
:mod:`flaxgpt.io.book`) is a list of :class:`TensorSpec`: an external tensor name and shape and
where it lives in the params tree. :func:`import_tensors` checks every name and shape first (one
``ValueError`` listing each missing, unexpected or wrongly shaped tensor), then reads and places each
tensor once, straight into the layout ``cfg.scan_layers`` asks for, refusing NaN and inf unless told
otherwise. :func:`export_tensors` returns the
tensors to write, each read on demand, from params in either layout.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from flaxgpt.config import GPTConfig
from flaxgpt.io.safetensors_io import OutTensor, check_finite
from flaxgpt.nn.params import param_shapes
from flaxgpt.pytree import flat_dict

__all__ = [
    "Params",
    "TensorSpec",
    "OutTensor",
    "check_names",
    "check_params",
    "import_tensors",
    "export_tensors",
]

Params = Any  # a nested dict of arrays
Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One external tensor and where it lives in the flaxgpt tree.

    ``op``: "copy"; "T" (transpose); "split3" (fused q|k|v along the last axis into three paths);
    "zero" (must be all zeros on import, written as zeros on export: a bias flaxgpt does not have);
    "tied" (a copy of the tensor named ``ref``: checked equal on import, written on export only when the
    format stores it).
    """

    name: str
    shape: Shape
    paths: tuple[tuple[str, ...], ...]
    layer: int | None = None
    op: str = "copy"
    required: bool = True
    ref: str = ""


def describe_config(cfg: GPTConfig) -> str:
    """The config fields that fix tensor names and shapes, for error messages."""
    return (
        f"n_layers={cfg.n_layers}, emb_dim={cfg.emb_dim}, vocab_size={cfg.vocab_size}, "
        f"context_length={cfg.context_length}, qkv_bias={cfg.qkv_bias}, tie_embeddings={cfg.tie_embeddings}"
    )


def check_names(
    found: Mapping[str, Shape],
    table: Sequence[TensorSpec],
    ignored: re.Pattern[str],
    cfg: GPTConfig,
    source: str,
) -> None:
    """Checks tensor names and shapes against a format's table, before any tensor is read.

    Args:
      found: name -> shape of every tensor present.
      table: the format's tensors.
      ignored: names to skip silently.
      cfg: the model config (named in the message).
      source: what to call the weights in the message.

    Raises:
      ValueError: one error listing every missing, unexpected or wrongly shaped tensor (the first 8).
    """
    spec = {t.name for t in table}
    problems = []
    for t in table:  # in model order, so that the first problem is usually the telling one
        if t.name not in found:
            if t.required:
                problems.append(f"missing tensor {t.name!r} (expected shape {t.shape})")
        elif tuple(found[t.name]) != t.shape:
            problems.append(f"tensor {t.name!r} has shape {tuple(found[t.name])}, expected {t.shape}")
    problems += [
        f"unexpected tensor {name!r} with shape {tuple(found[name])}"
        for name in sorted(found)
        if name not in spec and not ignored.match(name)
    ]
    if problems:
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ValueError(
            f"{source} does not match the config ({describe_config(cfg)}): {'; '.join(problems[:8])}{more}"
        )


class ParamBuilder:
    """Assembles a params tree in ``cfg``'s layout and dtype, one tensor at a time."""

    def __init__(self, cfg: GPTConfig) -> None:
        self.cfg = cfg
        self.dtype = np.dtype(cfg.weight_dtype)
        self.params: dict[str, Any] = {}

    def set(self, path: tuple[str, ...], layer: int | None, value: np.ndarray) -> None:
        """Places ``value`` at ``path`` (inside block ``layer`` when not None), cast to the param dtype."""
        value = np.asarray(value, dtype=self.dtype)
        stacked = layer is not None and self.cfg.scan_layers
        if layer is None:
            node = self.params
        else:
            node = self.params.setdefault("trf_blocks" if stacked else f"trf_blocks_{layer}", {})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        if stacked:
            if path[-1] not in node:  # the stacked (L, ...) array, filled layer by layer
                node[path[-1]] = np.empty((self.cfg.n_layers,) + value.shape, self.dtype)
            node[path[-1]][layer] = value
        else:
            node[path[-1]] = np.ascontiguousarray(value)


def import_tensors(
    table: Sequence[TensorSpec],
    get: Callable[[str], np.ndarray],
    found: Mapping[str, Shape],
    ignored: re.Pattern[str],
    cfg: GPTConfig,
    source: str,
    *,
    allow_non_finite: bool = False,
) -> Params:
    """Checks names and shapes against ``table``, then reads, checks and places each tensor once.

    Args:
      table: the format's tensors.
      get: reads one tensor by name (lazily, for files).
      found: name -> shape of every tensor present.
      ignored: names to skip silently (buffers such as causal masks).
      cfg: the model config (layout and dtype of the result).
      source: what to call the weights in error messages.
      allow_non_finite: accept tensors holding NaN or inf.

    Returns:
      The params tree (numpy arrays).

    Raises:
      ValueError: a missing, unexpected or wrongly shaped tensor (all listed), a non-float tensor, a
        tensor holding NaN or inf (named, with the count), a non-zero bias or untied head the config
        has no place for.
    """
    check_names(found, table, ignored, cfg, source)
    out = ParamBuilder(cfg)
    for t in table:
        if t.name not in found:  # an optional tensor that is absent
            continue
        arr = np.asarray(get(t.name))
        if not np.issubdtype(arr.dtype, np.floating) and arr.dtype.name != "bfloat16":
            raise ValueError(f"{source}: tensor {t.name!r} has dtype {arr.dtype}, expected a float dtype")
        if not allow_non_finite:
            check_finite(arr, t.name, source)
        if t.op == "zero":
            if np.any(arr != 0):
                raise ValueError(
                    f"{source}: tensor {t.name!r} is non-zero but the config has qkv_bias=False; load it "
                    "with qkv_bias=True to keep the bias"
                )
        elif t.op == "tied":
            if not np.array_equal(arr, np.asarray(get(t.ref))):
                raise ValueError(
                    f"{source}: tensor {t.name!r} differs from {t.ref!r} but the config has "
                    "tie_embeddings=True; load it with tie_embeddings=False to keep a separate head"
                )
        elif t.op == "split3":
            for path, part in zip(t.paths, np.split(arr, 3, axis=-1), strict=True):
                out.set(path, t.layer, part)
        else:
            out.set(t.paths[0], t.layer, arr.T if t.op == "T" else arr)
    return out.params


def check_params(params: Params, cfg: GPTConfig) -> None:
    """Checks that ``params`` (either layout) has exactly the leaves and shapes ``cfg`` implies.

    Args:
      params: a params tree (arrays or ``ShapeDtypeStruct``s).
      cfg: the model config.

    Raises:
      ValueError: naming each missing, unexpected or wrongly shaped leaf with expected and found shapes.
    """
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a nested dict of arrays, got {type(params).__name__}")
    expected = flat_dict(param_shapes(cfg.replace(scan_layers="trf_blocks" in params)))
    found = flat_dict(params)
    problems = [
        f"missing {k!r} (expected shape {tuple(v.shape)})" for k, v in expected.items() if k not in found
    ]
    for k, v in found.items():
        if k not in expected:
            problems.append(f"unexpected {k!r} with shape {tuple(np.shape(v))}")
        elif tuple(np.shape(v)) != tuple(expected[k].shape):
            problems.append(f"{k!r} has shape {tuple(np.shape(v))}, expected {tuple(expected[k].shape)}")
    if problems:
        more = f"; and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise ValueError(
            f"params do not match the config ({describe_config(cfg)}): {'; '.join(problems[:8])}{more}"
        )


def export_tensors(
    table: Sequence[TensorSpec], params: Params, cfg: GPTConfig, write_tied: bool
) -> list[OutTensor]:
    """The tensors of ``table`` to write from ``params``, each read on demand.

    Args:
      table: the format's tensors.
      params: a params tree in either layout (checked against ``cfg`` first).
      cfg: the model config.
      write_tied: write "tied" tensors (a copy of the embedding) rather than leave them out.

    Returns:
      One :class:`OutTensor` per tensor, in table order.
    """
    check_params(params, cfg)
    scanned = "trf_blocks" in params

    def leaf(path: tuple[str, ...], layer: int | None) -> Any:
        node = params if layer is None else params["trf_blocks" if scanned else f"trf_blocks_{layer}"]
        for key in path:
            node = node[key]
        return node

    def read(t: TensorSpec) -> np.ndarray:
        if t.op == "zero":
            return np.zeros(t.shape, np.dtype(leaf(t.paths[0], t.layer).dtype))

        def one(path: tuple[str, ...]) -> np.ndarray:
            x = leaf(path, t.layer)
            return np.asarray(x[t.layer] if (scanned and t.layer is not None) else x)

        if t.op == "split3":
            return np.concatenate([one(p) for p in t.paths], axis=-1)
        return np.ascontiguousarray(one(t.paths[0]).T if t.op == "T" else one(t.paths[0]))

    out = []
    for t in table:
        if t.op == "tied" and not write_tied:
            continue
        dtype = np.dtype(leaf(t.paths[0], t.layer).dtype)
        out.append(OutTensor(t.name, t.shape, dtype, lambda t=t: read(t)))
    return out
