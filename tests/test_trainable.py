"""Tests for flaxgpt.finetune.trainable: label trees from names and patterns, the partitioned optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxgpt.finetune.classify import to_classifier
from flaxgpt.finetune.trainable import (
    FROZEN,
    TRAINABLE,
    count_by_label,
    label_params,
    partition_optimizer,
    trainable_patterns,
)
from flaxgpt.nn.params import count_params, init_params


@pytest.fixture
def classifier(tiny_config):
    cfg = tiny_config(vocab_size=257, context_length=16, qkv_bias=True)
    return to_classifier(cfg, init_params(cfg, jax.random.key(0)), 2, jax.random.key(1))
def test_trainable_labels_and_counts(classifier) -> None:
    cfg, params = classifier
    labels = label_params(params, trainable_patterns("last_block", cfg.n_layers))
    flat = {"/".join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_flatten_with_path(labels)[0]}
    assert flat["trf_blocks_1/att/W_query/kernel"] == TRAINABLE
    assert flat["trf_blocks_0/att/W_query/kernel"] == FROZEN
    assert flat["final_norm/scale"] == TRAINABLE and flat["out_head/bias"] == TRAINABLE
    assert flat["tok_emb/embedding"] == FROZEN
    with pytest.raises(ValueError, match="unrolled"):
        trainable_patterns("last_block", cfg.n_layers, scan_layers=True)
    with pytest.raises(ValueError, match="match no parameter"):
        label_params(params, ["nope/"])
    with pytest.raises(ValueError, match="trainable must be one of"):
        trainable_patterns("everything", 2)



def test_named_choices_and_counts(classifier) -> None:
    cfg, params = classifier
    everything = count_by_label(params, label_params(params, trainable_patterns("all", cfg.n_layers)))
    assert everything == {TRAINABLE: count_params(params), FROZEN: 0}
    head = count_by_label(params, label_params(params, trainable_patterns("head", cfg.n_layers)))
    assert head[TRAINABLE] == cfg.emb_dim * 2 + 2
    patterns = trainable_patterns(["trf_blocks_0/att/", "out_head/"], cfg.n_layers)
    some = count_by_label(params, label_params(params, patterns))
    assert head[TRAINABLE] < some[TRAINABLE] < everything[TRAINABLE]
    with pytest.raises(ValueError, match="regular expression"):
        trainable_patterns(["("], cfg.n_layers)


def test_partitioned_updates_touch_only_trainable_leaves(classifier) -> None:
    cfg, params = classifier
    labels = label_params(params, trainable_patterns("head", cfg.n_layers))
    tx = partition_optimizer(optax.adamw(1e-2, weight_decay=0.5), labels)
    opt_state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = tx.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    for lab, a, b in zip(jax.tree.leaves(labels), jax.tree.leaves(new), jax.tree.leaves(params)):
        if lab == FROZEN:
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # no update, no weight decay
        else:
            assert not np.array_equal(a, b)
    # AdamW's moments exist for the head only (2 x its size, plus step counters)
    state_size = sum(x.size for x in jax.tree.leaves(opt_state))
    assert state_size <= 2 * (cfg.emb_dim * 2 + 2) + 8
