"""Model FLOP counting for MFU, and a matmul FLOP/s probe of this machine (JAX and PyTorch).

Model FLOPs (the numerator of MFU) follow the usual accounting (Kaplan et al. 2020, PaLM appendix B):
only matrix multiplications count, one multiply-add = 2 FLOPs; LayerNorm, GELU, softmax, biases,
embedding look-ups and the optimizer update are left out (well under 1 % for GPT-2 shapes).

Per token, with ``L`` layers, width ``d``, vocabulary ``V`` and ``T`` positions attended to:

* ``N`` = weights that take part in a matmul = ``L * 12 d^2`` (``W_query``, ``W_key``, ``W_value``: 3 d^2;
  ``out_proj``: d^2; ``fc1`` and ``fc2``: 8 d^2) ``+ d V`` (the output head, also when it is tied to the
  token embedding: it is still a (d, V) matmul). Position and token look-ups are not matmuls.
* forward = ``2 N + 4 L T d``: ``2 N`` for the weight matmuls, ``2 L T d`` for ``Q K^T`` and ``2 L T d``
  for ``weights @ V``. The full T x T score matrix is counted, as implementations compute it (the
  causal mask throws away about half).
* train step = 3 x forward = ``6 N + 12 L T d`` (the backward pass costs two forwards: gradients with
  respect to activations and to weights). Rematerialisation recomputes activations but does not change
  the *model* FLOPs: MFU measures useful work, not hardware FLOPs.
* decode with a KV cache: the token at position ``t`` (0-based) attends to ``t + 1`` positions, so it
  costs ``2 N + 4 L (t + 1) d``.

MFU = (model FLOPs per token x tokens/s) / the matmul FLOP/s measured on the same machine in the same
run (:func:`matmul_flops_per_s`: the fastest of 10 float32 2048^3 matmuls in the faster of JAX and
PyTorch), not a datasheet peak.

    python benchmarks/flops.py            # probe both frameworks, each in its own process
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

FRAMEWORKS = ("jax", "torch")
# (M, K, N) of the probe matmuls: a square one, which sets the peak, and the FFN shape of a
# B8 x T256 GPT-2 124M forward, which shows how fast the model's own matmuls can go.
SHAPES = {"square": (2048, 2048, 2048), "ffn_b8t256": (2048, 768, 3072)}


def matmul_params(cfg: Any) -> int:
    """Weights that take part in a matmul, ``N`` above: ``12 L d^2`` in the blocks plus ``d V`` for the head.

    Args:
      cfg: a :class:`flaxgpt.config.GPTConfig` (anything with ``n_layers``, ``emb_dim``, ``vocab_size``).

    Returns:
      ``N``.
    """
    d = cfg.emb_dim
    return cfg.n_layers * 12 * d * d + d * cfg.vocab_size


def forward_flops_per_token(cfg: Any, seq_len: int) -> int:
    """Model FLOPs of one token in a full-sequence forward pass: ``2 N + 4 L T d``.

    Args:
      cfg: the model config.
      seq_len: ``T``, the sequence length of the batch (each query is counted against all T keys).

    Returns:
      FLOPs per token.
    """
    return 2 * matmul_params(cfg) + 4 * cfg.n_layers * seq_len * cfg.emb_dim


def train_flops_per_token(cfg: Any, seq_len: int) -> int:
    """Model FLOPs of one token in a train step (forward + backward): ``3 x (2 N + 4 L T d) = 6 N + 12 L T d``.

    Args:
      cfg: the model config.
      seq_len: ``T``.

    Returns:
      FLOPs per token.
    """
    return 3 * forward_flops_per_token(cfg, seq_len)


def decode_flops(cfg: Any, prompt_len: int, new_tokens: int) -> int:
    """Model FLOPs of a greedy KV-cache generation: the prompt's prefill plus ``new_tokens - 1`` steps.

    Token ``t`` (0-based position) costs ``2 N + 4 L (t + 1) d``; the prefill processes positions
    ``0 .. prompt_len - 1`` and each decode step one more position (the last new token is sampled from
    the logits of the step before, so ``new_tokens`` tokens need ``new_tokens - 1`` decode forwards).

    Args:
      cfg: the model config.
      prompt_len: tokens in the prompt.
      new_tokens: tokens generated.

    Returns:
      Total FLOPs of the call.
    """
    n_positions = prompt_len + max(new_tokens - 1, 0)
    attended = n_positions * (n_positions + 1) // 2  # sum over t of (t + 1)
    return 2 * matmul_params(cfg) * n_positions + 4 * cfg.n_layers * cfg.emb_dim * attended


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops_per_s: float) -> float:
    """Model FLOP utilisation: achieved model FLOP/s over the measured peak.

    Args:
      flops_per_token: e.g. :func:`forward_flops_per_token`.
      tokens_per_s: measured throughput.
      peak_flops_per_s: e.g. ``matmul_flops_per_s()["peak"]``.

    Returns:
      A fraction (0.25 = 25 %).
    """
    return flops_per_token * tokens_per_s / peak_flops_per_s


# --------------------------------------------------------------------------- the probe


def _probe_jax(shape: tuple[int, int, int], repeats: int) -> float:
    import jax
    import jax.numpy as jnp

    m, k, n = shape
    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)  # (M, K)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)  # (K, N)
    matmul = jax.jit(jnp.matmul)
    timing = common.time_calls(lambda: matmul(a, b).block_until_ready(), repeats=repeats, warmup=2)
    return 2 * m * k * n / timing.min_s


def _probe_torch(shape: tuple[int, int, int], repeats: int) -> float:
    import torch

    torch.set_num_threads(common.usable_cores())
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen)  # (M, K)
    b = torch.randn(k, n, generator=gen)  # (K, N)
    with torch.inference_mode():
        timing = common.time_calls(lambda: torch.matmul(a, b), repeats=repeats, warmup=2)
    return 2 * m * k * n / timing.min_s


def probe(framework: str, repeats: int = 10) -> dict[str, Any]:
    """Measures float32 matmul FLOP/s of one framework in this process, using every usable core.

    Args:
      framework: "jax" (a jitted ``jnp.matmul``, XLA:CPU) or "torch" (``torch.matmul``, oneDNN/MKL).
      repeats: timed calls per shape, after a first call and two warm-ups. The fastest call counts: this
        measures what the machine can do, and on a shared machine the slower calls measure the neighbours.

    Returns:
      ``{name: FLOP/s}`` for each of :data:`SHAPES`, plus ``"threads"``.
    """
    if framework not in FRAMEWORKS:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    fn = _probe_jax if framework == "jax" else _probe_torch
    out: dict[str, Any] = {name: fn(shape, repeats) for name, shape in SHAPES.items()}
    out["threads"] = common.usable_cores()
    return out


def matmul_flops_per_s(repeats: int = 10) -> dict[str, Any]:
    """Float32 matmul FLOP/s of this machine, each framework in its own process.

    Args:
      repeats: timed calls per shape and framework.

    Returns:
      ``{"jax": {...}, "torch": {...}, "peak": FLOP/s, "peak_source": "jax" or "torch", "shapes": ...}``;
      the peak is the faster framework on the square 2048^3 matmul.
    """
    script = str(Path(__file__).resolve())
    res = {fw: common.run_isolated([script, "--framework", fw, "--repeats", str(repeats)]) for fw in FRAMEWORKS}
    source = max(FRAMEWORKS, key=lambda fw: res[fw]["square"])
    return {**res, "peak": res[source]["square"], "peak_source": source,
            "shapes": {k: list(v) for k, v in SHAPES.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=10, help="timed matmuls per shape (default 10)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "flops.json"))
    p.add_argument("--framework", choices=FRAMEWORKS, help=argparse.SUPPRESS)  # child mode
    p.add_argument("--result-json", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.framework:
        Path(args.result_json).write_text(json.dumps(probe(args.framework, args.repeats)), encoding="utf-8")
        return 0

    res = matmul_flops_per_s(args.repeats)
    res["machine"] = common.machine_info()
    rows = [{"fw": fw, **{k: res[fw][k] / 1e9 for k in SHAPES}} for fw in FRAMEWORKS]
    table = common.markdown_table(
        rows, [("fw", "framework")] + [(k, f"{k} {'x'.join(map(str, s))} GFLOP/s") for k, s in SHAPES.items()]
    )
    m = res["machine"]
    md = (f"float32 matmul, {m['cpu']}, {m['cores']} cores, load {m['load_avg_1m']:.1f}. "
          f"Peak for MFU: {res['peak'] / 1e9:.1f} GFLOP/s ({res['peak_source']}).\n\n{table}")
    common.write_results(args.out, res, md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
