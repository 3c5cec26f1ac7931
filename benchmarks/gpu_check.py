"""flaxgpt on one GPU, in under 5 minutes: the checks ``benchmarks/gpu_check.sh`` runs.

1. GPT-2 124M train step at T=1024 in bfloat16 compute (float32 parameters and AdamW state),
   ``attention="dot_product"`` (cuDNN flash attention where available), scanned layers, no dropout:
   tokens/s and MFU against the GPU's dense bfloat16 peak (goal >= 45% on an H100/H200).
2. The 1.5B preset (gpt2-xl) step at T=1024, if it fits (full remat).
3. Batch-1 greedy decoding of 124M, 200 new tokens: tokens/s, float32 and bfloat16 weights.

Every figure is a median of timed calls after warm-up; compile times are printed beside them. The table is
printed and written to ``benchmarks/results/gpu.json`` / ``gpu.md``.

    pip install "jax[cuda12]" -e .
    bash benchmarks/gpu_check.sh            # or: python benchmarks/gpu_check.py --batch 16
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import flops  # noqa: E402
import numpy as np  # noqa: E402

# Dense (no sparsity) bfloat16 tensor-core peaks, TFLOP/s, by the start of jax's device_kind.
PEAK_BF16_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100 80GB HBM3": 989.0,  # SXM
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100": 989.0,
    "NVIDIA GH200": 989.0,
    "NVIDIA A100": 312.0,
    "NVIDIA L40S": 362.0,
    "NVIDIA L4": 121.0,
    "NVIDIA A10G": 70.0,
    "NVIDIA GeForce RTX 4090": 165.0,
}


def peak_tflops(kind: str, override: float | None) -> float | None:
    """The dense bf16 peak of a device kind (the longest matching prefix), or ``override``."""
    if override:
        return override
    matches = [k for k in PEAK_BF16_TFLOPS if kind.startswith(k)]
    return PEAK_BF16_TFLOPS[max(matches, key=len)] if matches else None


def _time(fn: Any, repeats: int, warmup: int) -> tuple[float, float]:
    """(first call seconds, median seconds of ``repeats`` calls after ``warmup`` more)."""
    timing = common.time_calls(fn, repeats=repeats, warmup=warmup)
    return timing.first_s, timing.median_s


def train_row(
    preset: str, batch: int, seq: int, remat: str, repeats: int, peak: float | None, **overrides: Any
) -> dict[str, Any]:
    """Times one bf16 train step of a preset (``overrides``: config fields, for a smoke test); a row of the
    table (``error`` set when it does not fit)."""
    import jax
    import jax.numpy as jnp

    from flaxgpt.config import GPTConfig
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import init_params
    from flaxgpt.training.optim import make_optimizer
    from flaxgpt.training.state import create_train_state, train_step

    cfg = GPTConfig.preset(
        preset, context_length=seq, drop_rate=0.0, dtype="bfloat16", attention="dot_product",
        scan_layers=True, remat=remat, init="gpt2", **overrides,
    )
    row: dict[str, Any] = {"workload": f"train {preset} B{batch} x T{seq}, bf16, remat {remat}"}
    try:
        state = create_train_state(GPTModel(cfg), init_params(cfg, jax.random.key(0)), make_optimizer(3e-4, 0.1))
        ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
        x, y = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
        key = jax.random.key(1)
        t0 = time.perf_counter()
        step = train_step.lower(state, x, y, key).compile()
        row["compile_s"] = time.perf_counter() - t0
        box = {"state": state}

        def call() -> None:
            box["state"], loss = step(box["state"], x, y, key)
            float(loss)

        _, median = _time(call, repeats, warmup=2)
    except Exception as e:  # noqa: BLE001 - an out-of-memory is a result here ("did not fit")
        row["error"] = str(e).strip().splitlines()[0][:160]
        return row
    tokens = batch * seq / median
    row.update(step_ms=median * 1e3, tokens_per_s=tokens)
    if peak:
        row["mfu_pct"] = 100 * flops.mfu(flops.train_flops_per_token(cfg, seq), tokens, peak * 1e12)
    return row


def decode_row(dtype: str, new_tokens: int, repeats: int) -> dict[str, Any]:
    """Times batch-1 greedy generation of GPT-2 124M (weights in ``dtype``)."""
    import jax

    from flaxgpt.config import GPTConfig
    from flaxgpt.generation.decode import generate
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import init_params

    cfg = GPTConfig.preset("gpt2-small", qkv_bias=True, tie_embeddings=True, drop_rate=0.0, dtype=dtype,
                           param_dtype=dtype, init="gpt2")
    model, params = GPTModel(cfg), init_params(cfg, jax.random.key(0))
    prompt = np.arange(8, dtype=np.int32)

    def call() -> None:
        np.asarray(generate(model, params, prompt, max_new_tokens=new_tokens))

    first, median = _time(call, repeats, warmup=1)
    return {"workload": f"decode 124M B1, {new_tokens} new tokens, {dtype} weights", "compile_s": first - median,
            "step_ms": median * 1e3 / new_tokens, "tokens_per_s": new_tokens / median}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16, help="124M train batch at T=1024 (default 16)")
    p.add_argument("--xl-batch", type=int, default=8, help="gpt2-xl train batch (default 8)")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per row (default 10)")
    p.add_argument("--peak-tflops", type=float, help="dense bf16 peak, TFLOP/s (default: by device kind)")
    p.add_argument("--skip-xl", action="store_true", help="leave out the 1.5B step")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "gpu.json"))
    args = p.parse_args(argv)

    import jax

    dev = jax.devices()[0]
    if dev.platform != "gpu":
        print(f"gpu_check: no GPU here (JAX sees {dev.platform}); install jax[cuda12]", file=sys.stderr)
        return 2
    kind = dev.device_kind
    peak = peak_tflops(kind, args.peak_tflops)
    rows = [train_row("gpt2-small", args.batch, 1024, "none", args.repeats, peak)]
    if not args.skip_xl:
        rows.append(train_row("gpt2-xl", args.xl_batch, 1024, "full", max(3, args.repeats // 2), peak))
    rows += [decode_row("float32", 200, 3), decode_row("bfloat16", 200, 3)]
    header = (f"# flaxgpt GPU check\n\n{kind}, dense bf16 peak {peak or '?'} TFLOP/s; jax {jax.__version__}; "
              f"host {common.machine_info()['cpu']}.\n")
    md = common.markdown_table(rows, [("workload", "workload"), ("compile_s", "compile s"), ("step_ms", "ms per step/token"),
                                      ("tokens_per_s", "tokens/s"), ("mfu_pct", "MFU %"), ("error", "note")])
    common.publish(args.out, {"device": kind, "peak_tflops": peak, "rows": rows, "machine": common.machine_info()},
                   header + "\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
