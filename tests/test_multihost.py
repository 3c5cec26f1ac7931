"""Several processes: ``flaxgpt train`` under ``jax.distributed`` (flaxgpt/distributed.py, cli/processes.py)
with sharded orbax checkpoints, on this machine: 2 local processes x 4 CPU devices (gloo collectives) against
1 process x 8 devices, a process killed mid-run, an exact relaunch, and a restore onto other meshes.

Each run is a real ``python -m flaxgpt train`` subprocess with a bounded timeout; ports are picked free at
run time."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

STEPS, EVERY = 12, 4
RUN_TIMEOUT = 240  # seconds for one training subprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "SLURM_", "TPU_", "OMPI_"))}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    import numpy as np

    words = "the quick brown fox jumps over a lazy dog while seven wizards quietly box jugs".split()
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("mh") / "t.txt"
    path.write_text(" ".join(rng.choice(words, 3000)), encoding="utf-8")
    return path


def _argv(text: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flaxgpt", "train", "--text", str(text), "--tokenizer", "bytes", "--out", str(out),
            "--emb-dim", "32", "--n-layers", "2", "--n-heads", "2", "--context-length", "16", "--batch-size", "8",
            "--max-steps", str(STEPS), "--eval-freq", "2", "--eval-iter", "2", "--checkpoint-every", str(EVERY),
            "--keep-checkpoints", "5", "--lr", "3e-3", *extra]


def _one(text: Path, out: Path, devices: int, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(_argv(text, out, *extra), env=_env(devices), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def _start_two(text: Path, out: Path, *extra: str, step_timeout: int = 30) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen(_argv(text, out, "--mesh", "data=2,fsdp=4", "--coordinator", f"127.0.0.1:{port}",
                                   "--num-processes", "2", "--process-id", str(i), "--step-timeout",
                                   str(step_timeout), *extra),
                             env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _wait(procs: list[subprocess.Popen], timeout: float = RUN_TIMEOUT) -> list[tuple[int, str, str]]:
    out = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("a process of the job hung") from None
        out.append((p.returncode, stdout, stderr))
    return out


def _own_lines(stdout: str) -> list[str]:
    """The lines of a process's stdout less gloo's own C++ lines ("[Gloo] Rank 2 is connected to 3 peer ranks.
    Expected number of connected peer ranks is : 3"), which its threads write unsynchronised, so that one can
    be cut into pieces on two lines."""
    gloo_piece = re.compile(r"\[Gloo\]|peer ranks|^[\s\d:.]*$")
    return [line for line in stdout.splitlines() if not gloo_piece.search(line)]


def _metrics(run: Path) -> dict[int, tuple[float, float]]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: (r["train_loss"], r["val_loss"]) for r in map(json.loads, lines)}


def _close(a: dict, b: dict, steps) -> None:
    for step in steps:
        assert a[step] == pytest.approx(b[step], abs=1e-5), (step, a[step], b[step])


@pytest.fixture(scope="module")
def reference(text: Path, tmp_path_factory) -> Path:
    """1 process, 8 devices, the same mesh shape: the run the two processes must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "run"
    r = _one(text, out, 8, "--mesh", "data=2,fsdp=4", "--checkpoint-format", "orbax")
    assert r.returncode == 0, r.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two(text: Path, tmp_path_factory) -> tuple[Path, list[tuple[int, str, str]]]:
    """2 processes x 4 devices on data=2,fsdp=4: the run and each process's (rc, stdout, stderr)."""
    out = tmp_path_factory.mktemp("two") / "run"
    return out, _wait(_start_two(text, out, "--async-checkpoints"))


def test_two_processes_train_like_one(two, reference: Path) -> None:
    out, results = two
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i}: {err[-3000:]}"
    assert "model:" in results[0][1] and _own_lines(results[1][1]) == []  # process 1 prints nothing: 0 reports
    want, got = _metrics(reference), _metrics(out)
    assert sorted(got) == sorted(want) and max(got) == STEPS
    _close(got, want, want)
    steps = sorted(int(p.name) for p in (out / "orbax").iterdir() if p.name.isdigit())
    assert steps == [4, 8, 12]
    assert len(list((out / "orbax" / "12").glob("flaxgpt-manifest-*.json"))) == 2  # one per process


def test_a_killed_process_ends_the_job_and_a_relaunch_resumes_exactly(text: Path, reference: Path,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "killed"
    procs = _start_two(text, out, "--max-steps", "400", "--checkpoint-every", str(EVERY))
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (out / "orbax" / str(2 * EVERY)).is_dir():  # two checkpoints written: kill mid-run
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint in time"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    (rc0, _, err0), _ = _wait(procs, timeout=120)
    assert rc0 != 0 and time.monotonic() - t0 < 120
    assert "process" in err0 and ("died" in err0 or "progress" in err0 or "heartbeat" in err0.lower()), err0[-2000:]

    # Relaunch both: the run continues from its newest complete checkpoint, as if never stopped.
    results = _wait(_start_two(text, out, "--resume"))
    for i, (rc, _, err) in enumerate(results):
        assert rc == 0, f"process {i}: {err[-3000:]}"
    assert "resuming" in results[0][1]
    want, got = _metrics(reference), _metrics(out)
    _close(got, want, [s for s in want if s > 2 * EVERY])


@pytest.mark.parametrize("devices, mesh", [(8, "data=8"), (1, None)])
def test_a_two_process_checkpoint_resumes_on_another_mesh(text: Path, two, reference: Path, tmp_path: Path,
                                                          devices, mesh) -> None:
    import shutil

    out = tmp_path / "elsewhere"
    shutil.copytree(two[0], out)  # written by 2 processes on data=2,fsdp=4: keep its step-4 checkpoint only
    for p in (out / "orbax").iterdir():
        if p.name.isdigit() and int(p.name) > EVERY:
            shutil.rmtree(p)
    r = _one(text, out, devices, "--resume", *(("--mesh", mesh) if mesh else ()))
    assert r.returncode == 0, r.stderr[-3000:]
    want, got = _metrics(reference), _metrics(out)
    _close(got, want, [s for s in want if s > EVERY])


def test_finetune_classify_on_two_processes(text: Path, data_csv: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    r = _one(text, base, 1, "--max-steps", "2", "--checkpoint-every", "0")
    assert r.returncode == 0, r.stderr[-3000:]

    def argv(out: Path) -> list[str]:
        return [sys.executable, "-m", "flaxgpt", "finetune", "classify", "--checkpoint", str(base), "--data",
                str(data_csv), "--out", str(out), "--batch-size", "8", "--eval-freq", "2", "--eval-iter", "1",
                "--lr", "1e-3", "--epochs", "1", "--max-steps", "4", "--lora-rank", "2"]

    one = subprocess.run(argv(tmp_path / "one"), env=_env(1), capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(argv(tmp_path / "two") + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                                                        "--process-id", str(i), "--step-timeout", "60"],
                              env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for i, (rc, _, err) in enumerate(_wait(procs)):
        assert rc == 0, f"process {i}: {err[-3000:]}"
    want, got = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert sorted(got) == sorted(want)
    for step in want:  # the training loss of the same global batches (evaluations read full batches only)
        assert got[step][0] == pytest.approx(want[step][0], abs=1e-5)
    assert (tmp_path / "two" / "adapters" / "lora.json").is_file()  # gathered from both processes
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["trainable_params"] == json.loads((tmp_path / "one" / "results.json").read_text())["trainable_params"]


def test_a_signal_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(text: Path, tmp_path: Path) -> None:
    out = tmp_path / "signal"
    # Evaluations of 40 batches fill most of each process's time, so the signal most likely comes while process
    # 1 evaluates, after the step's batch count was summed: the stop is still decided at one point for both.
    procs = _start_two(text, out, "--max-steps", "2000", "--checkpoint-every", str(EVERY), "--eval-iter", "40",
                       step_timeout=60)
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (out / "orbax" / str(EVERY)).is_dir():
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "no checkpoint in time"
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # SLURM or a TPU runtime may signal the processes one by one
    (rc0, out0, _), (rc1, _, err1) = _wait(procs, timeout=120)
    assert rc0 == rc1 == 128 + signal.SIGTERM, err1[-2000:]
    step = int(out0.split("step ", 1)[1].split(" ", 1)[0])
    assert (out / "orbax" / str(step) / "flaxgpt-manifest-1.json").is_file()  # saved together, complete
