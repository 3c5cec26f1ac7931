"""Training-step speed: flaxgpt's jitted ``train_step`` vs the same step in PyTorch (Hugging Face
``GPT2LMHeadModel``), in one run, plus the compile time of ours.

GPT-2 124M shapes (tied head, qkv bias), context 256, batch 2 x 256 tokens (the book's chapter-5 setting),
dropout 0.1 in training mode, float32, AdamW(lr 4e-4, weight decay 0.1), random weights and tokens.
One step = forward, cross-entropy, backward, AdamW update. Each contender runs in its own process:
the first step (timed separately: for flaxgpt it includes compilation) and ``--warmup`` more untimed
steps, then the median of ``--repeats`` steps. tokens/s = B * T / median step seconds.

    python benchmarks/bench_train.py                      # ~5 minutes on 2 cores
    python benchmarks/bench_train.py --skip flaxgpt-scan  # without the scanned-layers variant
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
CONTENDERS = ("flaxgpt", "flaxgpt-scan", "hf")
LABELS = {
    "flaxgpt": "flaxgpt `train_step` (jit, donated state)",
    "flaxgpt-scan": "flaxgpt `train_step`, `scan_layers=True`",
    "hf": "Hugging Face `GPT2LMHeadModel` + `torch.optim.AdamW` (eager)",
}


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50257, size=(BATCH, SEQ + 1), dtype=np.int64)
    return ids[:, :-1].astype(np.int32), ids[:, 1:].astype(np.int32)  # (B, T), (B, T)


def run_flaxgpt(repeats: int, warmup: int, scan: bool) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    from flaxgpt.config import GPTConfig
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import count_params, init_params
    from flaxgpt.training.optim import make_optimizer
    from flaxgpt.training.state import create_train_state, train_step

    cfg = GPTConfig.preset(
        "gpt2-small", context_length=SEQ, qkv_bias=True, tie_embeddings=True, drop_rate=DROP, scan_layers=scan
    )
    state = create_train_state(GPTModel(cfg), init_params(cfg, jax.random.key(0)), make_optimizer(LR, WEIGHT_DECAY))
    x, y = (jnp.asarray(a) for a in _batch())
    key = jax.random.key(123)
    jax.block_until_ready(state)

    t0 = time.perf_counter()
    compiled = train_step.lower(state, x, y, key).compile()
    compile_s = time.perf_counter() - t0
    box = {"state": state}

    def step() -> None:
        box["state"], loss = compiled(box["state"], x, y, key)
        float(loss)

    timing = common.time_calls(step, repeats=repeats, warmup=warmup + 1)
    return {
        "params": count_params(state.params),
        "compile_s": compile_s,
        "timing": timing.to_dict(),
        "peak_rss_mb": common.peak_rss_mb(),
    }


def run_hf(repeats: int, warmup: int) -> dict[str, Any]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(123)
    torch.set_num_threads(common.usable_cores())
    config = GPT2Config(
        vocab_size=50257, n_positions=SEQ, n_embd=768, n_layer=12, n_head=12,
        resid_pdrop=DROP, embd_pdrop=DROP, attn_pdrop=DROP,
    )
    model = GPT2LMHeadModel(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    x, y = (torch.from_numpy(a.astype(np.int64)) for a in _batch())

    step = common.torch_train_step(model, opt, x, y)

    timing = common.time_calls(step, repeats=repeats, warmup=warmup + 1)
    return common.torch_result(model, timing)


def _child(name: str, repeats: int, warmup: int) -> dict[str, Any]:
    if name == "hf":
        return run_hf(repeats, warmup)
    return run_flaxgpt(repeats, warmup, scan=name == "flaxgpt-scan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per contender (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (default 2)")
    p.add_argument("--skip", nargs="*", default=[], choices=CONTENDERS, help="contenders to leave out")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "train.json"))
    p.add_argument("--contender", choices=CONTENDERS, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.contender:
        result = _child(args.contender, args.repeats, args.warmup)
        Path(args.result_json).write_text(json.dumps(result), encoding="utf-8")
        return 0

    rows, results = [], {}
    for name in CONTENDERS:
        if name in args.skip:
            continue
        print(f"running {name} ...", flush=True)
        res = common.run_isolated(
            [__file__, "--contender", name, "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
        )
        results[name] = res
        median = res["timing"]["median_s"]
        rows.append({
            "name": LABELS[name], "key": name, "params_m": res["params"] / 1e6, "compile_s": res["compile_s"],
            "first_s": res["timing"]["first_s"], "step_s": median, "tokens_s": BATCH * SEQ / median,
            "rss": res["peak_rss_mb"],
        })
    if "hf" in results:
        base = results["hf"]["timing"]["median_s"]
        for row in rows:
            row["speedup"] = base / row["step_s"]
    data = {
        "machine": common.machine_info(),
        "setting": {"batch": BATCH, "seq": SEQ, "lr": LR, "weight_decay": WEIGHT_DECAY, "drop_rate": DROP,
                    "dtype": "float32", "repeats": args.repeats, "warmup": args.warmup},
        "results": results,
        "rows": rows,
    }
    columns = [("name", "contender"), ("params_m", "params (M)"), ("compile_s", "compile s"),
               ("first_s", "first step s"), ("step_s", "median step s"), ("tokens_s", "tokens/s"),
               ("speedup", "vs PyTorch"), ("rss", "peak RSS MiB")]
    m = data["machine"]
    header = (f"Train step, GPT-2 124M shapes, B{BATCH} x T{SEQ}, AdamW, dropout {DROP}, float32. "
              f"{m['cpu']}, {m['cores']} cores, load {m['load_avg_1m']:.1f}; jax {m['jax']}, torch {m['torch']}.")
    table = common.markdown_table(rows, columns)
    common.publish(args.out, data, header + "\n\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
