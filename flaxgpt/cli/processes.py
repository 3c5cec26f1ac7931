"""The multi-process options that ``flaxgpt train`` and ``flaxgpt finetune`` share: joining a
``jax.distributed`` job before any other JAX call, and keeping the other processes quiet."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from flaxgpt.cli import CLIError

__all__ = ["add_process_args", "start_processes", "step_watchdog"]

DEFAULT_STEP_TIMEOUT = 600.0  # seconds without a finished step before a process of a multi-process job gives up


def add_process_args(p: argparse.ArgumentParser) -> None:
    """Adds ``--coordinator``, ``--num-processes``, ``--process-id``, ``--step-timeout`` and
    ``--checkpoint-format`` to a command's parser."""
    g = p.add_argument_group(
        "several processes (hosts)",
        "One process per host, each started with the same options and its own --process-id; on SLURM and TPU "
        "pods the three are detected from the environment. The mesh (--mesh, default data=<all devices>) spans "
        "every process's devices; --batch-size is the global batch, of which each process loads its share.",
    )
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address and a free port")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    g.add_argument("--step-timeout", type=float, metavar="S",
                   help=f"on several processes, exit (status 3) when no step finishes for S seconds, e.g. after "
                   f"another process died (default {DEFAULT_STEP_TIMEOUT:g}; 0 = never)")
    g.add_argument("--checkpoint-format", choices=("auto", "safetensors", "orbax"),
                   help="checkpoints as safetensors + JSON (one process) or sharded orbax (every process "
                   "writes its shards); default auto: orbax on several processes or for a run that has them")
    g.add_argument("--async-checkpoints", action="store_true",
                   help="write orbax checkpoints in the background while training continues")


def start_processes(args: argparse.Namespace) -> bool:
    """Joins the multi-process job the options (or the environment) describe; call before any JAX call.

    On processes other than 0, standard output and INFO logging are silenced: process 0 reports.

    Args:
      args: the parsed options.

    Returns:
      True on several processes.

    Raises:
      CLIError: bad options, or the processes could not join.
    """
    from flaxgpt.distributed import initialize, is_primary

    try:
        multi = initialize(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                           getattr(args, "process_id", None))
    except (ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from e
    if multi and not is_primary():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        logging.getLogger().setLevel(logging.WARNING)
    return multi


@contextlib.contextmanager
def step_watchdog(args: argparse.Namespace, multi: bool) -> Iterator[Any]:
    """A :class:`flaxgpt.distributed.Watchdog` for a multi-process run (a no-op on one process); yields its
    ``beat``, to call after each step."""
    from flaxgpt.distributed import Watchdog

    timeout = getattr(args, "step_timeout", None)
    timeout = (DEFAULT_STEP_TIMEOUT if timeout is None else timeout) if multi else 0
    with Watchdog(timeout, "the other processes") as dog:
        yield dog.beat
