"""make_optimizer and schedule: the book's AdamW (vs PyTorch), warmup + cosine, clipping, accumulation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from flaxgpt.training.optim import decay_mask, make_optimizer, schedule


def _params():
    rng = np.random.default_rng(0)
    return {
        "dense": {"kernel": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
                  "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
        "norm": {"scale": jnp.ones((4,)), "shift": jnp.full((4,), 0.5)},
    }


def _grads(seed: int, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * scale, jnp.float32), _params())


def _run(tx, grads_list):
    params = _params()
    state = tx.init(params)
    for g in grads_list:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_schedule_warmup_then_cosine_to_min_lr():
    s = schedule(1e-3, warmup_steps=10, total_steps=110, min_lr=1e-4)
    assert float(s(0)) == 0.0
    assert float(s(5)) == pytest.approx(5e-4)
    assert float(s(10)) == pytest.approx(1e-3)
    assert float(s(60)) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-5)  # half-way down
    assert float(s(110)) == pytest.approx(1e-4)
    assert float(s(500)) == pytest.approx(1e-4)


def test_schedule_constant_without_total_steps():
    s = schedule(4e-4)
    assert [float(s(i)) for i in (0, 7, 10_000)] == pytest.approx([4e-4] * 3)
    w = schedule(4e-4, warmup_steps=4)
    assert [float(w(i)) for i in (0, 2, 4, 100)] == pytest.approx([0.0, 2e-4, 4e-4, 4e-4])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr"),
        (dict(lr=1e-3, warmup_steps=-1), "warmup_steps"),
        (dict(lr=1e-3, warmup_steps=10, total_steps=10), "total_steps"),
        (dict(lr=1e-3, min_lr=1e-2, total_steps=10), "min_lr"),
        (dict(lr=float("nan")), "lr"),
    ],
)
def test_schedule_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        schedule(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(grad_clip=0.0), "grad_clip"),
        (dict(accumulate_steps=0), "accumulate_steps"),
        (dict(b2=1.0), "b2"),
    ],
)
def test_make_optimizer_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_optimizer(1e-3, **kwargs)


def test_matches_torch_adamw():
    torch = pytest.importorskip("torch")
    params = _params()
    names = [("dense", "kernel"), ("dense", "bias"), ("norm", "scale"), ("norm", "shift")]
    tparams = [torch.nn.Parameter(torch.from_numpy(np.array(params[a][b]))) for a, b in names]
    opt = torch.optim.AdamW(tparams, lr=4e-4, weight_decay=0.1)  # the book's optimizer
    grads_list = [_grads(s) for s in range(3)]
    for g in grads_list:
        for p, (a, b) in zip(tparams, names):
            p.grad = torch.from_numpy(np.array(g[a][b]))
        opt.step()
    ours = _run(make_optimizer(4e-4, weight_decay=0.1), grads_list)
    for p, (a, b) in zip(tparams, names):
        np.testing.assert_allclose(np.asarray(ours[a][b]), p.detach().numpy(), rtol=1e-5, atol=1e-7)


def test_decay_mask_skips_biases_and_norms():
    mask = decay_mask(_params())
    assert mask == {"dense": {"kernel": True, "bias": False}, "norm": {"scale": False, "shift": False}}
    zero = jax.tree.map(jnp.zeros_like, _params())
    # With zero gradients only weight decay moves a parameter.
    skipped = _run(make_optimizer(1e-2, weight_decay=0.5, decay_biases_and_norms=False), [zero])
    decayed = _run(make_optimizer(1e-2, weight_decay=0.5), [zero])
    p0 = _params()
    np.testing.assert_array_equal(skipped["dense"]["bias"], p0["dense"]["bias"])
    np.testing.assert_array_equal(skipped["norm"]["scale"], p0["norm"]["scale"])
    np.testing.assert_allclose(skipped["dense"]["kernel"], p0["dense"]["kernel"] * (1 - 1e-2 * 0.5), rtol=1e-6)
    np.testing.assert_allclose(decayed["norm"]["scale"], p0["norm"]["scale"] * (1 - 1e-2 * 0.5), rtol=1e-6)


def test_grad_clip_is_global_norm_clipping_before_adamw():
    grads_list = [_grads(0, scale=100.0), _grads(1, scale=0.01)]
    ours = _run(make_optimizer(1e-3, grad_clip=1.0), grads_list)

    def clip(g):
        norm = math.sqrt(sum(float(jnp.sum(x * x)) for x in jax.tree.leaves(g)))
        return jax.tree.map(lambda x: x * min(1.0, 1.0 / norm), g)

    reference = _run(optax.adamw(1e-3, weight_decay=0.1), [clip(g) for g in grads_list])
    unclipped = _run(make_optimizer(1e-3), grads_list)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(unclipped)))


def test_accumulation_averages_micro_batches():
    g1, g2 = _grads(3), _grads(4)
    tx = make_optimizer(1e-3, accumulate_steps=2)
    params = _params()
    state = tx.init(params)
    updates, state = tx.update(g1, state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))  # no update yet
    params = optax.apply_updates(params, updates)
    updates, state = tx.update(g2, state, params)
    accumulated = optax.apply_updates(params, updates)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    single = _run(make_optimizer(1e-3), [mean])
    for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
