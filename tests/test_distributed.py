"""Tests for flaxgpt/distributed.py: joining a job (argument checks; the 2-process runs are in
tests/test_multihost.py) and the watchdog that ends a process whose peers died."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from flaxgpt.distributed import WATCHDOG_EXIT, Watchdog, initialize, is_primary


def test_one_process_needs_no_job(monkeypatch) -> None:
    for var in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert initialize() is False
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # one task of a SLURM allocation is one process
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert initialize() is False
    assert initialize("127.0.0.1:1234", 1, 0) is False  # one process: nothing to join
    assert is_primary()


@pytest.mark.parametrize("args, match", [
    (("127.0.0.1:1234", 2, None), "go together"),
    (("127.0.0.1", 2, 0), "HOST:PORT"),
    (("127.0.0.1:1234", 2, 2), r"--process-id must be in \[0, 2\)"),
])
def test_bad_job_arguments_are_clear(args, match) -> None:
    with pytest.raises(ValueError, match=match):
        initialize(*args)


def test_watchdog_ends_a_stuck_process_with_one_line() -> None:
    code = textwrap.dedent("""
        import time
        from flaxgpt.distributed import Watchdog
        with Watchdog(1.0, "the other processes") as dog:
            dog.beat()
            time.sleep(30)  # a collective that never returns
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"})
    assert r.returncode == WATCHDOG_EXIT, r.stderr
    assert "made no progress" in r.stderr and "--resume" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_watchdog_stays_quiet_while_steps_finish() -> None:
    import time

    with Watchdog(0.5) as dog:
        for _ in range(6):
            time.sleep(0.2)
            dog.beat()
    with Watchdog(0):  # off
        time.sleep(0.1)
