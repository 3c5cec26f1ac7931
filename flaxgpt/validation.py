"""Argument checks at the Python boundary (before ``jit``): clear ``ValueError``s that name the bad value.

Inside compiled code flaxgpt assumes valid inputs; these checks are where they are made valid. Token ids
matter most: JAX's gather clamps or NaN-fills out-of-range indices instead of raising.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import jax
import numpy as np

__all__ = ["check_int", "check_optional_int", "check_number", "check_token_ids", "check_language_model", "is_concrete"]


def _int_range(low: int | None, high: int | None) -> str:
    if high is not None:
        return f"an int in [{low if low is not None else '-inf'}, {high})"
    if low == 1:
        return "a positive int"
    if low == 0:
        return "a non-negative int"
    return "an int" if low is None else f"an int >= {low}"


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Checks that ``value`` is an integer (Python or NumPy, not bool) in ``[low, high)``.

    Args:
      name: the argument's name, for the message.
      value: the value.
      low: the smallest allowed value (None: no bound).
      high: one past the largest allowed value (None: no bound).

    Returns:
      The value as a Python int.
    """
    try:
        i = None if isinstance(value, (bool, np.bool_)) else operator.index(value)
    except TypeError:
        i = None
    if i is None or (low is not None and i < low) or (high is not None and i >= high):
        raise ValueError(f"{name} must be {_int_range(low, high)}, got {value!r}")
    return i


def check_optional_int(name: str, value: Any, low: int | None = None) -> int | None:
    """:func:`check_int`, letting None through."""
    return None if value is None else check_int(name, value, low)


def check_number(
    name: str, value: Any, low: float | None = None, high: float | None = None, *, open_low: bool = False
) -> float:
    """Checks that ``value`` is a finite real number (not bool) within the bounds.

    Args:
      name: the argument's name, for the message.
      value: the value.
      low: the smallest allowed value (excluded when ``open_low``).
      high: the largest allowed value.
      open_low: exclude ``low`` itself.

    Returns:
      The value as a float.
    """
    ok = not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    v = float(value)
    if low is not None and (v < low or (open_low and v == low)):
        raise ValueError(f"{name} must be {'>' if open_low else '>='} {low}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")
    return v


def is_concrete(x: Any) -> bool:
    """True when ``x`` holds values now (not a tracer inside ``jit``/``grad``/``vmap``)."""
    return not isinstance(x, jax.core.Tracer)


def check_token_ids(ids: Any, vocab_size: int, name: str = "token ids") -> np.ndarray:
    """Validates token ids on the host (JAX's gather would silently clamp bad ones).

    Args:
      ids: an integer array-like.
      vocab_size: ids must lie in [0, vocab_size).
      name: what to call the ids in the error message.

    Returns:
      The ids as an int32 numpy array.
    """
    arr = np.asarray(ids)
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name} contain {bad}, outside the vocabulary [0, {vocab_size})")
    return arr.astype(np.int32)


def check_language_model(cfg: Any) -> None:
    """Refuses to generate text with a classifier (``cfg.num_classes`` set): its head scores classes, not tokens.

    Args:
      cfg: the model's GPTConfig.
    """
    if getattr(cfg, "num_classes", None) is not None:
        raise ValueError(
            f"this model is a classifier (num_classes={cfg.num_classes}): its head scores classes, not tokens, "
            "so it cannot generate text (classify with flaxgpt.finetune.classify.classify / `flaxgpt classify`)"
        )
