"""``flaxgpt info [PATH]``: library versions, the JAX backend and its devices; or, given weights, their
config, parameter count and size."""

from __future__ import annotations

import argparse
import importlib.metadata

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show versions, JAX backend and devices, or a model's config and size",
        description="Without PATH: versions, JAX backend and devices. With PATH (anything `flaxgpt convert` "
        "reads: a Hugging Face folder or file, a book .safetensors file, a flaxgpt run or checkpoint, a "
        "GPT-2 model name): its config, parameter count and size, read from headers only.",
    )
    p.add_argument("path", nargs="?", default=None, metavar="PATH", help="weights to describe")
    p.add_argument(
        "--n-heads", type=int, default=None, metavar="H", help="heads of a book file of non-GPT-2 width"
    )
    p.set_defaults(func=run)


def environment_info() -> dict[str, object]:
    """Returns versions of flaxgpt and its main dependencies, the JAX backend and devices."""
    import jax

    versions = {}
    for dist in ("flaxgpt", "jax", "jaxlib", "flax", "optax", "tiktoken", "numpy"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def model_info(path: str, n_heads: int | None = None) -> dict[str, object]:
    """Returns the format, location, config, parameter count and stored size of weights at ``path``."""
    from flaxgpt.io.pretrained import describe
    from flaxgpt.nn.params import count_params, param_bytes, param_shapes

    cfg, fmt, location = describe(path, n_heads=n_heads)
    shapes = param_shapes(cfg)
    return {
        "format": fmt,
        "location": location,
        "config": cfg.to_dict(),
        "head": _head(cfg),
        "lora": _lora(path) if fmt == "checkpoint" else None,
        "tokenizer": _tokenizer(path) if fmt == "checkpoint" else "gpt2 (GPT-2's BPE)",
        "parameters": count_params(shapes),
        "bytes": param_bytes(shapes),
    }


def _tokenizer(path: str) -> str:
    """The tokenizer a run was trained with, in words."""
    from flaxgpt.io.checkpoint import resolve_checkpoint

    name = str(resolve_checkpoint(path, verify=False)[1].get("tokenizer", "gpt2"))
    if name.startswith("bpe-"):
        return f"{name} (a BPE learned from the run's corpus: the run's tokenizer.json)"
    return {"gpt2": "gpt2 (GPT-2's BPE)", "bytes": "bytes (UTF-8 bytes, 256 ids + <|endoftext|>)"}.get(name, name)


def _lora(path: str) -> str | None:
    """A LoRA run's adapters in words (from meta.json), or None."""
    import math

    from flaxgpt.io.checkpoint import resolve_checkpoint

    meta = resolve_checkpoint(path)[1]
    settings = meta.get("extra", {}).get("lora")
    if not settings:
        return None
    n = sum(math.prod(leaf["shape"]) for leaf in meta["leaves"] if leaf["name"].startswith("params/lora/"))
    return (f"rank {settings.get('rank')}, alpha {settings.get('alpha')}, targets {settings.get('targets')}: "
            f"{n:,} adapter params, merged into the weights on load (book appendix E)")


def _head(cfg: object) -> str:
    """The output head in words: a classifier's classes, or the language model's (tied) vocabulary head."""
    if getattr(cfg, "num_classes", None) is not None:
        return f"classifier: {cfg.emb_dim} -> {cfg.num_classes} classes, with bias (book chapter 6)"
    tied = " (tied to tok_emb)" if cfg.tie_embeddings else ""
    return f"language model: {cfg.emb_dim} -> {cfg.vocab_size} tokens{tied}"


def _print_model(info: dict[str, object]) -> None:
    print(f"{'format':15s} {info['format']}")
    print(f"{'location':15s} {info['location']}")
    for name, value in info["config"].items():  # type: ignore[union-attr]
        print(f"{name:15s} {value}")
    print(f"{'head':15s} {info['head']}")
    print(f"{'tokenizer':15s} {info['tokenizer']}")
    if info.get("lora"):
        print(f"{'lora':15s} {info['lora']}")
    n, size = int(info["parameters"]), int(info["bytes"])  # type: ignore[call-overload]
    print(f"{'parameters':15s} {n:,} ({n / 1e6:.1f}M)")
    print(f"{'size':15s} {size:,} bytes ({size / 2**20:.1f} MiB)")


def run(args: argparse.Namespace) -> int:
    if getattr(args, "path", None) is not None:
        from flaxgpt.cli import CLIError

        try:
            _print_model(model_info(args.path, args.n_heads))
        except ImportError as e:
            raise CLIError(str(e)) from e
        return 0
    info = environment_info()
    for name, version in info["versions"].items():
        print(f"{name:10s} {version}")
    print(f"backend    {info['backend']}")
    print(f"devices    {', '.join(info['devices'])}")
    return 0
