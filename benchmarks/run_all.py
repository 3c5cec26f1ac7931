"""Runs every flaxgpt benchmark, then writes one JSON and one markdown summary against the issue's targets.

In order, each as its own script (which runs each contender in its own process) writing its own
``<name>.json`` / ``<name>.md`` in the results folder:

1. ``flops.py``: float32 matmul FLOP/s of JAX and PyTorch (the peak for MFU), at the start;
2. ``bench_forward.py``: forward B8 x T256 vs Hugging Face ``GPT2LMHeadModel`` eager;
3. ``bench_train.py``: train step B2 x T256 with AdamW vs the same step in PyTorch, and its compile time;
4. ``bench_generate.py``: greedy decode at batch 1 vs Hugging Face ``generate``;
5. ``bench_layers.py``: unrolled vs ``scan_layers`` x remat none/full/dots, compile and step time;
6. ``breakdown.py``: per-op time of the forward, the train step and decoding, flaxgpt beside PyTorch;
7. ``flops.py`` again at the end. The MFU peak is the highest of these probes and the one
   ``bench_forward.py`` takes, so that MFU is not flattered by a probe taken while neighbours kept the
   machine busy; the load averages at start and end are in the header.

Then ``all.json`` (every result, the summary rows and the machine) and ``all.md`` (the machine, the
summary table, the layers table and each benchmark's own table).

    python benchmarks/run_all.py            # ~15-20 minutes on 2 cores
    python benchmarks/run_all.py --quick    # smoke run, ~7 minutes: fewer repeats, fewer contenders
    python benchmarks/run_all.py --aggregate-only   # rebuild all.json / all.md from existing results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import flops  # noqa: E402

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("flops", "forward", "train", "generate", "layers", "breakdown")
SCRIPTS = {"flops": "flops.py", "forward": "bench_forward.py", "train": "bench_train.py",
           "generate": "bench_generate.py", "layers": "bench_layers.py", "breakdown": "breakdown.py"}
# The targets: same-run ratios against PyTorch eager (float32, all cores), the decode bandwidth
# fraction, the train step's compile time, and int8 decode against float32 decode.
TARGETS = {"forward": 1.2, "train": 1.2, "train_compile_s": 3.0, "decode": 1.5, "decode_bound": 0.85,
           "int8": 1.6}


def _args_for(name: str, quick: bool, out: Path) -> list[str]:
    """Command-line arguments of one benchmark script (``--out`` included)."""
    args = ["--out", str(out)]
    if name == "flops":
        args += ["--repeats", "3" if quick else "10"]
    elif name == "forward":
        args += ["--repeats", "2", "--warmup", "1", "--torch-threads", "all"] if quick else ["--repeats", "5"]
    elif name == "train":
        args += ["--repeats", "2", "--warmup", "0", "--skip", "flaxgpt-scan"] if quick else ["--repeats", "5"]
    elif name == "generate":
        if quick:
            args += ["--repeats", "2", "--new-tokens", "50", "--skip", "book", "--torch-threads", "all"]
    elif name == "layers":
        args += ["--repeats", "1", "--warmup", "0", "--only", "unrolled-none", "scan-none"] if quick else []
    elif name == "breakdown":
        args += ["--scan", "--calls", "1" if quick else "2"]
    return args


def _run(name: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    """Runs one benchmark script with its output streamed; returns its status and wall time.

    The script's previous results (the ``--out`` path and its ``.md``) are deleted first, so that a failed
    run cannot leave stale figures in the summary.
    """
    out = Path(args[args.index("--out") + 1])
    for old in (out, out.with_suffix(".md")):
        old.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / SCRIPTS[name]), *args]
    print(f"\n=== {name}: {' '.join(cmd[1:])}  (load {os.getloadavg()[0]:.1f})", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        status = f"timed out after {timeout_s:.0f} s"
    wall = time.perf_counter() - t0
    print(f"=== {name}: {status} in {wall:.0f} s", flush=True)
    return {"status": status, "wall_s": wall, "load_avg_1m_after": os.getloadavg()[0]}


def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _bench_config() -> Any:
    from flaxgpt.config import GPTConfig

    return GPTConfig.preset("gpt2-small", context_length=1024, qkv_bias=True, tie_embeddings=True)


def _tps(r: dict[str, Any] | None, tokens: int) -> float | None:
    return None if r is None else tokens / r["timing"]["median_s"]


def _mfu(flops_per_s: float | None, peak: float | None) -> float | None:
    return None if flops_per_s is None or not peak else 100 * flops_per_s / peak


def _row(bench: str, ours: float | None, ref: float | None, target: float | None, *, compile_s: float | None = None,
         rss: tuple[float | None, float | None] = (None, None),
         mfu: tuple[float | None, float | None] = (None, None), higher_is_better: bool = True) -> dict[str, Any]:
    """One summary row: the ratio is ours / reference (higher is better) or, for a time, the value itself."""
    ratio = ours / ref if ours is not None and ref else None
    met = None
    if target is not None:
        value = ratio if higher_is_better else ours
        if value is not None:
            met = "yes" if (value >= target if higher_is_better else value <= target) else "NO"
    return {"benchmark": bench, "ours": ours, "ref": ref, "ratio": ratio,
            "target": None if target is None else (f">= {target}x" if higher_is_better else f"<= {target} s"),
            "met": met, "compile_s": compile_s, "rss_ours": rss[0], "rss_ref": rss[1],
            "mfu_ours": mfu[0], "mfu_ref": mfu[1]}


def summarize(res: dict[str, Any], peak: float | None) -> list[dict[str, Any]]:
    """The summary rows (flaxgpt vs the PyTorch reference against the issue's targets).

    Args:
      res: ``{benchmark name: its JSON or None}``.
      peak: matmul FLOP/s for MFU.

    Returns:
      Rows for :func:`common.markdown_table` with the columns of :data:`SUMMARY_COLUMNS`.
    """
    cfg = _bench_config()
    rows = []
    fwd = res.get("forward")
    if fwd:
        r, best = fwd["results"], fwd["ratios"].get("best_hf")
        ref = r.get(best) if best else None
        tokens = fwd["setting"]["batch"] * fwd["setting"]["seq"]
        per_token = flops.forward_flops_per_token(cfg, fwd["setting"]["seq"])
        threads = f", HF {ref['torch_threads']} thread(s)" if ref else ""
        for key, label in (("flaxgpt", ""), ("flaxgpt-scan", ", scan_layers (the flaxgpt train default)")):
            if key not in r:
                continue
            ours, theirs = _tps(r[key], tokens), _tps(ref, tokens)
            rows.append(_row(
                f"forward B{fwd['setting']['batch']}xT{fwd['setting']['seq']}{label}{threads} (tokens/s)", ours, theirs,
                TARGETS["forward"], compile_s=r[key]["compile_s"],
                rss=(r[key]["peak_rss_mb"], ref and ref["peak_rss_mb"]),
                mfu=(_mfu(ours * per_token, peak), _mfu(theirs and theirs * per_token, peak)),
            ))
    train = res.get("train")
    if train:
        r, s = train["results"], train["setting"]
        ref = r.get("hf")
        tokens = s["batch"] * s["seq"]
        per_token = flops.train_flops_per_token(cfg, s["seq"])
        threads = f", HF {ref['torch_threads']} thread(s)" if ref else ""
        for key, label in (("flaxgpt", ""), ("flaxgpt-scan", ", scan_layers (the flaxgpt train default)")):
            if key not in r:
                continue
            ours, theirs = _tps(r[key], tokens), _tps(ref, tokens)
            rows.append(_row(
                f"train step B{s['batch']}xT{s['seq']} AdamW{label}{threads} (tokens/s)", ours, theirs,
                TARGETS["train"],
                compile_s=r[key]["compile_s"], rss=(r[key]["peak_rss_mb"], ref and ref["peak_rss_mb"]),
                mfu=(_mfu(ours * per_token, peak), _mfu(theirs and theirs * per_token, peak)),
            ))
            rows.append(_row(f"train step compile{label} (s)", r[key]["compile_s"], None,
                             TARGETS["train_compile_s"], higher_is_better=False))
    gen = res.get("generate")
    if gen:
        r, s = gen["results"], gen["settings"]
        best = gen["ratios"].get("best_hf")
        ref = r.get(best) if best else None
        total = flops.decode_flops(cfg, len(s["prompt"]), s["new_tokens"])
        ours, theirs = r["flaxgpt"]["tokens_per_s"], ref and ref["tokens_per_s"]
        threads = f", HF {ref['torch_threads']} thread(s)" if ref else ""
        rows.append(_row(
            f"decode B1, {s['new_tokens']} new tokens{threads} (tokens/s)", ours, theirs, TARGETS["decode"],
            compile_s=r["flaxgpt"]["compile_s"], rss=(r["flaxgpt"]["peak_rss_mb"], ref and ref["peak_rss_mb"]),
            mfu=(_mfu(total / r["flaxgpt"]["timing"]["median_s"], peak),
                 _mfu(ref and total / ref["timing"]["median_s"], peak)),
        ))
        bound = gen.get("bound_tokens_per_s")
        if bound:
            rows.append(_row("decode B1 vs the memory-bandwidth bound (tokens/s; ratio = fraction)", ours, bound,
                             TARGETS["decode_bound"]))
        if "flaxgpt-int8" in r:
            rows.append(_row("decode B1, int8 weights vs float32 flaxgpt (tokens/s)", r["flaxgpt-int8"]["tokens_per_s"],
                             ours, TARGETS["int8"], rss=(r["flaxgpt-int8"]["peak_rss_mb"], r["flaxgpt"]["peak_rss_mb"])))
    return rows


SUMMARY_COLUMNS = [
    ("benchmark", "benchmark"), ("ours", "flaxgpt"), ("ref", "PyTorch"), ("ratio", "ratio"), ("target", "target"),
    ("met", "met?"), ("compile_s", "flaxgpt compile s"), ("rss_ours", "peak RSS flaxgpt MiB"),
    ("rss_ref", "peak RSS PyTorch MiB"), ("mfu_ours", "MFU flaxgpt %"), ("mfu_ref", "MFU PyTorch %"),
]


def _machine_header(machine: dict[str, Any], probes: list[tuple[str, dict[str, Any]]], peak: float | None,
                    source: str | None, load_end: float | None) -> str:
    lines = [
        f"- Machine: {machine['cpu']}, {machine['cores']} usable cores; Python {machine['python']}, "
        f"jax {machine['jax']}, flax {machine['flax']}, numpy {machine['numpy']}, torch {machine['torch']}, "
        f"transformers {machine['transformers']}.",
        f"- 1-minute load average: {machine['load_avg_1m']:.1f} at start"
        + (f", {load_end:.1f} at end" if load_end is not None else "")
        + f" (on {machine['cores']} cores; a figure taken right after a benchmark includes that benchmark's own "
        "load of about the core count, so only the excess is other processes).",
    ]
    for when, pr in probes:
        lines.append(
            f"- float32 matmul 2048^3 ({when}): JAX {pr['jax']['square'] / 1e9:.1f} GFLOP/s, "
            f"PyTorch {pr['torch']['square'] / 1e9:.1f} GFLOP/s; FFN-shaped 2048x768x3072: "
            f"JAX {pr['jax']['ffn_b8t256'] / 1e9:.1f}, PyTorch {pr['torch']['ffn_b8t256'] / 1e9:.1f} GFLOP/s."
        )
    if peak:
        lines.append(f"- MFU peak: {peak / 1e9:.1f} GFLOP/s ({source}: the fastest matmul above); model FLOPs "
                     "2N + 4LTd per forward token, 3x that per train token (see `flops.py`).")
    return "\n".join(lines)


def aggregate(results_dir: Path, runs: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Reads each benchmark's JSON from ``results_dir`` and builds ``all.json`` data and ``all.md`` text."""
    res = {name: _load(results_dir / f"{name}.json") for name in BENCHMARKS}
    end_probe = _load(results_dir / "flops_end.json")
    forward_probe = res["forward"] and res["forward"]["matmul"]
    candidates = (("at start", res["flops"]), ("before the forward benchmark", forward_probe), ("at end", end_probe))
    probes = [(when, p) for when, p in candidates if p and "jax" in p]
    best = max(probes, key=lambda wp: wp[1]["peak"], default=None)
    peak = best and best[1]["peak"]
    source = best and f"{best[1]['peak_source']}, {best[0]}"
    load_end = end_probe["machine"]["load_avg_1m"] if end_probe else None
    start = next((r["machine"] for r in res.values() if r and "machine" in r), None) or common.machine_info()
    rows = summarize(res, peak)

    md = ["# flaxgpt benchmarks", "", _machine_header(start, probes, peak, source, load_end), "",
          "## Summary (flaxgpt vs PyTorch eager, float32, GPT-2 124M shapes)", "",
          common.markdown_table(rows, SUMMARY_COLUMNS) if rows else "(no results)", "",
          "Ratios are flaxgpt / PyTorch (the faster PyTorch thread setting where several were run). MFU in this "
          "table is against the MFU peak above; the forward table below uses the probe taken just before it.", ""]
    if res["layers"]:
        md += ["## Layer loop and remat (train step)", "", (results_dir / "layers.md").read_text(encoding="utf-8"), ""]
    for name, title in (("forward", "Forward"), ("train", "Train step"), ("generate", "Decode"),
                        ("breakdown", "Where the time goes (per-op breakdown)")):
        md_path = results_dir / f"{name}.md"
        if res[name] and md_path.exists():
            md += [f"## {title}", "", md_path.read_text(encoding="utf-8"), ""]
    failed = {k: v["status"] for k, v in runs.items() if v.get("status") != "ok"}
    if failed:
        md += ["## Failures", ""] + [f"- {k}: {v}" for k, v in failed.items()] + [""]
    data = {"machine": start, "load_avg_1m_end": load_end, "matmul_peak_flops": peak, "matmul_peak_source": source,
            "targets": TARGETS, "summary": rows, "runs": runs, "results": res, "flops_end": end_probe}
    return data, "\n".join(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: fewer repeats and contenders")
    p.add_argument("--only", nargs="*", choices=BENCHMARKS[1:], help="benchmarks to run (default: all)")
    p.add_argument("--aggregate-only", action="store_true", help="only rebuild all.json / all.md")
    p.add_argument("--results-dir", help="default: benchmarks/results (benchmarks/results/quick with --quick)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds allowed per benchmark script")
    args = p.parse_args(argv)
    results_dir = Path(args.results_dir or HERE / "results" / ("quick" if args.quick else ""))
    results_dir.mkdir(parents=True, exist_ok=True)

    runs: dict[str, Any] = {}
    t0 = time.perf_counter()
    if not args.aggregate_only:
        selected = args.only or BENCHMARKS[1:]
        runs["flops"] = _run("flops", _args_for("flops", args.quick, results_dir / "flops.json"), args.timeout)
        for name in selected:
            runs[name] = _run(name, _args_for(name, args.quick, results_dir / f"{name}.json"), args.timeout)
        runs["flops_end"] = _run("flops", _args_for("flops", args.quick, results_dir / "flops_end.json"), args.timeout)
    previous = _load(results_dir / "all.json") if args.aggregate_only else None
    if previous:  # keep the record of the run that produced the results
        runs = previous.get("runs", {})
    data, md = aggregate(results_dir, runs)
    data["total_wall_s"] = previous.get("total_wall_s") if previous else time.perf_counter() - t0
    data["quick"] = previous.get("quick", args.quick) if previous else args.quick
    json_path, md_path = common.write_results(results_dir / "all.json", data, md)
    print("\n" + md)
    print(f"\nwrote {json_path} and {md_path} ({(data['total_wall_s'] or 0) / 60:.1f} min)")
    return 0 if all(r["status"] == "ok" for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
