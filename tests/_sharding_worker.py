"""Runs flaxgpt.sharding on 8 simulated CPU devices and prints what tests/test_sharding.py checks.

Started by the tests in a subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the
device count is fixed when JAX starts, so it cannot be changed inside the pytest process). Prints one
JSON object on its last line of stdout.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import optax

from flaxgpt.config import GPTConfig
from flaxgpt.data.windows import DataLoader
from flaxgpt.generation.decode import generate
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import convert_layout, init_params
from flaxgpt.sharding import make_mesh, shard_batch, shard_params, shard_train_state, sharded_train_step
from flaxgpt.training.loop import fit
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.placement import fit_placement
from flaxgpt.training.state import TrainState, create_train_state, train_step

# 98 tokens: a vocabulary that does not split 4 or 8 ways, like GPT-2's 50,257.
CFG = GPTConfig(
    vocab_size=98, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.1, qkv_bias=True
)
BATCH, SEQ, STEPS = 8, 16, 3


def _spec(x: jax.Array) -> str:
    """The PartitionSpec of a mesh-sharded array, or the sharding's class name otherwise."""
    spec = getattr(x.sharding, "spec", None)
    return type(x.sharding).__name__ if spec is None else str(spec)


def placement() -> dict[str, Any]:
    """How shard_params lays out a few parameters of both layouts on data=2,fsdp=4."""
    mesh = make_mesh("data=2,fsdp=4")
    unrolled = init_params(CFG, jax.random.key(0))
    params = shard_params(unrolled, mesh)
    scanned = shard_params(convert_layout(unrolled, CFG.replace(scan_layers=True)), mesh)
    batch = shard_batch(np.zeros((BATCH, SEQ), np.int32), mesh)
    out = {}
    for name, x in (
        ("batch", batch),  # (8, 16)
        ("tok_emb", params["tok_emb"]["embedding"]),  # (98, 32)
        ("pos_emb", params["pos_emb"]["embedding"]),  # (16, 32)
        ("out_head", params["out_head"]["kernel"]),  # (32, 98)
        ("fc1", params["trf_blocks_0"]["ff"]["fc1"]["kernel"]),  # (32, 128)
        ("fc1_bias", params["trf_blocks_0"]["ff"]["fc1"]["bias"]),  # (128,)
        ("scanned_fc2", scanned["trf_blocks"]["ff"]["fc2"]["kernel"]),  # (2, 128, 32)
    ):
        out[name] = {
            "spec": _spec(x),
            "shape": list(x.shape),
            "shard_shapes": sorted({tuple(s.data.shape) for s in x.addressable_shards}),
            "distinct_shards": len({str(s.index) for s in x.addressable_shards}),
            "devices": len(x.sharding.device_set),
        }
    return out


def errors() -> dict[str, str]:
    """The messages of a mesh that does not fit and of a batch that does not split."""
    out = {}
    try:
        make_mesh("data=2,fsdp=2")
    except ValueError as e:
        out["mesh"] = str(e)
    try:
        shard_batch(np.zeros((6, SEQ), np.int32), make_mesh("data=2,fsdp=4"))
    except ValueError as e:
        out["batch"] = str(e)
    try:
        fit_placement(_new_state(scan=False), "data=2,fsdp=4", batch_size=6)
    except ValueError as e:
        out["fit_batch"] = str(e)
    return out


def _loaders() -> tuple[DataLoader, DataLoader]:
    """STEPS training batches of (BATCH, SEQ); validation batches of 8 and then 2 windows."""
    tokens = np.random.default_rng(0).integers(0, CFG.vocab_size, size=(STEPS * BATCH + 10) * SEQ + 2)
    split = STEPS * BATCH * SEQ + 1
    train = DataLoader.from_token_ids(tokens[:split], BATCH, SEQ, SEQ, shuffle=True, seed=0)
    val = DataLoader.from_token_ids(tokens[split:], BATCH, SEQ, SEQ, shuffle=False, drop_last=False)
    assert len(train) == STEPS and [len(x) for x, _ in val.batches(0)] == [8, 2]
    return train, val


def _new_state(scan: bool) -> TrainState:
    cfg = CFG.replace(scan_layers=scan)
    params = convert_layout(init_params(CFG, jax.random.key(0)), cfg)  # same values in both layouts
    return create_train_state(GPTModel(cfg), params, make_optimizer(1e-2, grad_clip=1.0))


def _report(state: TrainState, losses: list[float], **extra: Any) -> dict[str, Any]:
    block = "trf_blocks" if "trf_blocks" in state.params else "trf_blocks_0"
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")  # adam's first moment, params-shaped
    return {
        "losses": losses,
        "fc1": _spec(state.params[block]["ff"]["fc1"]["kernel"]),
        "mu_fc1": _spec(mu[block]["ff"]["fc1"]["kernel"]),
        "step": _spec(state.step),
        **extra,
    }


def _loop(mesh_spec: str | None, scan: bool, pinned: bool) -> dict[str, Any]:
    """STEPS steps of the real train_step by hand, on one device (mesh_spec None) or on a mesh.

    ``pinned`` compiles the step with :func:`sharded_train_step`; otherwise the jitted ``train_step``
    is called as it is on the sharded state and batch, and jit propagates their shardings.
    """
    state, step = _new_state(scan), train_step
    if mesh_spec is not None:
        mesh = make_mesh(mesh_spec)
        state = shard_train_state(state, mesh)
        if pinned:
            step = sharded_train_step(train_step, state, mesh)
    key, losses = jax.random.key(1), []
    for inputs, targets in _loaders()[0].batches(0):
        if mesh_spec is not None:
            inputs, targets = shard_batch((inputs, targets), mesh)
        state, loss = step(state, inputs, targets, key)
        losses.append(float(loss))
    return _report(state, losses)


def _fit(mesh_spec: str | None) -> dict[str, Any]:
    """``fit`` on one device, or on a mesh as ``flaxgpt train --mesh`` runs it (:func:`fit_placement`)."""
    state, place, step_fn = _new_state(scan=False), None, None
    if mesh_spec is not None:
        state, place, step_fn = fit_placement(state, mesh_spec, BATCH)
    train, val = _loaders()
    losses: list[float] = []
    result = fit(
        state, train, val, key=jax.random.key(1), num_epochs=1, eval_iter=2, handle_signals=False,
        shard_batch=place, step_fn=step_fn,
        callback=lambda event, info: losses.append(info["loss"]) if event == "step" else None,
    )
    return _report(result.state, losses, val_losses=result.val_losses)


def training() -> dict[str, Any]:
    return {
        "1 device": _fit(None),
        "data=8": _loop("data=8", scan=False, pinned=True),
        "fit data=2,fsdp=4": _fit("data=2,fsdp=4"),
        "1 device scanned": _loop(None, scan=True, pinned=False),
        "data=2,fsdp=4 scanned": _loop("data=2,fsdp=4", scan=True, pinned=False),
    }


def generation() -> dict[str, Any]:
    """Greedy tokens for a ragged batch of prompts from unsharded and from FSDP-sharded params."""
    model = GPTModel(CFG)
    params = init_params(CFG, jax.random.key(0))
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11]]
    out = {}
    for spec in (None, "data=2,fsdp=4"):
        p = params if spec is None else shard_params(params, make_mesh(spec))
        out[spec or "1 device"] = [np.asarray(r).tolist() for r in generate(model, p, prompts, max_new_tokens=6)]
    return out


def main() -> None:
    results = {
        "device_count": jax.device_count(),
        "placement": placement(),
        "errors": errors(),
        "generation": generation(),
        "training": training(),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
