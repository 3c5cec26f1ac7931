"""Pytree path names: the '/'-joined leaf names that checkpoints, weight tables and sharding rules share.

``{"trf_blocks_0": {"att": {"W_query": {"kernel": x}}}}`` has the leaf ``trf_blocks_0/att/W_query/kernel``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax

__all__ = ["key_name", "path_names", "path_name", "flatten_with_names", "flat_dict", "unflatten_dict"]


def key_name(k: Any) -> str:
    """The name of one path entry (a dict key, attribute name or sequence index)."""
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def path_names(path: tuple[Any, ...]) -> tuple[str, ...]:
    """The names of a key path's entries, e.g. ``("params", "tok_emb", "embedding")``."""
    return tuple(key_name(k) for k in path)


def path_name(path: tuple[Any, ...]) -> str:
    """A key path as one '/'-joined name."""
    return "/".join(path_names(path))


def flatten_with_names(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Flattens a pytree into leaf names, leaves and its treedef.

    Args:
      tree: any pytree (dicts, dataclasses, tuples, ...).

    Returns:
      ``(names, leaves, treedef)``, in ``jax.tree_util`` order.

    Raises:
      ValueError: two leaves have the same name.
    """
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    names = [path_name(path) for path, _ in with_path]
    if len(set(names)) != len(names):
        raise ValueError("the tree has two leaves with the same path name")
    return names, [leaf for _, leaf in with_path], treedef


def flat_dict(tree: Mapping[str, Any]) -> dict[str, Any]:
    """A nested dict (a params tree) as ``{"a/b/c": leaf}``."""
    names, leaves, _ = flatten_with_names(tree)
    return dict(zip(names, leaves))


def unflatten_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
    """The nested dict of ``{"a/b/c": leaf}`` names (the inverse of :func:`flat_dict`)."""
    out: dict[str, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = name.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out
