"""flaxgpt.pytree: '/'-joined leaf names, and flat dicts back to trees."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from flaxgpt.pytree import flat_dict, flatten_with_names, path_name, unflatten_dict


def test_names_of_dicts_sequences_and_dataclasses():
    @jax.tree_util.register_dataclass
    @dataclasses.dataclass
    class State:
        params: dict
        step: jax.Array

    tree = State(params={"blocks": [jnp.zeros(1), {"w": jnp.ones(2)}]}, step=jnp.asarray(0))
    names, leaves, treedef = flatten_with_names(tree)
    assert names == ["params/blocks/0", "params/blocks/1/w", "step"]
    assert jax.tree_util.tree_unflatten(treedef, leaves).params["blocks"][1]["w"].shape == (2,)
    path = jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})[0][0][0]
    assert path_name(path) == "a/b"


def test_flat_dict_and_unflatten_are_inverses():
    tree = {"tok_emb": {"embedding": 1}, "trf_blocks_0": {"att": {"W_query": {"kernel": 2, "bias": 3}}}}
    flat = flat_dict(tree)
    assert flat == {"tok_emb/embedding": 1, "trf_blocks_0/att/W_query/bias": 3, "trf_blocks_0/att/W_query/kernel": 2}
    assert unflatten_dict(flat) == tree


def test_two_leaves_with_one_name_are_refused():
    with pytest.raises(ValueError, match="same path name"):
        flatten_with_names({"a/b": 1, "a": {"b": 2}})
