"""Tests of flaxgpt.sharding.

The partition rules are checked in this process on an abstract mesh (no devices needed). Placement,
training and generation on 8 devices run in a subprocess that simulates them on the CPU with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (see tests/_sharding_worker.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from flaxgpt.config import GPTConfig
from flaxgpt.nn.params import init_params, param_shapes, stack_layers
from flaxgpt.sharding import (
    batch_sharding,
    batch_shards,
    fsdp_spec,
    init_sharded_params,
    make_mesh,
    opt_state_partition_specs,
    param_partition_specs,
    parse_mesh_spec,
    shard_batch,
    train_state_shardings,
)

TINY = GPTConfig(vocab_size=96, context_length=16, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
MESH_2x4 = AbstractMesh((2, 4), ("data", "fsdp"))


def _is_spec(x: object) -> bool:
    return isinstance(x, P)


def _flat_specs(tree: object) -> dict[str, P]:
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_spec)[0]
    return {jax.tree_util.keystr(path): spec for path, spec in leaves}


# --------------------------------------------------------------------------- mesh specs


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("data=8", {"data": 8, "fsdp": 1}),
        ("fsdp=8", {"data": 1, "fsdp": 8}),
        ("data=2,fsdp=4", {"data": 2, "fsdp": 4}),
        (" fsdp = 4 , data = 2 ", {"data": 2, "fsdp": 4}),
        (None, {"data": 8, "fsdp": 1}),
        ("", {"data": 8, "fsdp": 1}),
    ],
)
def test_parse_mesh_spec(spec: str | None, expected: dict[str, int]) -> None:
    assert parse_mesh_spec(spec, device_count=8) == expected


@pytest.mark.parametrize(
    "spec, match",
    [
        ("model=8", "unknown axis 'model'"),
        ("data=2,data=4", "given twice"),
        ("data=0,fsdp=8", "positive integer, got '0'"),
        ("data=-8", "positive integer, got '-8'"),
        ("data=two", "positive integer, got 'two'"),
        ("data", "axis=size"),
        ("data=8,", "axis=size"),
    ],
)
def test_parse_mesh_spec_rejects_malformed(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_mesh_spec(spec, device_count=8)


def test_parse_mesh_spec_names_spec_product_and_device_count() -> None:
    with pytest.raises(ValueError) as info:
        parse_mesh_spec("data=2,fsdp=2", device_count=8)
    msg = str(info.value)
    assert "'data=2,fsdp=2'" in msg and "needs 4 devices" in msg and "there are 8" in msg
    assert "XLA_FLAGS=--xla_force_host_platform_device_count" in msg


def test_make_mesh_on_local_devices() -> None:
    n = jax.device_count()
    mesh = make_mesh(None)
    assert mesh.axis_names == ("data", "fsdp")
    assert dict(mesh.shape) == {"data": n, "fsdp": 1}
    assert dict(make_mesh(f"fsdp={n}").shape) == {"data": 1, "fsdp": n}
    with pytest.raises(ValueError, match=f"needs {2 * n} devices"):
        make_mesh(f"data={2 * n}")


def test_make_mesh_on_given_devices() -> None:
    mesh = make_mesh("data=1", devices=jax.devices()[:1])
    assert mesh.devices.size == 1
    with pytest.raises(ValueError, match="there are 1"):
        make_mesh("data=2", devices=jax.devices()[:1])


# --------------------------------------------------------------------------- partition rules


@pytest.mark.parametrize(
    "shape, fsdp, skip_leading, expected",
    [
        ((64, 32), 4, False, P("fsdp", None)),  # the largest dimension
        ((30, 32), 4, False, P(None, "fsdp")),  # the largest one that divides
        ((32, 32), 4, False, P("fsdp", None)),  # ties: the first
        ((30, 6), 4, False, P()),  # nothing divides: replicated
        ((64,), 4, False, P()),  # 1-D: replicated
        ((), 4, False, P()),  # scalar
        ((64, 32), 1, False, P()),  # no fsdp axis to speak of
        ((64, 32, 128), 8, True, P(None, None, "fsdp")),  # scanned: never the layer axis
        ((64, 32, 6), 8, True, P(None, "fsdp", None)),
        ((64, 32), 8, True, P()),  # a stacked 1-D bias stays replicated
        ((8, 30, 6), 8, True, P()),  # the layer axis divides but must not be used
    ],
)
def test_fsdp_spec(shape: tuple[int, ...], fsdp: int, skip_leading: bool, expected: P) -> None:
    assert fsdp_spec(shape, fsdp, skip_leading) == expected


@pytest.mark.parametrize(
    "shape, expected",
    [
        ((96, 32), P("fsdp", None)),
        ((16, 32), P("fsdp", None)),  # the rows even when the features are larger
        ((50257, 768), P()),  # GPT-2's vocabulary does not divide: replicated, never the features
    ],
)
def test_fsdp_spec_embedding_rows_only(shape: tuple[int, int], expected: P) -> None:
    assert fsdp_spec(shape, 4, rows_only=True) == expected


def test_param_specs_every_parameter_of_the_model() -> None:
    shapes = param_shapes(TINY)
    specs = _flat_specs(param_partition_specs(shapes, MESH_2x4))
    flat_shapes = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    assert specs.keys() == flat_shapes.keys()
    for name, shape in flat_shapes.items():
        spec = specs[name]
        if len(shape) == 1:
            assert spec == P(), name
        else:  # every 2-D parameter of the tiny model has a dimension divisible by 4
            assert "data" not in spec, name  # replicated over data
            (axis,) = [i for i, a in enumerate(spec) if a == "fsdp"]
            if name.endswith("['embedding']"):
                assert axis == 0, name  # tables: the rows
            else:
                assert shape[axis] == max(shape), name
    assert specs["['tok_emb']['embedding']"] == P("fsdp", None)  # (96, 32): the vocabulary
    assert specs["['pos_emb']['embedding']"] == P("fsdp", None)  # (16, 32): the positions
    assert specs["['trf_blocks_0']['ff']['fc1']['kernel']"] == P(None, "fsdp")  # (32, 128)
    assert specs["['trf_blocks_1']['ff']['fc2']['kernel']"] == P("fsdp", None)  # (128, 32)


def test_param_specs_scanned_layout_matches_unrolled() -> None:
    unrolled = param_partition_specs(param_shapes(TINY), MESH_2x4)
    scanned = param_partition_specs(param_shapes(TINY.replace(scan_layers=True)), MESH_2x4)
    for key in ("tok_emb", "pos_emb", "final_norm", "out_head"):
        assert scanned[key] == unrolled[key]
    # Each stacked tensor is sharded as its per-layer counterpart, shifted past the layer axis.
    expected = jax.tree.map(lambda s: P() if s == P() else P(None, *s), unrolled["trf_blocks_0"], is_leaf=_is_spec)
    assert scanned["trf_blocks"] == expected
    # stack_layers output gets the same specs as a scanned init.
    stacked = jax.eval_shape(lambda p: stack_layers(p, TINY.n_layers), param_shapes(TINY))
    assert param_partition_specs(stacked, MESH_2x4) == scanned


def test_param_specs_full_size_gpt2_small() -> None:
    cfg = GPTConfig.preset("gpt2-small", tie_embeddings=True, scan_layers=True)
    specs = _flat_specs(param_partition_specs(param_shapes(cfg), AbstractMesh((1, 8), ("data", "fsdp"))))
    assert specs["['tok_emb']['embedding']"] == P()  # 50257 rows do not split 8 ways
    assert specs["['pos_emb']['embedding']"] == P("fsdp", None)  # (1024, 768)
    assert specs["['trf_blocks']['ff']['fc1']['kernel']"] == P(None, None, "fsdp")  # (12, 768, 3072)
    assert specs["['trf_blocks']['att']['W_query']['kernel']"] == P(None, "fsdp", None)
    assert specs["['trf_blocks']['norm1']['scale']"] == P()


def test_param_specs_padded_vocabulary_is_sharded() -> None:
    cfg = GPTConfig.preset("gpt2-small", vocab_size=50304)
    specs = param_partition_specs(param_shapes(cfg), AbstractMesh((1, 8), ("data", "fsdp")))
    assert specs["tok_emb"]["embedding"] == P("fsdp", None)
    assert specs["out_head"]["kernel"] == P(None, "fsdp")  # (768, 50304)


def test_param_specs_pure_data_parallel_replicates() -> None:
    specs = param_partition_specs(param_shapes(TINY), AbstractMesh((8, 1), ("data", "fsdp")))
    assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=_is_spec))


def test_opt_state_specs_follow_params() -> None:
    from flaxgpt.training.optim import make_optimizer

    shapes = param_shapes(TINY)
    tx = make_optimizer(1e-3, grad_clip=1.0, accumulate_steps=2, decay_biases_and_norms=False)
    opt_state = jax.eval_shape(tx.init, shapes)
    specs = opt_state_partition_specs(opt_state, shapes, MESH_2x4)
    assert jax.tree.structure(specs, is_leaf=_is_spec) == jax.tree.structure(
        jax.tree.map(lambda _: P(), opt_state), is_leaf=_is_spec
    )
    param_specs = param_partition_specs(shapes, MESH_2x4)
    # adam's two moments and MultiSteps' gradient accumulator each follow the params.
    for name in ("mu", "nu", "acc_grads"):
        assert optax.tree_utils.tree_get(specs, name) == param_specs, name
    n_sharded = sum(s != P() for s in jax.tree.leaves(param_specs, is_leaf=_is_spec))
    assert sum(s != P() for s in jax.tree.leaves(specs, is_leaf=_is_spec)) == 3 * n_sharded
    # Counters are scalars: replicated.
    flat = jax.tree_util.tree_flatten_with_path(opt_state)[0]
    spec_leaves = jax.tree.leaves(specs, is_leaf=_is_spec)
    for (path, x), spec in zip(flat, spec_leaves):
        if np.ndim(x) == 0:
            assert spec == P(), jax.tree_util.keystr(path)


def test_opt_state_specs_unmatched_shape_is_replicated() -> None:
    shapes = param_shapes(TINY)
    # Same path as a parameter but another shape (like a factored statistic): not the param's spec.
    fake = {"v_row": jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[:1], x.dtype), shapes)}
    specs = opt_state_partition_specs(fake, shapes, MESH_2x4)
    assert all(s == P() for s in jax.tree.leaves(specs, is_leaf=_is_spec))


def test_batch_sharding_spec() -> None:
    mesh = make_mesh(None)
    assert batch_sharding(mesh).spec == P(("data", "fsdp"), None)
    assert batch_sharding(mesh, ndim=1).spec == P(("data", "fsdp"))
    assert batch_shards(MESH_2x4) == 8 and batch_shards(AbstractMesh((8,), ("data",))) == 8


def test_shard_batch_on_local_mesh() -> None:
    mesh = make_mesh(None)
    x = np.arange(2 * jax.device_count() * 3, dtype=np.int32).reshape(-1, 3)
    inputs, targets = shard_batch((x, x + 1), mesh)
    assert inputs.sharding == batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(targets), x + 1)
    with pytest.raises(ValueError, match="leading batch dimension"):
        shard_batch(np.int32(3), mesh)


def test_train_state_shardings_rejects_non_state() -> None:
    with pytest.raises(ValueError, match="expected a train state"):
        train_state_shardings({"params": {}}, make_mesh(None))


def test_init_sharded_params_equals_init_params() -> None:
    mesh = make_mesh(None)
    key = jax.random.key(3)
    sharded = init_sharded_params(TINY, key, mesh)
    expected = init_params(TINY, key)
    assert jax.tree.structure(sharded) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected)):
        assert a.sharding.mesh == mesh
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --------------------------------------------------------------------------- 8 simulated devices

_WORKER = Path(__file__).with_name("_sharding_worker.py")
# Opt-level 0 halves the compile time of the worker's programs; every run in it uses the same flags.
_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)


@pytest.fixture(scope="module")
def on_8_devices() -> dict:
    """Runs tests/_sharding_worker.py once on 8 simulated CPU devices and returns its JSON report."""
    env = dict(os.environ, XLA_FLAGS=_XLA_FLAGS, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(_WORKER)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"sharding worker failed:\n{proc.stderr[-4000:]}"
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]), stderr=proc.stderr)


@pytest.mark.slow
def test_worker_sees_8_devices(on_8_devices: dict) -> None:
    assert on_8_devices["device_count"] == 8


@pytest.mark.slow
def test_params_are_sharded(on_8_devices: dict) -> None:
    placed = on_8_devices["placement"]
    # A (8, 16) batch: one row per device.
    assert placed["batch"]["spec"] == "P(('data', 'fsdp'), None)"
    assert placed["batch"]["shard_shapes"] == [[1, 16]] and placed["batch"]["distinct_shards"] == 8
    # (16, 32) over fsdp=4: four distinct (4, 32) blocks of rows, each on the 2 devices of its data row.
    assert placed["pos_emb"] == {
        "spec": "P('fsdp', None)", "shape": [16, 32], "shard_shapes": [[4, 32]], "distinct_shards": 4, "devices": 8
    }
    # 98 rows do not split 4 ways: the table is replicated, the (32, 98) head split on its 32.
    assert placed["tok_emb"]["spec"] == "P()" and placed["tok_emb"]["distinct_shards"] == 1
    assert placed["out_head"]["spec"] == "P('fsdp', None)" and placed["out_head"]["shard_shapes"] == [[8, 98]]
    assert placed["fc1"]["spec"] == "P(None, 'fsdp')"
    assert placed["fc1"]["shard_shapes"] == [[32, 32]] and placed["fc1"]["distinct_shards"] == 4
    assert placed["fc1_bias"]["spec"] == "P()" and placed["fc1_bias"]["distinct_shards"] == 1
    # Scanned layout (2, 128, 32): split on the 128, never on the layer axis.
    assert placed["scanned_fc2"]["spec"] == "P(None, 'fsdp', None)"
    assert placed["scanned_fc2"]["shard_shapes"] == [[2, 32, 32]]


@pytest.mark.slow
def test_no_activation_resharding(on_8_devices: dict) -> None:
    # With the 98-token table split along its features, XLA warns that it gathers whole activations.
    assert "Involuntary full rematerialization" not in on_8_devices["stderr"]


@pytest.mark.slow
def test_mesh_that_does_not_fit_fails_clearly(on_8_devices: dict) -> None:
    msg = on_8_devices["errors"]["mesh"]
    assert "'data=2,fsdp=2'" in msg and "needs 4 devices" in msg and "there are 8" in msg
    assert "XLA_FLAGS" in msg


@pytest.mark.slow
def test_batch_that_does_not_split_fails_clearly(on_8_devices: dict) -> None:
    msg = on_8_devices["errors"]["batch"]
    assert "batch size 6" in msg and "8 batch shards" in msg
    msg = on_8_devices["errors"]["fit_batch"]
    assert "batch size 6" in msg and "'data=2,fsdp=4'" in msg and "multiple of 8" in msg


@pytest.mark.slow
@pytest.mark.parametrize(
    "run, baseline",
    [
        ("data=8", "1 device"),  # sharded_train_step by hand
        ("fit data=2,fsdp=4", "1 device"),  # fit() through fit_placement, as `flaxgpt train --mesh`
        ("data=2,fsdp=4 scanned", "1 device scanned"),  # the jitted train_step as it is
    ],
)
def test_losses_agree_with_one_device(on_8_devices: dict, run: str, baseline: str) -> None:
    runs = on_8_devices["training"]
    losses, expected = np.array(runs[run]["losses"]), np.array(runs[baseline]["losses"])
    assert len(losses) == 3 and np.all(np.isfinite(losses))
    assert len(set(expected.tolist())) == 3  # three different batches and updates, not one value
    np.testing.assert_allclose(losses, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_fit_evaluation_agrees_with_one_device(on_8_devices: dict) -> None:
    # The validation batches are 8 and 2 windows: the 2 cannot be split 8 ways and is replicated.
    runs = on_8_devices["training"]
    val, expected = runs["fit data=2,fsdp=4"]["val_losses"], runs["1 device"]["val_losses"]
    assert len(val) == len(expected) == 2  # after update 1 and after the last one
    np.testing.assert_allclose(val, expected, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_train_state_stays_sharded(on_8_devices: dict) -> None:
    runs = on_8_devices["training"]
    assert runs["1 device"]["fc1"] == "SingleDeviceSharding"
    assert runs["data=8"]["fc1"] == runs["data=8"]["mu_fc1"] == "P()"
    assert runs["fit data=2,fsdp=4"]["fc1"] == runs["fit data=2,fsdp=4"]["mu_fc1"] == "P(None, 'fsdp')"
    scanned = runs["data=2,fsdp=4 scanned"]  # after steps whose shardings jit propagated
    assert scanned["fc1"] == scanned["mu_fc1"] == "P(None, None, 'fsdp')"
    assert scanned["step"] == "P()"


@pytest.mark.slow
def test_generate_with_sharded_params_matches(on_8_devices: dict) -> None:
    tokens = on_8_devices["generation"]
    assert [len(row) for row in tokens["1 device"]] == [9, 11, 7, 8]  # prompt + 6 new tokens each
    assert tokens["data=2,fsdp=4"] == tokens["1 device"]


def test_cli_train_rejects_mesh_that_does_not_fit(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from flaxgpt.cli import main

    n = jax.device_count()
    assert main(["train", "--mesh", f"data={n + 1}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "flaxgpt train: error: mesh spec" in err and f"needs {n + 1} devices" in err
    assert not (tmp_path / "run").exists()  # failed before any work
