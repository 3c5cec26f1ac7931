"""Where the time goes: a per-op breakdown of the forward pass, the train step and batch-1 decoding,
flaxgpt (``jax.profiler``) beside PyTorch (``torch.profiler``, Hugging Face ``GPT2LMHeadModel``), on the
same machine, in one run.

Each workload runs in its own process per contender, on GPT-2 124M shapes (tied head, qkv bias, random
weights, float32, all cores): ``forward`` B8 x T256; ``train`` B2 x T256 with dropout 0.1, cross-entropy
and AdamW (flaxgpt's jitted, donated ``train_step``; the book's eager loop in PyTorch); ``decode`` a
greedy ``generate`` of 64 tokens after an 8-token prompt, divided per token (flaxgpt's compiled
``lax.while_loop``; HF ``generate`` with its KV cache).

Both profilers time each op on the thread that runs it: for XLA:CPU one event per executed thunk (a
fusion, a GEMM, a copy), named in the compiled HLO, whose ``op_name`` metadata carries the model path
(``trf_blocks_3/att/W_query/dot_general``, ``transpose(jvp(...))`` in the backward pass) and the
``cross_entropy`` / ``optimizer`` scopes of flaxgpt's step; for PyTorch each aten op's self time,
classified by its name, its operand shapes and its autograd / optimizer ancestors. Both are mapped onto
the same categories (:data:`CATEGORIES`), in milliseconds per call. The per-op sums can differ a little
from the wall time (profiler overhead; XLA may run independent thunks at once): the wall time of the
profiled calls is printed beside them.

    python benchmarks/breakdown.py                      # ~4 minutes on 2 cores
    python benchmarks/breakdown.py --only train --scan  # one workload, flaxgpt with scan_layers
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import numpy as np  # noqa: E402

WORKLOADS = ("forward", "train", "decode")
CATEGORIES = (
    "embeddings",
    "attn projections (QKV, out)",
    "FFN matmuls",
    "attention core (scores, mask, softmax, context)",
    "LayerNorm",
    "GELU",
    "residual adds + dropout",
    "head (tied logits matmul)",
    "cross-entropy",
    "optimizer (AdamW)",
    "sampling, cache, loop",
    "other (copies, transposes)",
)
(EMB, PROJ, FFN, ATT, LN, GELU, RES, HEAD, CE, OPT, LOOP, OTHER) = CATEGORIES
FWD_B, FWD_T, TRAIN_B, TRAIN_T, DROP, LR = 8, 256, 2, 256, 0.1, 4e-4
PROMPT_LEN, NEW_TOKENS = 8, 64


# --------------------------------------------------------------------------- flaxgpt (XLA:CPU)


def jax_category(op_name: str) -> str:
    """The category of an XLA op from its ``op_name`` metadata (the JAX name stack)."""
    if "optimizer" in op_name:
        return OPT
    if "cross_entropy" in op_name:
        return CE
    if "attend" in op_name or "out_head" in op_name or "logits_from_hidden" in op_name:
        return HEAD
    if "tok_emb" in op_name or "pos_emb" in op_name:
        return EMB
    if re.search(r"/att/(W_query|W_key|W_value|out_proj)/", op_name):
        return PROJ
    if re.search(r"/ff/fc[12]/", op_name):
        return FFN
    if "/att/" in op_name:
        return ATT
    if re.search(r"/(norm1|norm2|final_norm)/", op_name):
        return LN
    if "/ff/" in op_name:
        return GELU
    if re.search(r"trf_blocks[^/]*/(add|drop|Dropout)|drop_emb|drop_shortcut|dropout", op_name):
        return RES
    if "GPTModel" not in op_name and op_name:
        return LOOP
    return OTHER


def _hlo_op_names(hlo_text: str) -> dict[str, str]:
    """``{instruction name: op_name metadata}`` for every instruction of a compiled HLO module.

    Instructions that XLA's passes created without metadata (e.g. the ``dot`` of a rewritten
    matrix-vector product) take the op_name of a neighbour (a user, else an operand) inside a Dense layer
    when there is one (its bias add), else of the first neighbour that has one.
    """
    names: dict[str, str] = {}
    operands: dict[str, list[str]] = {}
    users: dict[str, list[str]] = collections.defaultdict(list)
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^(]*?\w[\w\-]*\((.*)$", hlo_text, re.M):
        name, rest = m.group(1), m.group(2)
        meta = re.search(r'metadata=\{op_name="([^"]*)"', rest)
        if meta:
            names[name] = meta.group(1)
        args = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
        operands[name] = args
        for a in args:
            users[a].append(name)
    dense = re.compile(r"/(W_query|W_key|W_value|out_proj|fc1|fc2|out_head)/|attend|logits_from_hidden")
    for name in operands:
        if name not in names:
            near = [names[n] for n in users.get(name, []) + operands[name] if n in names]
            in_dense = [n for n in near if dense.search(n)]  # a rewritten matmul: name it after its layer
            if near:
                names[name] = (in_dense or near)[0]
    return names


def _profile_jax(fn: Any, calls: int) -> tuple[dict[str, float], float]:
    """Runs ``fn()`` ``calls`` times under ``jax.profiler``; returns (``{hlo op: total ms}``, wall ms)."""
    import jax
    from jax._src.profiler import ProfileData

    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        wall = time.perf_counter() - t0
        jax.profiler.stop_trace()
        (path,) = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(path)
    totals: dict[str, float] = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    totals[stats["hlo_op"]] += event.duration_ns / 1e6
    return totals, wall * 1e3


def run_flaxgpt(workload: str, scan: bool, calls: int) -> dict[str, Any]:
    """Profiles one workload of flaxgpt in this process."""
    import jax
    import jax.numpy as jnp

    from flaxgpt.config import GPTConfig
    from flaxgpt.generation import decode
    from flaxgpt.nn.model import GPTModel, _forward
    from flaxgpt.nn.params import init_params
    from flaxgpt.training.optim import make_optimizer
    from flaxgpt.training.state import create_train_state, train_step

    drop = DROP if workload == "train" else 0.0
    context = 256
    cfg = GPTConfig.preset(
        "gpt2-small", context_length=context, qkv_bias=True, tie_embeddings=True, drop_rate=drop, scan_layers=scan
    )
    model, params = GPTModel(cfg), init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    per_call = 1
    if workload == "forward":
        idx = jnp.asarray(rng.integers(0, 50257, (FWD_B, FWD_T)).astype(np.int32))  # (B, T)
        jitted, args = _forward, (model, params, idx)

        def fn() -> None:
            _forward(model, params, idx).block_until_ready()

    elif workload == "train":
        ids = rng.integers(0, 50257, (TRAIN_B, TRAIN_T + 1)).astype(np.int32)  # (B, T + 1)
        x, y = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
        box = {"state": create_train_state(model, params, make_optimizer(LR, 0.1))}
        key = jax.random.key(1)
        jitted, args = train_step, (box["state"], x, y, key)

        def fn() -> None:
            box["state"], loss = train_step(box["state"], x, y, key)
            float(loss)

    else:
        prompt = rng.integers(0, 50257, PROMPT_LEN).astype(np.int32)
        per_call = NEW_TOKENS
        jitted, args = _recording(decode), None

        def fn() -> None:
            np.asarray(decode.generate(model, params, prompt, max_new_tokens=NEW_TOKENS))

    for _ in range(2):
        fn()  # compile, warm up
    wall_s = common.time_calls(fn, repeats=3, warmup=0).median_s
    if args is None:  # generate: the arguments its compiled program was last called with
        jitted, args, kwargs = jitted.original, jitted.args, jitted.kwargs
    else:
        kwargs = {}
    names = _hlo_op_names(jitted.lower(*args, **kwargs).compile().as_text())
    totals, prof_wall = _profile_jax(fn, calls)
    by_cat: dict[str, float] = collections.defaultdict(float)
    unknown = 0.0
    for op, ms in totals.items():
        if op not in names:
            unknown += ms
        by_cat[jax_category(names.get(op, ""))] += ms / calls / per_call
    top = sorted(totals.items(), key=lambda kv: -kv[1])[:400]
    return {
        "ms": dict(by_cat),
        "wall_ms": wall_s * 1e3 / per_call,
        "profiled_wall_ms": prof_wall / calls / per_call,
        "unmapped_ms": unknown / calls / per_call,
        "top_ops": [{"op": op, "op_name": names.get(op, "?"), "ms": ms / calls / per_call} for op, ms in top],
    }


class _recording:
    """Wraps ``decode._generate_compiled`` to keep the arguments of its last call (to read its HLO)."""

    def __init__(self, module: Any) -> None:
        self.original, self.args, self.kwargs = module._generate_compiled, (), {}
        module._generate_compiled = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.args, self.kwargs = args, kwargs
        return self.original(*args, **kwargs)


# --------------------------------------------------------------------------- PyTorch (Hugging Face)

_ATTN_OPS = ("softmax", "_softmax", "_softmax_backward_data", "_safe_softmax", "where", "masked_fill", "bmm",
             "baddbmm", "scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_flash_attention_for_cpu_backward")
_GEMM_OPS = ("mm", "addmm", "matmul", "linear")


def torch_category(name: str, shapes: list[list[int]], ancestors: str) -> str:
    """The category of an aten op from its name, its operand shapes and its ancestors' names."""
    n = name.removeprefix("aten::")
    dims = {d for s in shapes for d in (s or [])}
    if "Optimizer.step" in ancestors:
        return OPT
    if n.startswith(("embedding", "index_select", "index_add", "embedding_dense_backward")) or "EmbeddingBackward" in ancestors:
        return EMB
    if "log_softmax" in n or "nll_loss" in n or re.search(r"LogSoftmaxBackward|NllLossBackward", ancestors):
        return CE
    if n in _GEMM_OPS or n in ("bmm", "baddbmm"):
        if 50257 in dims:
            return HEAD
        if n in ("bmm", "baddbmm") or any(len(s) == 4 for s in shapes if s):
            return ATT
        return FFN if 3072 in dims else PROJ
    if n in _ATTN_OPS or "scaled_dot_product" in n:
        return ATT
    if "layer_norm" in n:
        return LN
    if "gelu" in n or (3072 in dims and n in ("tanh", "pow", "mul", "add", "tanh_backward", "mul_", "add_")):
        return GELU
    if "dropout" in n or n in ("bernoulli_", "add", "add_") and any(len(s) == 3 and s[-1] == 768 for s in shapes if s):
        return RES
    if "cache" in ancestors.lower() or n in ("cat", "argmax", "max", "topk"):
        return LOOP
    return OTHER


def run_hf(workload: str, calls: int) -> dict[str, Any]:
    """Profiles one workload of Hugging Face GPT-2 in PyTorch eager in this process."""
    import torch
    import transformers

    torch.manual_seed(0)
    torch.set_num_threads(common.usable_cores())
    drop = DROP if workload == "train" else 0.0
    hf_cfg = transformers.GPT2Config(
        n_positions=256, resid_pdrop=drop, embd_pdrop=drop, attn_pdrop=drop,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    model = transformers.GPT2LMHeadModel(hf_cfg)
    rng = np.random.default_rng(0)
    per_call = 1
    if workload == "forward":
        model.eval()
        idx = torch.from_numpy(rng.integers(0, 50257, (FWD_B, FWD_T)))

        def fn() -> None:
            with torch.inference_mode():
                model(input_ids=idx).logits.sum().item()

    elif workload == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
        ids = torch.from_numpy(rng.integers(0, 50257, (TRAIN_B, TRAIN_T + 1)))
        fn = common.torch_train_step(model, opt, ids[:, :-1], ids[:, 1:])

    else:
        model.eval()
        per_call = NEW_TOKENS
        ids = torch.from_numpy(rng.integers(0, 50257, (1, PROMPT_LEN)))

        def fn() -> None:
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                               min_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=0)

    for _ in range(2):
        fn()
    wall_s = common.time_calls(fn, repeats=3, warmup=0).median_s
    acts = [torch.profiler.ProfilerActivity.CPU]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts, record_shapes=True) as prof:
        for _ in range(calls):
            fn()
    prof_wall = time.perf_counter() - t0
    by_cat: dict[str, float] = collections.defaultdict(float)
    by_op: dict[str, float] = collections.defaultdict(float)
    for ev in prof.events():
        if not ev.name.startswith("aten::") or ev.self_cpu_time_total <= 0:
            continue
        chain, parent = [], ev.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        ms = ev.self_cpu_time_total / 1e3 / calls / per_call
        shapes = [list(s) for s in (ev.input_shapes or []) if isinstance(s, (list, tuple))]
        by_cat[torch_category(ev.name, shapes, " ".join(chain))] += ms
        by_op[f"{ev.name} {shapes[:2]}"] += ms
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:40]
    return {
        "ms": dict(by_cat),
        "wall_ms": wall_s * 1e3 / per_call,
        "profiled_wall_ms": prof_wall * 1e3 / calls / per_call,
        "top_ops": [{"op": op, "ms": ms} for op, ms in top],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
    }


# --------------------------------------------------------------------------- driver


def _child(args: argparse.Namespace) -> dict[str, Any]:
    if args.contender == "hf":
        return run_hf(args.workload, args.calls)
    return run_flaxgpt(args.workload, args.scan, args.calls)


def table(workload: str, jax_res: dict[str, Any], hf_res: dict[str, Any]) -> str:
    """The markdown table of one workload: ms per call (per token for decode) by category."""
    rows = []
    for cat in CATEGORIES:
        a, b = jax_res["ms"].get(cat, 0.0), hf_res["ms"].get(cat, 0.0)
        if a < 0.005 and b < 0.005:
            continue
        rows.append({"cat": cat, "jax": a, "hf": b, "ratio": (b / a) if a > 0 else None, "gap": a - b})
    rows.append({"cat": "**sum of ops**", "jax": sum(jax_res["ms"].values()), "hf": sum(hf_res["ms"].values())})
    rows.append({"cat": "**wall time**", "jax": jax_res["wall_ms"], "hf": hf_res["wall_ms"],
                 "ratio": hf_res["wall_ms"] / jax_res["wall_ms"]})
    unit = "ms per token" if workload == "decode" else "ms per call"
    return common.markdown_table(rows, [("cat", "category"), ("jax", f"flaxgpt {unit}"), ("hf", f"PyTorch {unit}"),
                                        ("ratio", "speed-up (PyTorch / flaxgpt)"), ("gap", "flaxgpt - PyTorch ms")])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=WORKLOADS, default=list(WORKLOADS), help="workloads to run")
    p.add_argument("--scan", action="store_true", help="flaxgpt with scan_layers=True (default: unrolled)")
    p.add_argument("--calls", type=int, default=3, help="profiled calls per contender (default 3)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "breakdown.json"))
    p.add_argument("--contender", choices=("flaxgpt", "hf"), help=argparse.SUPPRESS)  # child mode
    p.add_argument("--workload", choices=WORKLOADS, help=argparse.SUPPRESS)
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.contender:
        Path(args.result_json).write_text(json.dumps(_child(args)), encoding="utf-8")
        return 0
    machine = common.machine_info()
    scan_flag = ["--scan"] if args.scan else []
    results, sections = {}, []
    for workload in args.only:
        child = [__file__, "--workload", workload, "--calls", str(args.calls)]
        jax_res = common.run_isolated([*child, "--contender", "flaxgpt", *scan_flag])
        hf_res = common.run_isolated([*child, "--contender", "hf"])
        results[workload] = {"flaxgpt": jax_res, "hf": hf_res}
        md = table(workload, jax_res, hf_res)
        sections.append(f"### {workload}\n\n{md}\n")
        print(f"\n{workload}\n{md}", flush=True)
    header = (f"# Per-op breakdown: flaxgpt vs PyTorch\n\n{machine['cpu']}, {machine['cores']} cores, load "
              f"{machine['load_avg_1m']:.1f}; jax {machine['jax']}, torch {machine['torch']}, layers: "
              f"{'scan' if args.scan else 'unrolled'}.\n")
    common.write_results(args.out, {"machine": machine, "scan_layers": args.scan, "results": results},
                         header + "\n" + "\n".join(sections))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
