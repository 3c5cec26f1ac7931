"""Saves and restores orbax checkpoints across meshes and processes for tests/test_orbax_checkpoint.py.

Started in subprocesses (the device count is fixed when JAX starts). Modes, each printing one JSON object
on its last line of stdout:

- ``mesh RUN_DIR``: one process, 8 CPU devices: train on ``data=2,fsdp=4``, save, restore as
  ``data=2,fsdp=4``, ``data=8`` and onto 1 device, and continue training on each.
- ``save RUN_DIR PORT PID``: one of 2 processes with 4 CPU devices each (gloo): train on the global
  ``data=2,fsdp=4`` mesh, save asynchronously (keep 1) at steps 1 and 2, continue training.
- ``restore RUN_DIR``: one process, 8 CPU devices: restore the 2-process checkpoint as ``data=8`` and
  onto 1 device, continue training.

The model config comes as JSON in ``$FLAXGPT_TEST_CONFIG`` (the suite's tiny config).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

MODE = sys.argv[1]
if MODE == "save":  # before JAX starts: 4 devices per process, CPU collectives through gloo
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=4")
import jax  # noqa: E402

if MODE == "save":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{sys.argv[3]}", 2, int(sys.argv[4]), initialization_timeout=60,
                               heartbeat_timeout_seconds=20)

import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, SingleDeviceSharding  # noqa: E402

from flaxgpt.config import GPTConfig  # noqa: E402
from flaxgpt.io.orbax_checkpoint import OrbaxCheckpoints, list_orbax_checkpoints, restore_orbax_checkpoint  # noqa: E402
from flaxgpt.nn.model import GPTModel  # noqa: E402
from flaxgpt.nn.params import init_params  # noqa: E402
from flaxgpt.sharding import (  # noqa: E402
    batch_sharding,
    make_mesh,
    shard_train_state,
    sharded_train_step,
    train_state_shardings,
)
from flaxgpt.training.optim import make_optimizer  # noqa: E402
from flaxgpt.training.state import TrainState, create_train_state, train_step  # noqa: E402

CFG = GPTConfig.from_dict(json.loads(os.environ["FLAXGPT_TEST_CONFIG"]))
BATCH, KEY = 8, jax.random.key(7)


def _batches(n: int = 4) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        x = rng.integers(0, CFG.vocab_size, (BATCH, CFG.context_length + 1)).astype(np.int32)
        out.append((x[:, :-1], x[:, 1:]))
    return out


def _fresh() -> TrainState:
    params = init_params(CFG, jax.random.key(0))
    return create_train_state(GPTModel(CFG), params, make_optimizer(1e-2, grad_clip=1.0))


def _global(x: np.ndarray, mesh: Any) -> jax.Array:
    """The whole batch as a global array on ``mesh`` (each process fills the shards it holds)."""
    return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim), lambda idx: x[idx])


def _train(state: TrainState, batches: list, mesh: Any = None) -> tuple[TrainState, list[float]]:
    step = train_step if mesh is None else sharded_train_step(train_step, state, mesh)
    losses = []
    for inputs, targets in batches:
        if mesh is not None:
            inputs, targets = _global(inputs, mesh), _global(targets, mesh)
        state, loss = step(state, inputs, targets, KEY)
        losses.append(float(loss))
    return state, losses


def _shards(state: Any) -> tuple[dict[str, np.ndarray], list[list[Any]]]:
    """This process's shards of every leaf: arrays by key and (key, leaf index, [start, stop] per axis)."""
    arrays, where = {}, []
    for i, x in enumerate(jax.tree.leaves(state)):
        for j, shard in enumerate(x.addressable_shards):
            key = f"{i}_{j}"
            arrays[key] = np.asarray(shard.data)
            bounds = [[s.start or 0, n if s.stop is None else s.stop] for s, n in zip(shard.index, x.shape)]
            where.append([key, i, bounds])
    return arrays, where


def _template(mesh: Any) -> Any:
    """The state's shapes, with the shardings of ``mesh`` (None: the first device)."""
    abstract = jax.eval_shape(_fresh)
    if mesh is None:
        one = SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), abstract)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
                        train_state_shardings(abstract, mesh))


def _restored(run_dir: str, mesh_spec: str | None, batches: list, saved: list | None = None) -> dict[str, Any]:
    """Restores onto ``mesh_spec`` (None: 1 device), checks values and shardings, continues training."""
    mesh = make_mesh(mesh_spec) if mesh_spec else None
    template = _template(mesh)
    state, meta = restore_orbax_checkpoint(run_dir, template)
    got = [(x.sharding, t.sharding) for x, t in zip(jax.tree.leaves(state), jax.tree.leaves(template))]
    fc1 = state.params["trf_blocks_0"]["ff"]["fc1"]["kernel"]
    report = {
        "step": meta["step"], "saved_by": meta["process_count"],
        "shardings_match": all(a == b for a, b in got),
        "fc1": str(fc1.sharding.spec) if isinstance(fc1.sharding, NamedSharding) else type(fc1.sharding).__name__,
        "fc1_devices": len(fc1.sharding.device_set),
    }
    full = [np.asarray(x) for x in jax.tree.leaves(state)]
    if saved is not None:
        report["equal"] = len(full) == len(saved) and all(
            a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(full, saved)
        )
    report["full"] = full
    report["losses"] = _train(state, batches, mesh)[1]
    return report


def mesh_mode(run_dir: str) -> dict[str, Any]:
    batches = _batches()
    _, base = _train(_fresh(), batches)  # 1 device, uninterrupted
    mesh = make_mesh("data=2,fsdp=4")
    state, first = _train(shard_train_state(_fresh(), mesh), batches[:2], mesh)
    saved = [np.asarray(x) for x in jax.tree.leaves(state)]
    with OrbaxCheckpoints(run_dir) as checkpoints:
        checkpoints.save(state, step=2, key=KEY, config=CFG, batch_index=2)
    _, rest = _train(state, batches[2:], mesh)  # the uninterrupted mesh run
    out = {"base": base, "mesh": first + rest}
    for spec in ("data=2,fsdp=4", "data=8", None):
        report = _restored(run_dir, spec, batches[2:], saved)
        report.pop("full")
        out[spec or "1 device"] = report
    return out


def save_mode(run_dir: str) -> dict[str, Any]:
    batches = _batches()
    mesh = make_mesh("data=2,fsdp=4")
    state = shard_train_state(_fresh(), mesh)
    losses = []
    with OrbaxCheckpoints(run_dir, keep=1, async_save=True, timeout_s=60) as checkpoints:
        for i, batch in enumerate(batches):
            state, loss = _train(state, [batch], mesh)
            losses += loss
            if i < 2:  # steps 1 and 2; step 1's finishing overlaps training step 2
                checkpoints.save(state, step=i + 1, key=KEY, config=CFG, batch_index=i + 1)
            if i == 1:
                arrays, where = _shards(state)
        checkpoints.wait()
        steps = [p.name for p in list_orbax_checkpoints(run_dir)]
    report = {"process": jax.process_index(), "losses": losses, "steps": steps,
              "local_devices": jax.local_device_count(), "devices": jax.device_count()}
    np.savez(os.path.join(run_dir, f"shards-{jax.process_index()}.npz"), **arrays)  # for the restore mode
    with open(os.path.join(run_dir, f"shards-{jax.process_index()}.json"), "w") as f:
        json.dump(where, f)
    jax.distributed.shutdown()
    return report


def restore_mode(run_dir: str) -> dict[str, Any]:
    batches = _batches()
    _, base = _train(_fresh(), batches)
    out = {"base": base}
    for spec in ("data=8", None):
        report = _restored(run_dir, spec, batches[2:])
        full = report.pop("full")
        # The 2 saving processes' own shards (written beside the run) are slices of the restored arrays.
        ok = True
        for pid in (0, 1):
            with open(os.path.join(run_dir, f"shards-{pid}.json")) as f:
                where = json.load(f)
            with np.load(os.path.join(run_dir, f"shards-{pid}.npz")) as f:
                for key, i, bounds in where:
                    piece = full[i][tuple(slice(a, b) for a, b in bounds)]
                    ok &= piece.dtype == f[key].dtype and np.array_equal(piece, f[key])
        report["equal"] = bool(ok)
        out[spec or "1 device"] = report
    return out


if __name__ == "__main__":
    result = {"mesh": mesh_mode, "save": save_mode, "restore": restore_mode}[MODE](sys.argv[2])
    print(json.dumps(result))
