"""Several processes (hosts) on JAX's multi-controller runtime: start-up, who writes, and a watchdog.

One JAX process runs per host and sees only its own devices; :func:`initialize` joins them
(``jax.distributed.initialize``) before any other JAX call, after which ``jax.devices()`` lists every
process's devices and a mesh spans them all (:func:`flaxgpt.sharding.make_mesh`). On CPU the processes'
collectives go through gloo. Every process runs the same program (each jitted step is a collective); only
process 0 writes logs, metrics and figures (:func:`is_primary`), while every process writes its own shards
of a checkpoint (:mod:`flaxgpt.io.orbax_checkpoint`).

A process that dies leaves the others blocked in a collective. The coordination service notices a
missing heartbeat (``heartbeat_timeout`` seconds), and :class:`Watchdog` ends a process whose steps stop
making progress with one clear line and exit status 3, so a job never hangs.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any

__all__ = ["CLUSTER_ENV", "initialize", "is_primary", "process_count", "process_index", "Watchdog", "WATCHDOG_EXIT"]

logger = logging.getLogger(__name__)

# Environment variables by which jax.distributed.initialize() finds the cluster without arguments (SLURM only
# with more than one task: a one-task job inside an allocation is one process).
CLUSTER_ENV = ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")
WATCHDOG_EXIT = 3
_initialized = False


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: int = 300,
    heartbeat_timeout: int = 30,
) -> bool:
    """Joins this process to a multi-process JAX job; call it before any other JAX call.

    With ``coordinator`` (``HOST:PORT`` of process 0), ``num_processes`` and ``process_id`` given, those are
    used; without them, the cluster is detected from the environment when it names one (SLURM, TPU pods,
    Open MPI, or ``JAX_COORDINATOR_ADDRESS``), and otherwise nothing happens (one process).

    Args:
      coordinator: ``HOST:PORT`` of process 0's coordination service.
      num_processes: the number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      timeout: seconds to wait for every process to join.
      heartbeat_timeout: seconds after which a silent process counts as dead.

    Returns:
      True when this is a multi-process job (initialized now or before), False for one process.

    Raises:
      ValueError: an incomplete or inconsistent set of arguments.
      RuntimeError: the processes could not join within ``timeout`` (the reason included).
    """
    global _initialized
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise ValueError("--coordinator, --num-processes and --process-id go together (or none, to detect a cluster)")
    if all(given):
        if ":" not in str(coordinator):
            raise ValueError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
        if num_processes < 1 or not 0 <= process_id < num_processes:  # type: ignore[operator]
            raise ValueError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if num_processes == 1:
            return False
    elif not _cluster_in_environment():
        return False
    if _initialized:
        return True
    import jax

    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
    # JAX's preemption service catches SIGTERM and then waits at a sync point that a stopped peer never
    # reaches: off, so a signal ends this process and the watchdog or the heartbeat ends the others.
    jax.config.update("jax_enable_preemption_service", False)
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id, initialization_timeout=timeout,
            heartbeat_timeout_seconds=heartbeat_timeout, shutdown_timeout_seconds=min(60, timeout),
        )
    except Exception as e:  # the runtime raises several types: report one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(f"could not join the multi-process job at {coordinator or 'the detected cluster'}: "
                           f"{first}") from e
    _initialized = True
    if jax.process_index() == 0:
        logger.info("%d processes, %d devices (%d on this one)", jax.process_count(), jax.device_count(),
                    jax.local_device_count())
    return True


def _cluster_in_environment() -> bool:
    """A multi-process job that jax.distributed.initialize() can find without arguments."""
    if os.environ.get("SLURM_NTASKS", "1").strip() not in ("", "1"):
        return True
    return any(os.environ.get(v) for v in CLUSTER_ENV if v != "SLURM_NTASKS")


def process_index() -> int:
    """This process's index (0 on one process)."""
    import jax

    return int(jax.process_index())


def process_count() -> int:
    """The number of processes (1 on one process)."""
    import jax

    return int(jax.process_count())


def is_primary() -> bool:
    """True on process 0, the one that writes logs, metrics and figures."""
    return process_index() == 0


class Watchdog:
    """Ends the process with one clear line and exit status :data:`WATCHDOG_EXIT` when :meth:`beat` has not
    been called for ``timeout`` seconds (a peer died and this process waits in a collective forever).

    Use as a context manager around training, and call :meth:`beat` after every step. With ``timeout``
    None or 0 it does nothing.

    Args:
      timeout: seconds without progress before exiting.
      what: words for the message.
    """

    def __init__(self, timeout: float | None, what: str = "a step") -> None:
        self.timeout = float(timeout or 0)
        self.what = what
        self._last = time.monotonic()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, *_: Any) -> None:
        """Records progress (any arguments are ignored, so it can be a callback)."""
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._done.wait(min(1.0, self.timeout / 4)):
            idle = time.monotonic() - self._last
            if idle > self.timeout:
                sys.stderr.write(
                    f"flaxgpt: error: process {process_index()} made no progress for {idle:.0f}s waiting on "
                    f"{self.what}: another process of the job has probably died; exiting (restart every "
                    "process with --resume to continue from the last checkpoint)\n"
                )
                sys.stderr.flush()
                os._exit(WATCHDOG_EXIT)

    def __enter__(self) -> Watchdog:
        if self.timeout > 0:
            self._last = time.monotonic()
            self._thread = threading.Thread(target=self._watch, name="flaxgpt-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
