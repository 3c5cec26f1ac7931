"""Scaling across devices with JAX's own sharding: a named device mesh and partition rules.

The mesh always has two axes, ``("data", "fsdp")``:

* ``data``: pure data parallelism. Parameters are replicated over it; the batch is split over it.
* ``fsdp``: fully sharded data parallelism (ZeRO-3 style). Parameters with at least two dimensions
  (and their optimizer moments) are split along one dimension (see :func:`param_partition_specs`);
  the batch is split over it too. XLA inserts the all-gathers and reduce-scatters.

Nothing here is a hand-written parallel loop: arrays are placed with :class:`jax.sharding.NamedSharding`
and ``jax.jit`` propagates the shardings through ``train_step`` and ``generate`` (no ``pmap``). The mesh
axes are ``AxisType.Auto``, so the model code needs no sharding annotations.

Typical use::

    mesh = make_mesh("data=2,fsdp=4")
    state = shard_train_state(state, mesh)
    step = sharded_train_step(train_step, state, mesh)
    for inputs, targets in loader:
        inputs, targets = shard_batch((inputs, targets), mesh)
        state, loss = step(state, inputs, targets, key)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxgpt.pytree import path_names

__all__ = [
    "MESH_AXES",
    "BATCH_AXES",
    "parse_mesh_spec",
    "make_mesh",
    "replicated",
    "fsdp_spec",
    "param_partition_specs",
    "param_shardings",
    "shard_params",
    "init_sharded_params",
    "opt_state_partition_specs",
    "train_state_shardings",
    "shard_train_state",
    "batch_shards",
    "batch_sharding",
    "shard_batch",
    "sharded_train_step",
]

MESH_AXES: tuple[str, str] = ("data", "fsdp")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")  # the batch dimension is split over both
# Key of the scanned-layout blocks in the params tree: their arrays have a leading layer axis.
_SCANNED_KEY = "trf_blocks"

PyTree = Any


# --------------------------------------------------------------------------- the mesh


def parse_mesh_spec(spec: str | None, device_count: int | None = None) -> dict[str, int]:
    """Parses a mesh spec such as ``"data=8"`` or ``"data=2,fsdp=4"``.

    Args:
      spec: comma-separated ``axis=size`` pairs over the axes ``data`` and ``fsdp``; an axis left out
        has size 1. ``None`` or ``""`` means pure data parallelism over every device.
      device_count: the number of devices the spec must fill; ``jax.device_count()`` when None.

    Returns:
      ``{"data": d, "fsdp": f}`` with ``d * f == device_count``.

    Raises:
      ValueError: on an unknown or repeated axis, a size that is not a positive integer, or sizes whose
        product is not the device count.
    """
    n = jax.device_count() if device_count is None else device_count
    if spec is None or not spec.strip():
        return {"data": n, "fsdp": 1}
    sizes: dict[str, int] = {}
    for part in spec.split(","):
        name, sep, value = (s.strip() for s in part.partition("="))
        if not sep or not name:
            raise ValueError(
                f"mesh spec {spec!r}: expected comma-separated axis=size pairs such as "
                f"'data=2,fsdp=4', got {part.strip()!r}"
            )
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}, expected one of {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} is given twice")
        if not value.isdigit() or int(value) <= 0:
            raise ValueError(f"mesh spec {spec!r}: size of {name!r} must be a positive integer, got {value!r}")
        sizes[name] = int(value)
    sizes = {axis: sizes.get(axis, 1) for axis in MESH_AXES}
    product = math.prod(sizes.values())
    if product != n:
        shape = " x ".join(f"{axis}={size}" for axis, size in sizes.items())
        source = "jax.device_count()" if device_count is None else "devices given"
        raise ValueError(
            f"mesh spec {spec!r} needs {product} devices ({shape}) but there are {n} ({source}); the "
            "axis sizes must multiply to the device count. To simulate N devices on CPU, set "
            "XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts."
        )
    return sizes


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the ``("data", "fsdp")`` device mesh a spec describes.

    Args:
      spec: ``"data=8"``, ``"data=2,fsdp=4"``, ``"fsdp=8"``...; None means ``data=<all devices>``.
      devices: the devices to lay out (every device of every process when None, so on several hosts
        the mesh is global).

    Returns:
      A :class:`jax.sharding.Mesh` with axes ``("data", "fsdp")`` of type ``AxisType.Auto``.

    Raises:
      ValueError: when the spec is malformed or does not use exactly the available devices (the message
        names the spec, the product of its sizes and the device count).
    """
    count = len(devices) if devices is not None else None
    sizes = parse_mesh_spec(spec, count)
    shape = tuple(sizes[axis] for axis in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that puts a full copy of an array on every device of ``mesh``."""
    return NamedSharding(mesh, P())


# --------------------------------------------------------------------------- parameters


def _axis_size(mesh: Mesh, axis: str) -> int:
    return int(dict(mesh.shape).get(axis, 1))


def fsdp_spec(shape: Sequence[int], fsdp: int, skip_leading: bool = False, rows_only: bool = False) -> P:
    """The partition rule for one parameter.

    Args:
      shape: the parameter's shape.
      fsdp: size of the ``fsdp`` mesh axis.
      skip_leading: the first axis is a stacked layer axis (scanned layout): never shard it, and judge
        the rest as one layer's tensor.
      rows_only: an embedding table: only its rows (tokens or positions) may be sharded.

    Returns:
      ``P()`` (replicated) when ``fsdp == 1``, for 1-D tensors and when no allowed dimension divides
      by ``fsdp``; otherwise a spec naming ``"fsdp"`` on the largest allowed dimension divisible by
      ``fsdp`` (the first of equal ones).
    """
    first = 1 if skip_leading else 0
    allowed = [first] if rows_only else range(first, len(shape))
    dims = [i for i in allowed if i < len(shape) and shape[i] % fsdp == 0]
    if fsdp == 1 or len(shape) - first < 2 or not dims:
        return P()
    axis = max(dims, key=lambda i: shape[i])
    return P(*("fsdp" if i == axis else None for i in range(len(shape))))


def param_partition_specs(params: PyTree, mesh: Mesh) -> PyTree:
    """Partition specs for every parameter: replicated over ``data``, FSDP-sharded over ``fsdp``.

    Each tensor with two or more dimensions is split along its largest dimension divisible by the
    ``fsdp`` size, with two exceptions:

    * Embedding tables (``.../embedding`` leaves) are split only along their rows. A lookup in a table
      split along its features gives feature-split activations, which clash with the batch split over
      the same ``fsdp`` devices (XLA then gathers whole activations: "Involuntary full
      rematerialization"). GPT-2's 50,257-token table is therefore replicated; pad ``vocab_size`` to a
      multiple of the ``fsdp`` size (e.g. 50,304) to shard it.
    * In the scanned layout (``trf_blocks`` with a leading layer axis) the layer axis is never split,
      so a tensor is sharded the same way in either layout.

    Args:
      params: the params tree (arrays or ``jax.ShapeDtypeStruct`` leaves, e.g. from ``jax.eval_shape``).
      mesh: a mesh from :func:`make_mesh` (a mesh without an ``fsdp`` axis replicates everything).

    Returns:
      A tree with the structure of ``params`` whose leaves are :class:`jax.sharding.PartitionSpec`.
    """
    fsdp = _axis_size(mesh, "fsdp")

    def rule(path: tuple[Any, ...], x: Any) -> P:
        names = path_names(path)
        return fsdp_spec(
            np.shape(x), fsdp, skip_leading=_SCANNED_KEY in names, rows_only=names[-1:] == ("embedding",)
        )

    return jax.tree_util.tree_map_with_path(rule, params)


def _to_shardings(specs: PyTree, mesh: Mesh) -> PyTree:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def param_shardings(params: PyTree, mesh: Mesh) -> PyTree:
    """:func:`param_partition_specs` as :class:`jax.sharding.NamedSharding` leaves (for ``jax.jit``)."""
    return _to_shardings(param_partition_specs(params, mesh), mesh)


def shard_params(params: PyTree, mesh: Mesh) -> PyTree:
    """Places a params tree on the mesh according to :func:`param_partition_specs`.

    Args:
      params: the params tree (host or device arrays; on several hosts every process passes the same
        values, e.g. initialised from the same key or restored from the same checkpoint).
      mesh: the mesh.

    Returns:
      The same tree of global ``jax.Array`` s, each with a ``NamedSharding`` on ``mesh``.
    """
    return jax.device_put(params, param_shardings(params, mesh))


def init_sharded_params(cfg: Any, key: jax.Array, mesh: Mesh) -> PyTree:
    """Initialises a model's parameters directly in their sharded placement (no full copy on one device).

    Args:
      cfg: a :class:`flaxgpt.config.GPTConfig`.
      key: a PRNG key.
      mesh: the mesh.

    Returns:
      The params tree, equal to ``init_params(cfg, key)``, sharded like :func:`shard_params`.
    """
    from flaxgpt.nn.params import init_params, param_shapes

    shardings = param_shardings(param_shapes(cfg), mesh)
    return jax.jit(init_params, static_argnums=0, out_shardings=shardings)(cfg, key)


# --------------------------------------------------------------------------- optimizer and train state


def opt_state_partition_specs(opt_state: PyTree, params: PyTree, mesh: Mesh) -> PyTree:
    """Partition specs for an optax state: each moment follows its parameter, the rest is replicated.

    A state leaf belongs to a parameter when its tree path ends with that parameter's path (``mu``,
    ``nu``, ... of adam hold copies of the params tree, possibly inside ``optax.chain`` or
    ``optax.masked``) and it has the parameter's shape. Counters, schedules' hyper-parameters and
    anything unmatched (e.g. factored statistics) are replicated.

    Args:
      opt_state: the optimizer state.
      params: the params tree it was initialised from (arrays or shape structs).
      mesh: the mesh.

    Returns:
      A tree with the structure of ``opt_state`` whose leaves are PartitionSpecs.
    """
    specs = param_partition_specs(params, mesh)
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], P]] = {}
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))
    for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(params)[0], spec_leaves):
        by_path[path_names(path)] = (tuple(np.shape(x)), spec)
    lengths = sorted({len(p) for p in by_path}, reverse=True)

    def rule(path: tuple[Any, ...], x: Any) -> P:
        names = path_names(path)
        for n in lengths:
            if n <= len(names) and names[len(names) - n :] in by_path:
                shape, spec = by_path[names[len(names) - n :]]
                if shape == tuple(np.shape(x)):
                    return spec
        return P()

    return jax.tree_util.tree_map_with_path(rule, opt_state)


def train_state_shardings(state: Any, mesh: Mesh) -> Any:
    """Shardings for a whole train state, for ``jax.device_put`` and ``jax.jit``'s in/out shardings.

    Args:
      state: a flax ``TrainState`` (or any flax struct with ``params`` and ``opt_state`` fields);
        ``params`` follow :func:`param_partition_specs`, ``opt_state`` follows
        :func:`opt_state_partition_specs`, every other array field (step, keys...) is replicated.
      mesh: the mesh.

    Returns:
      A state-shaped tree of :class:`jax.sharding.NamedSharding`.
    """
    for field in ("params", "opt_state", "replace"):
        if not hasattr(state, field):
            raise ValueError(
                f"expected a train state with params and opt_state fields, got {type(state).__name__}"
            )
    shardings = jax.tree.map(lambda _: replicated(mesh), state)
    return shardings.replace(
        params=param_shardings(state.params, mesh),
        opt_state=_to_shardings(opt_state_partition_specs(state.opt_state, state.params, mesh), mesh),
    )


def shard_train_state(state: Any, mesh: Mesh) -> Any:
    """Places a train state (params, optimizer moments, step) on the mesh.

    Args:
      state: the train state, e.g. from ``flaxgpt.training.state.create_train_state``.
      mesh: the mesh.

    Returns:
      The same state with every array placed per :func:`train_state_shardings`.
    """
    return jax.device_put(state, train_state_shardings(state, mesh))


# --------------------------------------------------------------------------- batches


def batch_shards(mesh: Mesh) -> int:
    """How many pieces a batch is split into: the product of the ``data`` and ``fsdp`` sizes."""
    return math.prod(_axis_size(mesh, a) for a in BATCH_AXES)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """The sharding of a batch array: dimension 0 split over ``data`` and ``fsdp``, the rest whole."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Places a batch (an array or a tree of arrays, e.g. ``(inputs, targets)``) on the mesh.

    On one host ``batch`` is the whole batch. On several hosts each process passes its own slice
    (its share of the global batch, in process order) and gets back global arrays whose batch size is
    the sum over processes (``jax.make_array_from_process_local_data``).

    Args:
      batch: arrays whose leading dimension is the (process-local) batch size.
      mesh: the mesh.

    Returns:
      The same tree of global ``jax.Array`` s, dimension 0 split over ``("data", "fsdp")``.

    Raises:
      ValueError: when the global batch size does not divide by the number of batch shards.
    """
    shards = batch_shards(mesh)

    def put(x: Any) -> jax.Array:
        if np.ndim(x) == 0:
            raise ValueError("shard_batch expects arrays with a leading batch dimension, got a scalar")
        global_batch = np.shape(x)[0] * jax.process_count()
        if global_batch % shards:
            raise ValueError(
                f"batch size {global_batch} is not divisible by the {shards} batch shards of the mesh "
                f"(data={_axis_size(mesh, 'data')} x fsdp={_axis_size(mesh, 'fsdp')}); "
                f"use a batch size that is a multiple of {shards}"
            )
        return jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(x)), x)

    return jax.tree.map(put, batch)


# --------------------------------------------------------------------------- compiled steps


def sharded_train_step(step_fn: Callable[..., Any], state: Any, mesh: Mesh) -> Callable[..., Any]:
    """Compiles a ``train_step(state, inputs, targets, key) -> (state, loss)`` for the mesh.

    The state's shardings are pinned on the way in and out (so every step reuses one executable and the
    state never drifts to another layout), the batch is split over ``("data", "fsdp")``, the key and
    the loss are replicated, and the old state's buffers are donated. ``step_fn`` may itself be jitted.

    Args:
      step_fn: the training step.
      state: a train state (only its structure and shapes are used).
      mesh: the mesh.

    Returns:
      The jitted step.
    """
    state_sh = train_state_shardings(state, mesh)
    batch_sh = batch_sharding(mesh)
    rep = replicated(mesh)
    return jax.jit(
        step_fn,
        in_shardings=(state_sh, batch_sh, batch_sh, rep),
        out_shardings=(state_sh, rep),
        donate_argnums=(0,),
    )



