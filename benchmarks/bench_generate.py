"""Greedy generation speed: flaxgpt's compiled KV-cache loop vs the book's no-cache loop vs Hugging Face
PyTorch ``generate`` (with its cache), in one run, plus the memory-bandwidth bound.

GPT-2 124M shapes (tied head, qkv bias), random weights, float32, batch 1, a 4-token prompt, 100 new
tokens. Each contender runs in its own process: one warm-up call (timed separately: it includes
compilation), then the median of ``--repeats`` calls. tokens/s = new tokens / median seconds per call
(prefill included). The bound is the tokens/s a decode step would reach if it only had to stream the
weights once from DRAM at the measured bandwidth. ``flaxgpt-int8`` decodes the same weights quantised with
:func:`flaxgpt.nn.quant.quantize_int8`, and reports its logit error and greedy-token agreement against
float32 (:func:`int8_accuracy`).

    python benchmarks/bench_generate.py                 # ~3-5 minutes on 2 cores
    python benchmarks/bench_generate.py --skip book     # without the slow no-cache loop
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
import numpy as np  # noqa: E402

PROMPT = [15496, 11, 314, 716]  # "Hello, I am" (the book's example), GPT-2 BPE ids
CONTENDERS = ("flaxgpt", "flaxgpt-int8", "book", "hf")
LABELS = {
    "flaxgpt": "flaxgpt `generate` (KV cache, one compiled while loop)",
    "flaxgpt-int8": "flaxgpt `generate` on `quantize_int8` weights (int8 weight-only)",
    "book": "book loop `generate_text_simple` (no cache, JAX)",
    "hf": "Hugging Face `GPT2LMHeadModel.generate` (PyTorch, KV cache)",
    "bound": "bandwidth bound (weights streamed once per token)",
}


def _gpt2_config():
    from flaxgpt.config import GPTConfig

    return GPTConfig.preset("gpt2-small", qkv_bias=True, tie_embeddings=True, drop_rate=0.0)


def _compile_seconds() -> tuple[dict[str, float], Any]:
    """A dict that accumulates JAX trace/lower/compile seconds while the returned listener is registered."""
    import jax

    totals = {"trace": 0.0, "lower": 0.0, "compile": 0.0}
    names = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
        "/jax/core/compile/backend_compile_duration": "compile",
    }

    def listener(event: str, duration: float, **kwargs: Any) -> None:
        if event in names:
            totals[names[event]] += duration

    jax.monitoring.register_event_duration_secs_listener(listener)
    return totals, listener


def run_jax(which: str, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Times flaxgpt's ``generate`` or the book's ``generate_text_simple`` in this process."""
    import jax

    from flaxgpt.book.generate import generate_text_simple
    from flaxgpt.generation.decode import generate
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import init_params

    cfg = _gpt2_config()
    model, params = GPTModel(cfg), init_params(cfg, jax.random.key(0))
    jax.block_until_ready(params)
    extra: dict[str, Any] = {}
    if which in ("flaxgpt", "flaxgpt-int8"):
        prompt = np.asarray(PROMPT, np.int32)
        if which == "flaxgpt-int8":
            from flaxgpt.nn.quant import quantize_int8

            float_params, params = params, quantize_int8(params, cfg)

        def call() -> np.ndarray:
            return np.asarray(generate(model, params, prompt, max_new_tokens=new_tokens))

    else:
        prompt2d = np.asarray([PROMPT], np.int32)

        def call() -> np.ndarray:
            return np.asarray(generate_text_simple(model, params, prompt2d, new_tokens, cfg.context_length))[0]

    totals, listener = _compile_seconds()
    t0 = time.perf_counter()
    tokens = call()
    first = time.perf_counter() - t0
    jax.monitoring.unregister_event_duration_listener(listener)
    timing = common.time_calls(call, repeats=repeats, warmup=0)
    if which == "flaxgpt-int8":  # after the timing: its own compiles must not hide the first call's
        extra = int8_accuracy(model, float_params, params, prompt, new_tokens)
    return {
        "tokens": tokens[len(PROMPT) :].tolist(),
        "first_s": first,
        "compile_s": sum(totals.values()),
        "compile_breakdown_s": totals,
        "timing": timing.to_dict(),
        "peak_rss_mb": common.peak_rss_mb(),
        **extra,
    }


def int8_accuracy(model: Any, params: Any, qparams: Any, prompt: np.ndarray, new_tokens: int) -> dict[str, Any]:
    """int8 against float32 on the same weights: logit error and top-1 agreement over 512 random positions
    (teacher-forced: both read the same tokens), and how many greedy tokens agree from the start."""
    import jax.numpy as jnp

    from flaxgpt.generation.decode import generate
    from flaxgpt.nn.quant import int8_apply

    ids = jnp.asarray(np.random.default_rng(1).integers(0, model.cfg.vocab_size, (4, 128)), jnp.int32)  # (B, T)
    f32 = np.asarray(model.apply({"params": params}, ids))  # (B, T, V)
    q8 = np.asarray(int8_apply(model, qparams, ids))
    err = np.abs(q8 - f32)
    want = np.asarray(generate(model, params, prompt, max_new_tokens=new_tokens))[len(prompt):]
    got = np.asarray(generate(model, qparams, prompt, max_new_tokens=new_tokens))[len(prompt):]
    differ = np.nonzero(want != got)[0]
    return {
        "int8_logit_max_abs_err": float(err.max()),
        "int8_logit_mean_abs_err": float(err.mean()),
        "f32_logit_std": float(f32.std()),
        "int8_top1_agreement": float(np.mean(q8.argmax(-1) == f32.argmax(-1))),
        "int8_greedy_tokens_equal": int(differ[0]) if differ.size else int(len(want)),
        "int8_weight_bytes": qparams.nbytes(),
    }


def run_hf(new_tokens: int, repeats: int, threads: int) -> dict[str, Any]:
    """Times Hugging Face ``generate`` (greedy, KV cache) in this process with ``threads`` torch threads."""
    import torch
    import transformers

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ids = torch.tensor([PROMPT])
    mask = torch.ones_like(ids)

    def call() -> np.ndarray:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        return out[0].numpy()

    timing = common.time_calls(call, repeats=repeats, warmup=1)
    tokens = call()
    return {
        "tokens": tokens[len(PROMPT) :].tolist(),
        "first_s": timing.first_s,
        "compile_s": None,
        "timing": timing.to_dict(),
        "peak_rss_mb": common.peak_rss_mb(),
        "torch_threads": torch.get_num_threads(),
    }


def weight_bytes_per_token() -> int:
    """Bytes a batch-1 decode step must read: every parameter once, except the position table, of which
    it reads one row (the tied token table is read whole, as the output head)."""
    from flaxgpt.nn.params import param_bytes, param_shapes

    cfg = _gpt2_config()
    shapes = param_shapes(cfg)
    pos = shapes["pos_emb"]["embedding"]
    row = int(pos.shape[1]) * np.dtype(pos.dtype).itemsize
    return param_bytes(shapes) - param_bytes({"pos": pos}) + row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="benchmarks/results/generate.json", help="JSON path (a .md is written beside it)")
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls for flaxgpt and HF")
    parser.add_argument("--book-repeats", type=int, default=3, help="timed calls for the slow book loop")
    parser.add_argument("--skip", default="", help="comma-separated contenders to skip: flaxgpt-int8, book, hf")
    parser.add_argument(
        "--torch-threads", default="all,1",
        help="torch thread counts to run HF with ('all' = every usable core); the fastest is compared",
    )
    parser.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--result-json", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.contender:  # child process: run one contender, write its JSON
        if args.contender == "hf":
            result = run_hf(args.new_tokens, args.repeats, int(args.torch_threads))
        else:
            reps = args.book_repeats if args.contender == "book" else args.repeats
            result = run_jax(args.contender, args.new_tokens, reps)
        Path(args.result_json).write_text(json.dumps(result), encoding="utf-8")
        return 0

    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - set(CONTENDERS)
    if unknown:
        parser.error(f"--skip: unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_1m']:.2f}", flush=True)
    bandwidth = common.memory_bandwidth_gbs()
    print(f"memory bandwidth: {bandwidth['gbs']:.1f} GB/s ({bandwidth['method']})", flush=True)
    nbytes = weight_bytes_per_token()
    bound_tps = bandwidth["gbs"] * 1e9 / nbytes

    runs = [(name, name, []) for name in ("flaxgpt", "flaxgpt-int8", "book") if name not in skip]
    if "hf" not in skip:
        counts = common.parse_thread_counts(args.torch_threads)
        runs += [(f"hf_t{n}", "hf", ["--torch-threads", str(n)]) for n in counts]
    results: dict[str, Any] = {}
    for key, name, extra in runs:
        print(f"running {key} ...", flush=True)
        script = str(Path(__file__).resolve())
        results[key] = r = common.run_isolated(
            [script, "--contender", name, "--new-tokens", str(args.new_tokens), "--repeats",
             str(args.repeats), "--book-repeats", str(args.book_repeats), *extra]
        )
        r["tokens_per_s"] = args.new_tokens / r["timing"]["median_s"]
        r["ms_per_token"] = 1e3 * r["timing"]["median_s"] / args.new_tokens
        print(f"  {r['tokens_per_s']:.1f} tokens/s", flush=True)

    flax_tps = results["flaxgpt"]["tokens_per_s"]
    ratios = {"flaxgpt_vs_bound": flax_tps / bound_tps}
    hf_keys = [k for k in results if k.startswith("hf_")]
    if hf_keys:
        best_hf = max(hf_keys, key=lambda k: results[k]["tokens_per_s"])
        ratios["best_hf"] = best_hf
        ratios["flaxgpt_vs_hf"] = flax_tps / results[best_hf]["tokens_per_s"]
    if "flaxgpt-int8" in results:
        q8 = results["flaxgpt-int8"]
        ratios["int8_vs_f32"] = q8["tokens_per_s"] / flax_tps
        if hf_keys:
            ratios["int8_vs_hf"] = q8["tokens_per_s"] / results[best_hf]["tokens_per_s"]
    if "book" in results:
        ratios["flaxgpt_vs_book"] = flax_tps / results["book"]["tokens_per_s"]
        ratios["flaxgpt_tokens_equal_book"] = results["flaxgpt"]["tokens"] == results["book"]["tokens"]

    rows = []
    for key, r in results.items():
        label = LABELS["hf"] + f", {r['torch_threads']} torch thread(s)" if key.startswith("hf_") else LABELS[key]
        rows.append({
            "impl": label,
            "tps": r["tokens_per_s"],
            "ms": r["ms_per_token"],
            "first": r["first_s"],
            "compile": r["compile_s"],
            "rss": r["peak_rss_mb"],
            "rel": flax_tps / r["tokens_per_s"],
        })
    rows.append({"impl": LABELS["bound"], "tps": bound_tps, "ms": 1e3 / bound_tps, "rel": flax_tps / bound_tps})
    table = common.markdown_table(
        rows,
        [("impl", "implementation"), ("tps", "tokens/s"), ("ms", "ms/token"), ("first", "first call (s)"),
         ("compile", "JAX compile (s)"), ("rss", "peak RSS (MiB)"), ("rel", "flaxgpt speed-up")],
    )
    header = (
        f"GPT-2 124M shapes, random weights, float32, batch 1, {len(PROMPT)}-token prompt, "
        f"{args.new_tokens} new tokens greedy; median of {args.repeats} calls after a warm-up "
        f"({args.book_repeats} for the book loop), prefill included. Machine: {machine['cpu']}, "
        f"{machine['cores']} cores (1-min load average {machine['load_avg_1m']:.1f} at start); "
        f"jax {machine['jax']}, torch {machine['torch']}, transformers {machine['transformers']}. "
        f"Bound: {nbytes / 1e6:.0f} MB of weights per token at {bandwidth['gbs']:.1f} GB/s "
        f"(measured, {bandwidth['method']})."
    )
    lines = [header, "", table, ""]
    lines.append(f"- flaxgpt vs bandwidth bound: {ratios['flaxgpt_vs_bound']:.0%}")
    if "int8_vs_f32" in ratios:
        q8 = results["flaxgpt-int8"]
        lines.append(
            f"- int8 weight-only vs float32 decode: {ratios['int8_vs_f32']:.2f}x; logits over 512 random positions: "
            f"max |error| {q8['int8_logit_max_abs_err']:.3g}, mean {q8['int8_logit_mean_abs_err']:.3g} (float32 "
            f"logit std {q8['f32_logit_std']:.3g}), top-1 agreement {q8['int8_top1_agreement']:.1%}; the first "
            f"{q8['int8_greedy_tokens_equal']} of {args.new_tokens} greedy tokens equal float32's"
        )
    if "flaxgpt_vs_hf" in ratios:
        lines.append(
            f"- flaxgpt vs HF PyTorch (its faster thread setting, {results[ratios['best_hf']]['torch_threads']}): "
            f"{ratios['flaxgpt_vs_hf']:.2f}x"
        )
    if "flaxgpt_vs_book" in ratios:
        lines.append(
            f"- flaxgpt vs book loop: {ratios['flaxgpt_vs_book']:.1f}x "
            f"(same tokens: {ratios['flaxgpt_tokens_equal_book']})"
        )
    markdown = "\n".join(lines)
    data = {
        "settings": {"prompt": PROMPT, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "book_repeats": args.book_repeats, "dtype": "float32", "batch": 1},
        "machine": machine,
        "bandwidth": bandwidth,
        "weight_bytes_per_token": nbytes,
        "bound_tokens_per_s": bound_tps,
        "results": results,
        "ratios": ratios,
    }
    print()
    common.publish(args.out, data, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
