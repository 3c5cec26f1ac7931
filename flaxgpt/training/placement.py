"""Placing a training run on a device mesh: what ``fit`` needs for ``flaxgpt train --mesh SPEC``.

:func:`fit_placement` returns ``(state, shard_batch, step_fn)`` for :func:`flaxgpt.training.loop.fit`; the
mesh, partition rules and placement themselves are :mod:`flaxgpt.sharding`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from flaxgpt.sharding import (
    BATCH_AXES,
    batch_shards,
    make_mesh,
    parse_mesh_spec,
    replicated,
    shard_batch,
    shard_train_state,
    sharded_train_step,
)
from flaxgpt.training.state import make_train_step, train_step
from flaxgpt.training.tasks import PRETRAIN, Task

__all__ = ["batch_placer", "check_mesh", "fit_placement"]
def batch_placer(mesh: Any) -> Callable[..., Any]:
    """A ``shard_batch`` callable for :func:`flaxgpt.training.loop.fit` and ``evaluate``: ``(inputs, targets)``
    for pretraining, one pytree batch (a dict) for other tasks.

    Batches whose size divides by the mesh's batch shards are split with :func:`shard_batch`. On a
    single host, a smaller last batch (a validation loader with ``drop_last=False``) is replicated
    instead, so every device computes it whole: correct, only not parallel. On several hosts an uneven
    batch is an error, as in :func:`shard_batch`.

    Args:
      mesh: the mesh.

    Returns:
      The callable, mapping numpy (B, T) inputs and targets to global arrays.
    """
    shards, rep = batch_shards(mesh), replicated(mesh)

    def place(*arrays: Any) -> Any:
        batch = arrays if len(arrays) > 1 else arrays[0]
        if np.shape(jax.tree.leaves(batch)[0])[0] % shards and jax.process_count() == 1:
            return jax.device_put(batch, rep)
        return shard_batch(batch, mesh)

    return place


def check_mesh(mesh_spec: str, batch_size: int) -> dict[str, int]:
    """Checks a ``--mesh`` value against the devices and the batch size, before any work is done.

    Args:
      mesh_spec: e.g. ``"data=2,fsdp=4"``.
      batch_size: the global batch size (on several processes each loads ``batch_size / process_count`` rows
        of it: :meth:`flaxgpt.data.windows.DataLoader.for_process`).

    Returns:
      The axis sizes, as :func:`parse_mesh_spec`.

    Raises:
      ValueError: when the spec is malformed, does not fit the devices, or the global batch size does
        not divide by ``data * fsdp``.
    """
    sizes = parse_mesh_spec(mesh_spec)
    shards = math.prod(sizes[a] for a in BATCH_AXES)
    global_batch = batch_size
    if global_batch % jax.process_count():
        raise ValueError(f"batch size {global_batch} does not split over {jax.process_count()} processes")
    if global_batch % shards:
        raise ValueError(
            f"batch size {global_batch} is not divisible by the {shards} batch shards of mesh "
            f"{mesh_spec!r}; use a batch size that is a multiple of {shards}"
        )
    return sizes


def fit_placement(
    state: Any, mesh_spec: str, batch_size: int, task: Task | None = None
) -> tuple[Any, Callable[..., Any], Callable[..., Any]]:
    """Everything ``flaxgpt train --mesh SPEC`` needs: ``(state, shard_batch, step_fn)`` for ``fit``.

    Args:
      state: the train state (fresh or restored), on one device or on the host.
      mesh_spec: the ``--mesh`` value, e.g. ``"data=2,fsdp=4"``.
      batch_size: the global training batch size, checked by :func:`check_mesh`.
      task: the task (default: pretraining, whose step is compiled for the mesh's shardings; other tasks'
        steps are jitted on the placed state and batches, and follow their shardings).

    Returns:
      The state placed on the mesh, a batch placer (:func:`batch_placer`) and
      ``flaxgpt.training.state.train_step`` compiled for the mesh (:func:`sharded_train_step`).

    Raises:
      ValueError: as :func:`check_mesh`.
    """
    check_mesh(mesh_spec, batch_size)
    mesh = make_mesh(mesh_spec)
    state = shard_train_state(state, mesh)
    if task is None or task == PRETRAIN:
        return state, batch_placer(mesh), sharded_train_step(train_step, state, mesh)
    return state, batch_placer(mesh), make_train_step(task)
