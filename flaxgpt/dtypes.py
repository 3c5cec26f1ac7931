"""Dtype names: the one table from the names configs, files and the CLI use to NumPy/JAX dtypes."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

__all__ = ["COMPUTE_DTYPES", "WEIGHT_DTYPES", "SAFETENSORS_CODES", "STORED_AS", "dtype_name", "name_of_code"]

# Compute / parameter dtypes a GPTConfig may name.
COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# Dtypes weights can be loaded or converted to.
WEIGHT_DTYPES = ("float32", "bfloat16")
# safetensors' dtype codes of the dtypes flaxgpt writes.
SAFETENSORS_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
# safetensors' numpy backend has no bfloat16: such arrays are stored as their uint16 bit pattern.
STORED_AS: dict[str, Any] = {"bfloat16": np.uint16}


def dtype_name(dtype: Any, allowed: tuple[str, ...] = WEIGHT_DTYPES, default: str = "float32") -> str:
    """The canonical name of a dtype given as a name, a NumPy/JAX dtype, or None (``default``).

    Args:
      dtype: "bfloat16", ``jnp.bfloat16``, ``np.dtype("float32")``, ... or None.
      allowed: the names accepted.
      default: the name None stands for.

    Returns:
      The name, e.g. "bfloat16".

    Raises:
      ValueError: the dtype is not one of ``allowed``.
    """
    if dtype is None:
        return default
    try:
        name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in allowed:
        raise ValueError(f"dtype must be one of {allowed}, got {dtype!r}")
    return name


def name_of_code(code: str) -> str:
    """The dtype name of a safetensors dtype code ("BF16" -> "bfloat16"), the inverse of ``SAFETENSORS_CODES``.

    Raises:
      ValueError: a code flaxgpt does not read weights in (e.g. "I64").
    """
    names = {c: n for n, c in SAFETENSORS_CODES.items()}
    if code.upper() not in names:
        raise ValueError(f"tensors of safetensors dtype {code!r} are not weights flaxgpt reads; expected {sorted(names)}")
    return names[code.upper()]
