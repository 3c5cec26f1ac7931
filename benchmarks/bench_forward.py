"""Forward-pass speed: flaxgpt's jitted forward (unrolled and ``scan_layers=True``) vs Hugging Face
``GPT2LMHeadModel`` in PyTorch eager, in one run, with compile time, peak RSS and MFU.

GPT-2 124M shapes (tied head, qkv bias, as the GPT-2 checkpoints), context 256, batch 8 x 256 tokens,
float32, deterministic (no dropout), random weights and tokens; the output is the full (8, 256, 50257)
float32 logits in both. Each contender runs in its own process: the first call (timed separately; for
flaxgpt it includes tracing and compilation, whose seconds are also read from ``jax.monitoring``), then
``--warmup`` untimed calls and the median of ``--repeats`` calls. tokens/s = B * T / median seconds.
flaxgpt is called through its public :func:`flaxgpt.nn.model.forward` (host-side id validation included);
PyTorch runs under ``torch.inference_mode()``, once with ``torch.set_num_threads(all usable cores)`` and
once with 1 thread (``--torch-threads``); ratios are against the faster of the two.

MFU = model FLOPs per token (:func:`flops.forward_flops_per_token`) x tokens/s / the float32 matmul
FLOP/s measured in the same run (:func:`flops.matmul_flops_per_s`; pass ``--peak-flops`` to reuse one).

    python benchmarks/bench_forward.py          # ~4 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import flops  # noqa: E402
import numpy as np  # noqa: E402

BATCH, SEQ = 8, 256
CONTENDERS = ("flaxgpt", "flaxgpt-scan", "hf")
LABELS = {
    "flaxgpt": "flaxgpt `forward` (jit)",
    "flaxgpt-scan": "flaxgpt `forward`, `scan_layers=True`",
    "hf": "Hugging Face `GPT2LMHeadModel` (PyTorch eager, inference_mode)",
}


def _config(scan: bool = False) -> Any:
    from flaxgpt.config import GPTConfig

    return GPTConfig.preset(
        "gpt2-small", context_length=SEQ, qkv_bias=True, tie_embeddings=True, drop_rate=0.0, scan_layers=scan
    )


def _ids() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 50257, size=(BATCH, SEQ), dtype=np.int64).astype(np.int32)  # (B, T)


def run_flaxgpt(repeats: int, warmup: int, scan: bool) -> dict[str, Any]:
    """Times :func:`flaxgpt.nn.model.forward` in this process."""
    import jax

    from flaxgpt.nn.model import GPTModel, forward
    from flaxgpt.nn.params import count_params, init_params

    cfg = _config(scan)
    model, params = GPTModel(cfg), init_params(cfg, jax.random.key(0))
    jax.block_until_ready(params)
    ids = _ids()

    totals = {"trace": 0.0, "lower": 0.0, "compile": 0.0}
    events = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
        "/jax/core/compile/backend_compile_duration": "compile",
    }

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event in events:
            totals[events[event]] += duration

    def call() -> None:
        jax.block_until_ready(forward(model, params, ids))  # (B, T, V)

    jax.monitoring.register_event_duration_secs_listener(listener)
    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    jax.monitoring.unregister_event_duration_listener(listener)
    timing = common.time_calls(call, repeats=repeats, warmup=warmup)  # its first call is a warm-up
    timing.first_s = first
    return {
        "params": count_params(params),
        "compile_s": sum(totals.values()),
        "compile_breakdown_s": totals,
        "timing": timing.to_dict(),
        "peak_rss_mb": common.peak_rss_mb(),
    }


def run_hf(repeats: int, warmup: int, threads: int) -> dict[str, Any]:
    """Times Hugging Face ``GPT2LMHeadModel`` eager forward in this process with ``threads`` threads."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=50257, n_positions=SEQ, n_embd=768, n_layer=12, n_head=12)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.from_numpy(_ids().astype(np.int64))  # (B, T)

    def call() -> None:
        with torch.inference_mode():
            _ = model(input_ids=ids, use_cache=False).logits  # (B, T, V)

    timing = common.time_calls(call, repeats=repeats, warmup=warmup + 1)  # first call + `warmup` more
    return common.torch_result(model, timing)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed calls per contender (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (default 1)")
    p.add_argument("--skip", nargs="*", default=[], choices=CONTENDERS, help="contenders to leave out")
    p.add_argument("--torch-threads", default="all,1",
                   help="comma-separated torch thread counts to run PyTorch with ('all' = every usable core); "
                        "ratios are against the fastest (default all,1)")
    p.add_argument("--peak-flops", type=float, help="matmul FLOP/s for MFU (default: measure it now)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "forward.json"))
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    try:
        threads = common.parse_thread_counts(args.torch_threads)
    except ValueError:
        p.error(f"--torch-threads must be comma-separated integers >= 1 or 'all', got {args.torch_threads!r}")

    if args.contender:
        if args.contender == "hf":
            result = run_hf(args.repeats, args.warmup, threads[0])
        else:
            result = run_flaxgpt(args.repeats, args.warmup, scan=args.contender == "flaxgpt-scan")
        Path(args.result_json).write_text(json.dumps(result), encoding="utf-8")
        return 0

    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_1m']:.2f}", flush=True)
    if args.peak_flops:
        peak = {"peak": args.peak_flops, "peak_source": "given by --peak-flops"}
    else:
        peak = flops.matmul_flops_per_s()
    print(f"matmul peak: {peak['peak'] / 1e9:.1f} GFLOP/s ({peak['peak_source']})", flush=True)
    flops_per_token = flops.forward_flops_per_token(_config(), SEQ)

    runs = [(name, name, "0") for name in CONTENDERS[:2] if name not in args.skip]
    if "hf" not in args.skip:
        runs += [(f"hf_t{n}", "hf", str(n)) for n in threads]
    results: dict[str, Any] = {}
    script = str(Path(__file__).resolve())
    for key, name, n in runs:
        print(f"running {key} ...", flush=True)
        r = common.run_isolated([script, "--contender", name, "--repeats", str(args.repeats),
                                 "--warmup", str(args.warmup), "--torch-threads", n if name == "hf" else "1"])
        r["tokens_per_s"] = BATCH * SEQ / r["timing"]["median_s"]
        r["mfu"] = flops.mfu(flops_per_token, r["tokens_per_s"], peak["peak"])
        results[key] = r
        print(f"  {r['tokens_per_s']:.0f} tokens/s", flush=True)

    hf_keys = [k for k in results if k.startswith("hf_")]
    best_hf = max(hf_keys, key=lambda k: results[k]["tokens_per_s"]) if hf_keys else None
    ratios: dict[str, Any] = {"best_hf": best_hf}
    rows = []
    for key, r in results.items():
        label = LABELS["hf"] + f", {r['torch_threads']} thread(s)" if key.startswith("hf_") else LABELS[key]
        row = {"name": label, "key": key, "params_m": r["params"] / 1e6, "compile_s": r["compile_s"],
               "first_s": r["timing"]["first_s"], "call_s": r["timing"]["median_s"],
               "tokens_s": r["tokens_per_s"], "mfu_pct": 100 * r["mfu"], "rss": r["peak_rss_mb"]}
        if best_hf:
            row["speedup"] = r["tokens_per_s"] / results[best_hf]["tokens_per_s"]
            ratios[f"{key}_vs_hf"] = row["speedup"]
        rows.append(row)
    columns = [("name", "contender"), ("params_m", "params (M)"), ("compile_s", "JAX compile s"),
               ("first_s", "first call s"), ("call_s", "median call s"), ("tokens_s", "tokens/s"),
               ("speedup", "vs best PyTorch"), ("mfu_pct", "MFU %"), ("rss", "peak RSS MiB")]
    header = (f"Forward, GPT-2 124M shapes, B{BATCH} x T{SEQ}, float32, deterministic; median of {args.repeats} "
              f"calls after {args.warmup} warm-up. {machine['cpu']}, {machine['cores']} cores, "
              f"load {machine['load_avg_1m']:.1f} at start; jax {machine['jax']}, torch {machine['torch']}, "
              f"transformers {machine['transformers']}. MFU against {peak['peak'] / 1e9:.1f} GFLOP/s "
              f"(float32 matmul, {peak['peak_source']}), {flops_per_token / 1e6:.1f} MFLOP/token.")
    table = common.markdown_table(rows, columns)
    data = {
        "machine": machine,
        "setting": {"batch": BATCH, "seq": SEQ, "dtype": "float32", "repeats": args.repeats,
                    "warmup": args.warmup, "torch_threads": threads},
        "flops_per_token": flops_per_token,
        "matmul": peak,
        "results": results,
        "ratios": ratios,
        "rows": rows,
    }
    common.publish(args.out, data, header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
