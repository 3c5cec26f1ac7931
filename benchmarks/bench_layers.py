"""Layer-loop options of flaxgpt's train step: unrolled vs ``scan_layers=True``, times ``remat``
"none" / "full" / "dots": compile time and step time.

GPT-2 124M shapes (tied head, qkv bias), context 256, batch 2 x 256 tokens, dropout 0.1, float32,
AdamW, i.e. the setting of ``bench_train.py``. Each configuration runs in its own process (so the peak
RSS is its own): ``train_step.lower(...)`` (tracing + lowering to StableHLO) and ``.compile()`` (XLA) are
timed separately, then the first step of the compiled program, ``--warmup`` untimed steps and the
median of ``--repeats`` steps.

    python benchmarks/bench_layers.py          # ~4-6 minutes on 2 cores
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

BATCH, SEQ, LR, WEIGHT_DECAY, DROP = 2, 256, 4e-4, 0.1, 0.1
REMATS = ("none", "full", "dots")
CONFIGS = tuple(f"{'scan' if scan else 'unrolled'}-{remat}" for scan in (False, True) for remat in REMATS)


def _parse(name: str) -> tuple[bool, str]:
    """``"scan-dots"`` -> (True, "dots")."""
    layout, remat = name.split("-")
    return layout == "scan", remat


def run_config(name: str, repeats: int, warmup: int) -> dict[str, Any]:
    """Compiles and times one configuration's train step in this process."""
    import jax
    import jax.numpy as jnp

    from flaxgpt.config import GPTConfig
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import init_params
    from flaxgpt.training.optim import make_optimizer
    from flaxgpt.training.state import create_train_state, train_step

    scan, remat = _parse(name)
    cfg = GPTConfig.preset(
        "gpt2-small", context_length=SEQ, qkv_bias=True, tie_embeddings=True, drop_rate=DROP,
        scan_layers=scan, remat=remat,
    )
    state = create_train_state(GPTModel(cfg), init_params(cfg, jax.random.key(0)), make_optimizer(LR, WEIGHT_DECAY))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(BATCH, SEQ + 1), dtype=np.int64)
    x, y = jnp.asarray(ids[:, :-1], jnp.int32), jnp.asarray(ids[:, 1:], jnp.int32)  # (B, T), (B, T)
    key = jax.random.key(123)
    jax.block_until_ready(state)

    t0 = time.perf_counter()
    lowered = train_step.lower(state, x, y, key)
    lower_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def step() -> None:
        box["state"], loss = compiled(box["state"], x, y, key)
        float(loss)

    timing = common.time_calls(step, repeats=repeats, warmup=warmup + 1)  # first step + `warmup` more
    return {
        "scan_layers": scan,
        "remat": remat,
        "lower_s": lower_s,
        "xla_compile_s": compile_s,
        "compile_s": lower_s + compile_s,
        "timing": timing.to_dict(),
        "peak_rss_mb": common.peak_rss_mb(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (default 1)")
    p.add_argument("--only", nargs="*", choices=CONFIGS, help="configurations to run (default: all six)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "layers.json"))
    p.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")

    if args.config:
        result = run_config(args.config, args.repeats, args.warmup)
        Path(args.result_json).write_text(json.dumps(result), encoding="utf-8")
        return 0

    machine = common.machine_info()
    print(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_1m']:.2f}", flush=True)
    results: dict[str, Any] = {}
    script = str(Path(__file__).resolve())
    for name in args.only or CONFIGS:
        print(f"running {name} ...", flush=True)
        r = common.run_isolated([script, "--config", name, "--repeats", str(args.repeats),
                                 "--warmup", str(args.warmup)])
        r["tokens_per_s"] = BATCH * SEQ / r["timing"]["median_s"]
        results[name] = r
        print(f"  compile {r['compile_s']:.1f} s, step {r['timing']['median_s']:.2f} s", flush=True)

    base = results.get("unrolled-none")
    rows = []
    for r in results.values():
        row = {"layout": "scan" if r["scan_layers"] else "unrolled", "remat": r["remat"],
               "lower_s": r["lower_s"], "xla_s": r["xla_compile_s"], "compile_s": r["compile_s"],
               "first_s": r["timing"]["first_s"], "step_s": r["timing"]["median_s"],
               "tokens_s": r["tokens_per_s"], "rss": r["peak_rss_mb"]}
        if base:
            row["rel_step"] = r["timing"]["median_s"] / base["timing"]["median_s"]
            row["rel_compile"] = r["compile_s"] / base["compile_s"]
        rows.append(row)
    columns = [("layout", "layers"), ("remat", "remat"), ("lower_s", "trace+lower s"), ("xla_s", "XLA compile s"),
               ("compile_s", "compile s"), ("rel_compile", "compile vs unrolled/none"), ("first_s", "first step s"),
               ("step_s", "median step s"), ("rel_step", "step vs unrolled/none"), ("tokens_s", "tokens/s"),
               ("rss", "peak RSS MiB")]
    header = (f"Train step (B{BATCH} x T{SEQ}, GPT-2 124M shapes, AdamW, dropout {DROP}, float32) by layer loop "
              f"and remat policy; median of {args.repeats} steps after {args.warmup} warm-up. "
              f"{machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_1m']:.1f} at start; "
              f"jax {machine['jax']}.")
    table = common.markdown_table(rows, columns)
    data = {
        "machine": machine,
        "setting": {"batch": BATCH, "seq": SEQ, "lr": LR, "weight_decay": WEIGHT_DECAY, "drop_rate": DROP,
                    "dtype": "float32", "repeats": args.repeats, "warmup": args.warmup},
        "results": results,
        "rows": rows,
    }
    common.publish(args.out, data, header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
