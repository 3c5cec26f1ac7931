"""Model configuration: a frozen, validated dataclass with the book's field names and GPT-2 presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from flaxgpt.dtypes import COMPUTE_DTYPES
from flaxgpt.validation import check_int, check_number

__all__ = ["GPTConfig", "PRESETS", "GPT_CONFIG_124M"]

_INITS = ("torch", "gpt2")
_REMAT = ("none", "full", "dots")
_ATTENTION = ("xla", "dot_product")

# Sizes of the four GPT-2 models (book ch. 4, "Exercise 4.2" / ch. 5 "Loading pretrained weights").
PRESETS: dict[str, dict[str, int]] = {
    "gpt2-small": dict(emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}
_PRESET_ALIASES = {
    "gpt2": "gpt2-small",
    "124m": "gpt2-small",
    "355m": "gpt2-medium",
    "774m": "gpt2-large",
    "1558m": "gpt2-xl",
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a GPT model.

    The first seven fields are the book's ``GPT_CONFIG_124M`` keys. The rest are switches whose defaults
    keep the book's numerics.

    Attributes:
      vocab_size: number of token ids (50,257 for GPT-2's BPE).
      context_length: number of learned positions; longer inputs are an error.
      emb_dim: embedding (model) width.
      n_heads: attention heads; must divide ``emb_dim``.
      n_layers: transformer blocks.
      drop_rate: dropout on embeddings, attention weights and shortcut branches.
      qkv_bias: whether the query/key/value projections have a bias (GPT-2 checkpoints do).
      tie_embeddings: share the output head with the token embedding (GPT-2 checkpoints do).
      init: "torch" (PyTorch's default init, as the book's modules get) or "gpt2" (N(0, 0.02), scaled
        residual projections, zero biases).
      ln_eps: LayerNorm epsilon.
      scan_layers: run the blocks as one ``nn.scan`` over stacked parameters (faster compiles).
      remat: "none", "full" or "dots": ``jax.checkpoint`` policy for each block.
      dtype: compute dtype ("float32" or "bfloat16"); parameters stay in ``param_dtype``, logits are float32.
      param_dtype: storage dtype of parameters.
      attention: "xla" (explicit einsum + softmax) or "dot_product" (``jax.nn.dot_product_attention``,
        cuDNN flash attention on GPUs where available).
      num_classes: None for a language model (the head predicts ``vocab_size`` tokens); an int >= 2 for a
        classifier (book chapter 6): the head is an ``(emb_dim, num_classes)`` linear layer with bias (see
        :func:`flaxgpt.finetune.classify.to_classifier`).
    """

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.1
    qkv_bias: bool = False
    tie_embeddings: bool = False
    init: str = "torch"
    ln_eps: float = 1e-5
    scan_layers: bool = False
    remat: str = "none"
    dtype: str = "float32"
    param_dtype: str = "float32"
    attention: str = "xla"
    num_classes: int | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            check_int(f"GPTConfig.{name}", getattr(self, name), 1)
        if self.emb_dim % self.n_heads:
            raise ValueError(
                f"GPTConfig.emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if check_number("GPTConfig.drop_rate", self.drop_rate, 0.0) >= 1.0:
            raise ValueError(f"GPTConfig.drop_rate must be in [0, 1), got {self.drop_rate!r}")
        check_number("GPTConfig.ln_eps", self.ln_eps, 0.0, open_low=True)
        for name, allowed in (("init", _INITS), ("remat", _REMAT), ("attention", _ATTENTION)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.num_classes is not None:
            check_int("GPTConfig.num_classes", self.num_classes, 2)
            if self.tie_embeddings:
                raise ValueError("GPTConfig.num_classes needs tie_embeddings=False: a classifier has its own head")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in COMPUTE_DTYPES:
                raise ValueError(
                    f"GPTConfig.{name} must be one of {tuple(COMPUTE_DTYPES)}, got {getattr(self, name)!r}"
                )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.emb_dim // self.n_heads

    @property
    def compute_dtype(self) -> Any:
        """``dtype`` as a JAX dtype."""
        return COMPUTE_DTYPES[self.dtype]

    @property
    def weight_dtype(self) -> Any:
        """``param_dtype`` as a JAX dtype."""
        return COMPUTE_DTYPES[self.param_dtype]

    def replace(self, **changes: Any) -> GPTConfig:
        """Returns a copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Returns a JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GPTConfig:
        """Builds a config from ``to_dict`` output; unknown keys are an error.

        Args:
          d: a mapping of field names to values.

        Returns:
          The validated config.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """Returns a named GPT-2 size with the book's defaults, then ``overrides``.

        Args:
          name: "gpt2-small" (124M), "gpt2-medium" (355M), "gpt2-large" (774M) or "gpt2-xl" (1558M);
            "gpt2", "124M", "355M", "774M", "1558M" are accepted too.
          **overrides: any other field, e.g. ``context_length=256``.

        Returns:
          The validated config.
        """
        names = sorted(PRESETS) + sorted(_PRESET_ALIASES)
        if not isinstance(name, str):
            raise ValueError(
                f"preset name must be a str, got {name!r} ({type(name).__name__}); choose one of {names} "
                "(sizes are strings with an M, e.g. '124M')"
            )
        key = _PRESET_ALIASES.get(name.lower(), name.lower())
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {names}")
        return cls(**{**PRESETS[key], **overrides})


# The book's GPT_CONFIG_124M dict, as a config.
GPT_CONFIG_124M = GPTConfig(
    vocab_size=50257,
    context_length=1024,
    emb_dim=768,
    n_heads=12,
    n_layers=12,
    drop_rate=0.1,
    qkv_bias=False,
)
