"""Shared helpers for flaxgpt benchmarks: timing, memory, a bandwidth probe, machine facts, output.

Every benchmark script should:
  * time with :func:`time_calls` (one warm-up call, then the median of ``repeats`` calls),
  * run each contender in its own process with :func:`run_isolated` so that peak RSS and thread pools
    are its own (:func:`peak_rss_mb` read at the end of that process),
  * write its results with :func:`write_results` (JSON + a markdown table beside it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class Timing:
    """Wall-clock seconds of one first call and ``repeats`` further calls."""

    first_s: float
    runs_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    @property
    def min_s(self) -> float:
        return min(self.runs_s)

    def to_dict(self) -> dict[str, Any]:
        return {"first_s": self.first_s, "median_s": self.median_s, "min_s": self.min_s, "runs_s": self.runs_s}


def time_calls(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> Timing:
    """Times ``fn()`` (which must block until its result is ready, e.g. by converting to numpy).

    Args:
      fn: the call to time.
      repeats: timed calls after the warm-up.
      warmup: untimed calls after the first one (the first call, which includes any compilation, is
        timed separately as ``first_s``).

    Returns:
      A :class:`Timing`.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        fn()
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return Timing(first, runs)


def usable_cores() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def memory_bandwidth_gbs(nbytes: int = 512 * 2**20, repeats: int = 7, threads: int | None = None) -> dict[str, Any]:
    """Measures read bandwidth from DRAM: the best of two streaming reads of an ``nbytes`` float32 array
    (far larger than any cache), each the median of ``repeats`` passes after one warm-up.

    * ``dot``: a BLAS dot product of one contiguous chunk per thread with itself (numpy releases the
      GIL; ``np.add.reduce`` would be compute-bound, not memory-bound).
    * ``gemv``: a matrix-vector product over the whole array (the BLAS threads itself; the access
      pattern of a batch-1 decode step).

    Args:
      nbytes: bytes to stream per pass.
      repeats: timed passes per method.
      threads: threads for ``dot`` (default: the CPUs this process may use).

    Returns:
      ``{"gbs": best GB/s (1e9 bytes/s), "method": its name, "by_method": {name: GB/s}, "bytes": nbytes}``.
    """
    threads = threads or usable_cores()
    a = np.ones(nbytes // 4, np.float32)
    chunks = np.array_split(a, threads)
    matrix = a.reshape(-1, 1024)  # (N, 1024)
    vector = np.ones(1024, np.float32)
    with ThreadPoolExecutor(threads) as pool:
        methods = {
            "dot": lambda: list(pool.map(np.dot, chunks, chunks)),
            "gemv": lambda: matrix @ vector,
        }
        by_method = {name: a.nbytes / time_calls(fn, repeats).median_s / 1e9 for name, fn in methods.items()}
    best = max(by_method, key=by_method.get)
    return {"gbs": by_method[best], "method": best, "by_method": by_method, "bytes": a.nbytes}


# The instruction-set extensions that decide CPU speed here (matmul width, bf16/int8 units), as /proc/cpuinfo names them.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def machine_info() -> dict[str, Any]:
    """CPU model with its relevant ISA flags (AVX2, AVX-512, AMX...), usable cores, load average and library
    versions, for the results header: every result names the CPU kind it was measured on."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:  # the first processor's fields
                key, _, value = line.partition(":")
                if not key.strip():
                    break
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ISA_FLAGS if f in flags]
    info: dict[str, Any] = {
        "cpu": f"{model} [{' '.join(isa) or 'no AVX2'}]",
        "isa": isa,
        "cores": usable_cores(),
        "python": platform.python_version(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for lib in ("jax", "flax", "numpy", "torch", "transformers"):
        try:
            info[lib] = __import__(lib).__version__
        except ImportError:
            info[lib] = None
    return info


def run_isolated(argv: Sequence[str], timeout_s: float | None = None) -> dict[str, Any]:
    """Runs ``python *argv --result-json PATH`` in a fresh process and returns the JSON it wrote.

    The child must write a JSON object to the path given after ``--result-json``.

    Args:
      argv: script path and arguments.
      timeout_s: kill the child after this many seconds.

    Returns:
      The child's JSON object.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "result.json"
        cmd = [sys.executable, *argv, "--result-json", str(path)]
        proc = subprocess.run(cmd, timeout=timeout_s, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(path, encoding="utf-8") as f:
            return json.load(f)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A GitHub markdown table.

    Args:
      rows: one dict per row.
      columns: ``(key, header)`` pairs; floats print with 3 significant digits (at least one decimal).

    Returns:
      The table text.
    """

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 100 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(k)) for k, _ in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_results(path: str | Path, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Writes ``data`` as JSON to ``path`` and ``markdown`` to the same path with a ``.md`` suffix.

    Returns:
      The two paths written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    md = path.with_suffix(".md")
    md.write_text(markdown.rstrip() + "\n", encoding="utf-8")
    return path, md


def publish(path: str | Path, data: dict[str, Any], markdown: str) -> None:
    """Writes the results (see :func:`write_results`) and prints the markdown and where it went."""
    json_path, md_path = write_results(path, data, markdown)
    print(markdown)
    print(f"wrote {json_path} and {md_path}")


def parse_thread_counts(spec: str) -> list[int]:
    """Parses ``--torch-threads`` ("all,1" -> [usable cores, 1]); duplicates dropped, order kept.

    Raises:
      ValueError: an entry is neither an integer >= 1 nor "all".
    """
    counts = [usable_cores() if t.strip() == "all" else int(t) for t in spec.split(",")]
    if any(n < 1 for n in counts):
        raise ValueError(f"thread counts must be >= 1, got {spec!r}")
    return list(dict.fromkeys(counts))


def torch_result(model: Any, timing: Timing, **extra: Any) -> dict[str, Any]:
    """The result record of a PyTorch contender: parameter count, timings, peak RSS, attention
    implementation and torch's thread count (PyTorch has no compile step)."""
    import torch

    return {
        "params": sum(p.numel() for p in model.parameters()),
        "compile_s": None,
        "timing": timing.to_dict(),
        "peak_rss_mb": peak_rss_mb(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "torch_threads": torch.get_num_threads(),
        **extra,
    }


def torch_train_step(model: Any, opt: Any, x: Any, y: Any) -> Callable[[], None]:
    """The book's ``train_model_simple`` inner loop for a Hugging Face GPT-2 in PyTorch: zero_grad, forward,
    cross-entropy over every position, backward, optimizer step, and ``loss.item()`` (which waits for it).

    Args:
      model: a ``GPT2LMHeadModel`` in training mode.
      opt: its optimizer.
      x: (B, T) int64 input ids.
      y: (B, T) int64 target ids.

    Returns:
      A function running one step.
    """
    import torch

    def step() -> None:
        opt.zero_grad()
        logits = model(input_ids=x).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        loss.item()

    return step
