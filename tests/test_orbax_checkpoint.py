"""Orbax checkpoints: exact round trip and resume, keep K, async saves, manifests that catch a flipped byte or
a missing process, interrupted saves and prunes, templates that do not fit, params-only loading (LoRA merged),
and in subprocesses: 8 CPU devices restoring across meshes, and a 2-process save restored by one process."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from flaxgpt.io.checkpoint import save_checkpoint
from flaxgpt.io.orbax_checkpoint import (
    CheckpointError,
    OrbaxCheckpoints,
    is_orbax_run,
    latest_orbax_checkpoint,
    list_orbax_checkpoints,
    load_model_from_orbax,
    restore_orbax_checkpoint,
    save_orbax_checkpoint,
    wait_orbax_checkpoints,
)
from flaxgpt.nn.lora import init_lora, merge_lora
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.pytree import flat_dict, flatten_with_names
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import create_train_state, train_step

KEY = jax.random.key(7)
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_WORKER = Path(__file__).with_name("_orbax_worker.py")
_XLA_FLAGS = (
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true"
)


@pytest.fixture(autouse=True)
def _close_managers():
    yield
    wait_orbax_checkpoints()  # the managers save_orbax_checkpoint keeps open


def _state(cfg, seed: int = 0):
    return create_train_state(GPTModel(cfg), init_params(cfg, jax.random.key(seed)), make_optimizer(1e-2, grad_clip=1.0))


def _batches(cfg, n: int, seed: int = 0):
    x = np.random.default_rng(seed).integers(0, cfg.vocab_size, (n, 4, cfg.context_length + 1)).astype(np.int32)
    return [(b[:, :-1], b[:, 1:]) for b in x]


def _train(state, batches, key=KEY):
    losses = []
    for inputs, targets in batches:
        state, loss = train_step(state, inputs, targets, key)
        losses.append(float(loss))
    return state, np.array(losses)


def _host(tree) -> list[np.ndarray]:
    return [np.array(x) for x in jax.tree.leaves(tree)]


def _same(tree, host: list[np.ndarray]) -> bool:
    got = _host(tree)
    return len(got) == len(host) and all(a.dtype == b.dtype and np.array_equal(a, b) for a, b in zip(got, host))


def _save(run, state, step, cfg, **kw):
    return save_orbax_checkpoint(run, state, step=step, key=KEY, config=cfg, **kw)


def _template(cfg):
    return jax.eval_shape(lambda: _state(cfg))


def _names_of(cfg) -> list[str]:
    """The leaf names of a train state of ``cfg``, in flattening order."""
    return flatten_with_names(jax.eval_shape(lambda: _state(cfg)))[0]


def _two_steps(tmp_path, cfg):
    """Steps 1 and 2 of a run (different states); returns the host copy of each."""
    batches = _batches(cfg, 2)
    state, _ = _train(_state(cfg), batches[:1])
    first = _host(state)
    _save(tmp_path, state, 1, cfg)
    state, _ = _train(state, batches[1:])
    second = _host(state)
    _save(tmp_path, state, 2, cfg)
    return first, second


# --------------------------------------------------------------------------- round trip, resume, keep K, async


def test_round_trip_is_exact_and_resume_continues_bit_identically(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    batches = _batches(cfg, 4)
    state, first = _train(_state(cfg), batches[:2])
    saved = _host(state)
    path = _save(tmp_path, state, 2, cfg, epoch=1, batch_index=2, seed=5, tokens_seen=128, tokenizer="bytes",
                 extra={"lr": 0.01})
    assert path == tmp_path / "orbax" / "2" and (path / "flaxgpt-manifest-0.json").is_file()
    files = [f for f in path.rglob("*") if f.is_file()]
    assert files and not [f for f in files if f.read_bytes()[:2] in PICKLE_MAGIC]  # no pickle anywhere
    _, rest = _train(state, batches[2:])  # the uninterrupted run
    assert len(set(first.tolist() + rest.tolist())) == 4  # real updates, not one value

    restored, meta = restore_orbax_checkpoint(tmp_path, _template(cfg))
    assert _same(restored, saved) and int(restored.step) == 2
    assert (meta["step"], meta["epoch"], meta["batch_index"], meta["seed"], meta["tokens_seen"]) == (2, 1, 2, 5, 128)
    assert meta["tokenizer"] == "bytes" and meta["extra"] == {"lr": 0.01} and meta["config"] == dataclasses.asdict(cfg)
    assert meta["path"] == str(path) and (meta["process_count"], meta["device_count"]) == (1, jax.device_count())
    np.testing.assert_array_equal(jax.random.key_data(meta["key"]), jax.random.key_data(KEY))
    assert [leaf["name"] for leaf in meta["leaves"]] == _names_of(cfg)
    _, again = _train(restored, batches[2:], meta["key"])
    assert again.tobytes() == rest.tobytes()


def test_bfloat16_state_round_trips_exactly(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config(param_dtype="bfloat16", dtype="bfloat16")
    state = _state(cfg)
    saved = _host(state)
    assert any(a.dtype == jnp.bfloat16 for a in saved)
    _save(tmp_path, state, 0, cfg)
    restored, _ = restore_orbax_checkpoint(tmp_path, _template(cfg))
    assert _same(restored, saved)


def test_keeps_the_last_k_and_an_interrupted_prune_is_invisible(tiny_config, tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config()
    state = _state(cfg)
    with OrbaxCheckpoints(tmp_path, keep=2) as checkpoints:
        for step in range(1, 5):
            checkpoints.save(state, step=step, key=KEY, config=cfg)
        assert [p.name for p in list_orbax_checkpoints(tmp_path)] == ["3", "4"]

        # A prune killed after its rename, half way through deleting: step 3 must not stay listed.
        from flaxgpt.io import orbax_dir

        real_rmtree = shutil.rmtree

        def dies_mid_delete(path, ignore_errors=False):
            if Path(path).name.startswith(".trash-3-") and Path(path).exists():
                next(p for p in Path(path).rglob("*") if p.is_file()).unlink()
                raise KeyboardInterrupt  # the process dies here
            real_rmtree(path, ignore_errors=ignore_errors)

        monkeypatch.setattr(orbax_dir.shutil, "rmtree", dies_mid_delete)
        with pytest.raises(KeyboardInterrupt):
            checkpoints.save(state, step=5, key=KEY, config=cfg)
        monkeypatch.undo()
    leftovers = [p.name for p in (tmp_path / "orbax").iterdir() if p.name.startswith(".trash-")]
    assert leftovers and [p.name for p in list_orbax_checkpoints(tmp_path)] == ["4", "5"]
    for folder in list_orbax_checkpoints(tmp_path):  # every listed step is whole
        assert restore_orbax_checkpoint(folder, _template(cfg))[1]["step"] == int(folder.name)
    _save(tmp_path, state, 6, cfg, keep=2)  # the next prune finishes the interrupted one
    assert sorted(p.name for p in (tmp_path / "orbax").iterdir()) == ["5", "6"]


def test_async_save_survives_donation_and_wait_completes_it(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    batches = _batches(cfg, 3)
    state, _ = _train(_state(cfg), batches[:1])
    saved = _host(state)
    with OrbaxCheckpoints(tmp_path, keep=3, async_save=True) as checkpoints:
        path = checkpoints.save(state, step=1, key=KEY, config=cfg)
        state, _ = _train(state, batches[1:])  # donates the buffers being saved while orbax writes
        checkpoints.wait()
        assert (path / "flaxgpt-manifest-0.json").is_file()
        restored, meta = restore_orbax_checkpoint(tmp_path, _template(cfg))
        assert meta["step"] == 1 and _same(restored, saved)
    # The function keeps its manager open between calls and finishes when asked to.
    later = _host(state)
    _save(tmp_path, state, 3, cfg, async_save=True)
    wait_orbax_checkpoints()
    assert _same(restore_orbax_checkpoint(tmp_path, _template(cfg))[0], later)


# --------------------------------------------------------------------------- integrity


def _largest_data_file(step_dir: Path) -> Path:
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


def test_a_flipped_byte_is_refused_and_the_previous_step_loaded(tiny_config, tmp_path: Path, caplog) -> None:
    cfg = tiny_config()
    first, second = _two_steps(tmp_path, cfg)
    step2 = tmp_path / "orbax" / "2"
    data = _largest_data_file(step2)
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    # Orbax alone reads the damaged file without complaint and returns other values.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # orbax: shardings read from the checkpoint
        unchecked = flat_dict(ocp.PyTreeCheckpointer().restore(step2 / "state"))
    assert not all(np.array_equal(np.asarray(unchecked[n]), a) for n, a in zip(_names_of(cfg), second))

    with caplog.at_level(logging.DEBUG, logger="flaxgpt.io.checkpoint"):
        restored, meta = restore_orbax_checkpoint(tmp_path, _template(cfg))
    assert meta["step"] == 1 and _same(restored, first)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "SHA-256" in warned[0] and data.name in warned[0]
    assert "loading step 1 instead" in warned[0]
    assert any("the manifest records" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)
    with pytest.raises(CheckpointError, match="corrupt"):
        restore_orbax_checkpoint(step2, _template(cfg))
    assert latest_orbax_checkpoint(tmp_path) == tmp_path / "orbax" / "1"


def test_a_missing_manifest_is_refused(tiny_config, tmp_path: Path, caplog) -> None:
    cfg = tiny_config()
    first, _ = _two_steps(tmp_path, cfg)
    step2 = tmp_path / "orbax" / "2"
    (step2 / "flaxgpt-manifest-0.json").unlink()
    with caplog.at_level(logging.WARNING, logger="flaxgpt.io.checkpoint"):
        restored, meta = restore_orbax_checkpoint(tmp_path, _template(cfg))
    assert meta["step"] == 1 and _same(restored, first)
    assert [r.getMessage() for r in caplog.records if "lacks flaxgpt-manifest-0.json" in r.getMessage()]
    with pytest.raises(CheckpointError, match="lacks flaxgpt-manifest-0.json"):
        restore_orbax_checkpoint(step2, _template(cfg))
    # A step saved by 2 processes needs both manifests: process 1's is missing here.
    meta_file = tmp_path / "orbax" / "1" / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(dict(meta, process_count=2)))
    with pytest.raises(CheckpointError, match="lacks flaxgpt-manifest-1.json: process 1 of 2"):
        restore_orbax_checkpoint(tmp_path / "orbax" / "1", _template(cfg))
    with pytest.raises(CheckpointError, match="no orbax checkpoint .* verifies") as info:
        restore_orbax_checkpoint(tmp_path, _template(cfg))
    assert len(info.value.reasons) == 2


def test_an_interrupted_save_is_never_picked_up(tiny_config, tmp_path: Path, monkeypatch) -> None:
    cfg = tiny_config()
    state = _state(cfg)
    saved = _host(state)
    _save(tmp_path, state, 1, cfg)
    from orbax.checkpoint._src.path import atomicity

    async def crash(self):  # every file written, the final rename never happens
        raise OSError("killed before the rename")

    monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", crash)
    moved, _ = _train(state, _batches(cfg, 1))
    with pytest.raises(CheckpointError, match="killed before the rename"):
        with OrbaxCheckpoints(tmp_path) as checkpoints:
            checkpoints.save(moved, step=2, key=KEY, config=cfg)
    monkeypatch.undo()
    leftovers = [p.name for p in (tmp_path / "orbax").iterdir() if p.name.startswith("2.")]
    assert leftovers == ["2.orbax-checkpoint-tmp"]
    assert [p.name for p in list_orbax_checkpoints(tmp_path)] == ["1"] and is_orbax_run(tmp_path)
    restored, meta = restore_orbax_checkpoint(tmp_path, _template(cfg))
    assert meta["step"] == 1 and _same(restored, saved)
    with OrbaxCheckpoints(tmp_path) as checkpoints:  # a new manager removes the leftover; step 2 saves
        checkpoints.save(moved, step=2, key=KEY, config=cfg)
    assert sorted(p.name for p in (tmp_path / "orbax").iterdir()) == ["1", "2"]
    assert restore_orbax_checkpoint(tmp_path, _template(cfg))[1]["step"] == 2


def test_a_corrupt_step_is_replaced_when_saved_again(tiny_config, tmp_path: Path, caplog) -> None:
    cfg = tiny_config()
    _, second = _two_steps(tmp_path, cfg)
    (tmp_path / "orbax" / "2" / "flaxgpt-manifest-0.json").unlink()
    restored, meta = restore_orbax_checkpoint(tmp_path, _template(cfg))  # resumes from step 1
    assert meta["step"] == 1
    wait_orbax_checkpoints()
    _save(tmp_path, restored, 2, cfg)  # the run trains on and saves step 2 again
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="flaxgpt.io.checkpoint"):
        again, meta = restore_orbax_checkpoint(tmp_path, _template(cfg))
    assert meta["step"] == 2 and not caplog.records
    assert int(again.step) == 1  # the state saved again (restored from step 1), not the old step 2's


# --------------------------------------------------------------------------- templates and loading


def test_a_template_of_another_model_fails_clearly(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    _save(tmp_path, _state(cfg), 1, cfg)
    with pytest.raises(CheckpointError) as info:
        restore_orbax_checkpoint(tmp_path, _template(tiny_config(emb_dim=64)))
    msg = str(info.value)
    assert "leaf 'params/final_norm/scale'" in msg and "shape (32,)" in msg and "expected (64,)" in msg
    with pytest.raises(CheckpointError, match=r"missing \['params/trf_blocks_2/"):
        restore_orbax_checkpoint(tmp_path, _template(tiny_config(n_layers=3)))
    with pytest.raises(CheckpointError, match="dtype float32, expected .* bfloat16"):
        restore_orbax_checkpoint(tmp_path, _template(tiny_config(param_dtype="bfloat16")))


def test_load_model_from_orbax_reads_params_only(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    state, _ = _train(_state(cfg), _batches(cfg, 1))
    params = _host(state.params)
    _save(tmp_path, state, 1, cfg, tokenizer="bytes")
    got_cfg, got, info = load_model_from_orbax(tmp_path)
    assert got_cfg == cfg and _same(got, params)
    assert info == {"step": 1, "tokenizer": "bytes", "epoch": 0, "tokens_seen": 0,
                    "path": str(tmp_path / "orbax" / "1"), "lora": None}
    half_cfg, half, _ = load_model_from_orbax(tmp_path / "orbax" / "1", dtype="bfloat16")
    assert half_cfg.param_dtype == "bfloat16" and all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(half))
    np.testing.assert_array_equal(np.asarray(half["tok_emb"]["embedding"]),
                                  np.asarray(got["tok_emb"]["embedding"].astype(jnp.bfloat16)))


def test_load_model_from_orbax_merges_lora_and_refuses_nan(tiny_config, tmp_path: Path) -> None:
    from flaxgpt.finetune.lora_train import lora_train_state

    cfg = tiny_config()
    base = init_params(cfg, jax.random.key(0))
    lora = init_lora(base, jax.random.key(1), rank=2, alpha=4.0)
    lora = lora.replace(adapters=jax.tree.map(lambda b: b + 0.05, lora.adapters))  # B != 0: the merge shows
    expected = _host(merge_lora(base, lora))
    state, _ = lora_train_state(GPTModel(cfg), base, lora, make_optimizer(1e-2))
    _save(tmp_path / "lora", state, 3, cfg, extra={"lora": {"targets": "all"}})
    got_cfg, merged, info = load_model_from_orbax(tmp_path / "lora")
    assert _same(merged, expected) and info["lora"] == {"targets": "all", "rank": 2, "alpha": 4.0, "dropout": 0.0}
    saved = _host(state)
    restored, _ = restore_orbax_checkpoint(tmp_path / "lora", jax.eval_shape(lambda: state))  # the whole LoRA state
    assert _same(restored, saved) and restored.params["lora"].alpha == 4.0

    bad = _state(cfg)
    bad = bad.replace(params={**bad.params, "final_norm": {"scale": bad.params["final_norm"]["scale"].at[3].set(jnp.nan)}})
    _save(tmp_path / "nan", bad, 1, cfg)
    with pytest.raises(ValueError, match="final_norm/scale.*1 "):
        load_model_from_orbax(tmp_path / "nan")
    assert np.isnan(np.asarray(load_model_from_orbax(tmp_path / "nan", allow_non_finite=True)[1]["final_norm"]["scale"][3]))


def test_is_orbax_run_and_latest(tiny_config, tmp_path: Path) -> None:
    cfg = tiny_config()
    assert not is_orbax_run(tmp_path) and latest_orbax_checkpoint(tmp_path) is None
    assert list_orbax_checkpoints(tmp_path / "nowhere") == []
    save_checkpoint(tmp_path / "safetensors", _state(cfg), step=1, key=KEY, config=cfg)
    assert not is_orbax_run(tmp_path / "safetensors")
    for step in (1, 2):
        _save(tmp_path / "run", _state(cfg), step, cfg)
    assert is_orbax_run(tmp_path / "run") and is_orbax_run(tmp_path / "run" / "orbax" / "1")
    assert latest_orbax_checkpoint(tmp_path / "run") == tmp_path / "run" / "orbax" / "2"
    with pytest.raises(FileNotFoundError, match="no orbax checkpoint"):
        restore_orbax_checkpoint(tmp_path / "safetensors", _template(cfg))


# --------------------------------------------------------------------------- several devices and processes


def _env(cfg) -> dict[str, str]:
    return dict(os.environ, XLA_FLAGS=_XLA_FLAGS, JAX_PLATFORMS="cpu",
                FLAXGPT_TEST_CONFIG=json.dumps(dataclasses.asdict(cfg)))


def _last_json(proc_out: str) -> dict:
    return json.loads(proc_out.strip().splitlines()[-1])


@pytest.mark.slow
def test_restore_onto_other_meshes_on_8_devices(tiny_config, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(_WORKER), "mesh", str(tmp_path)], env=_env(tiny_config()),
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"orbax worker failed:\n{proc.stderr[-4000:]}"
    out = _last_json(proc.stdout)
    base, mesh = np.array(out["base"]), np.array(out["mesh"])
    assert len(set(base.tolist())) == 4
    np.testing.assert_allclose(mesh, base, rtol=0, atol=1e-5)
    expected_fc1 = {"data=2,fsdp=4": ("P(None, 'fsdp')", 8), "data=8": ("P()", 8), "1 device": ("SingleDeviceSharding", 1)}
    for spec, (fc1, devices) in expected_fc1.items():
        report = out[spec]
        assert report["equal"] and report["shardings_match"] and report["step"] == 2, spec
        assert (report["fc1"], report["fc1_devices"]) == (fc1, devices), spec
        np.testing.assert_allclose(report["losses"], base[2:], rtol=0, atol=1e-5, err_msg=spec)
    assert out["data=2,fsdp=4"]["losses"] == out["mesh"][2:]  # same mesh: bit-identical resume


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_save_restores_on_one_process(tiny_config, tmp_path: Path) -> None:
    env, port = _env(tiny_config()), _free_port()
    procs = [subprocess.Popen([sys.executable, str(_WORKER), "save", str(tmp_path), str(port), str(pid)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for pid in (0, 1)]
    outs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, f"saving process failed:\n{stderr[-4000:]}"
            outs.append(_last_json(stdout))
    finally:
        for proc in procs:
            proc.kill()
    assert [(o["process"], o["local_devices"], o["devices"]) for o in outs] == [(0, 4, 8), (1, 4, 8)]
    assert outs[0]["losses"] == outs[1]["losses"] and outs[0]["steps"] == ["2"]  # keep=1 pruned step 1
    step = tmp_path / "orbax" / "2"
    manifests = [json.loads((step / f"flaxgpt-manifest-{i}.json").read_text())["files"] for i in (0, 1)]
    assert manifests[1] and all("process_1" in f for f in manifests[1])  # process 1 wrote its own shards
    assert "meta/metadata" in manifests[0] and not any("process_1" in f for f in manifests[0])
    assert any(f.startswith("state/ocdbt.process_0/d/") for f in manifests[0])

    proc = subprocess.run([sys.executable, str(_WORKER), "restore", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"restoring process failed:\n{proc.stderr[-4000:]}"
    out = _last_json(proc.stdout)
    np.testing.assert_allclose(outs[0]["losses"], out["base"], rtol=0, atol=1e-5)  # 2 processes = 1 device
    for spec, fc1 in (("data=8", "P()"), ("1 device", "SingleDeviceSharding")):
        report = out[spec]
        assert report["equal"] and report["shardings_match"] and report["fc1"] == fc1, spec
        assert report["saved_by"] == 2 and report["step"] == 2, spec
        np.testing.assert_allclose(report["losses"], outs[0]["losses"][2:], rtol=0, atol=1e-5, err_msg=spec)
