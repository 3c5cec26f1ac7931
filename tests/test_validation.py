"""flaxgpt.validation: the argument checks every module shares (ints, numbers, token ids, tracers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.validation import check_int, check_number, check_optional_int, check_token_ids, is_concrete


def test_check_int_accepts_python_and_numpy_ints():
    assert check_int("n", 3) == 3 and type(check_int("n", np.int64(3))) is int
    assert check_int("n", 0, 0) == 0 and check_int("n", 4, 0, 5) == 4
    assert check_optional_int("n", None) is None and check_optional_int("n", 2, 1) == 2


@pytest.mark.parametrize(
    "value, low, high, message",
    [
        (0, 1, None, "n must be a positive int, got 0"),
        (-1, 0, None, "n must be a non-negative int, got -1"),
        (5, 0, 5, r"n must be an int in \[0, 5\), got 5"),
        (1, 2, None, "n must be an int >= 2, got 1"),
        (True, None, None, "n must be an int, got True"),
        (2.0, None, None, "n must be an int, got 2.0"),
        ("3", None, None, "n must be an int, got '3'"),
    ],
)
def test_check_int_rejects_with_the_value_named(value, low, high, message):
    with pytest.raises(ValueError, match=message):
        check_int("n", value, low, high)


def test_check_number():
    assert check_number("x", 1) == 1.0 and check_number("x", np.float32(0.5), 0.0, 1.0) == 0.5
    assert check_number("x", 0.0, 0.0) == 0.0
    with pytest.raises(ValueError, match="x must be > 0.0, got 0.0"):
        check_number("x", 0.0, 0.0, open_low=True)
    with pytest.raises(ValueError, match="x must be <= 1.0, got 1.5"):
        check_number("x", 1.5, 0.0, 1.0)
    for bad in (float("nan"), float("inf"), True, "1", None):
        with pytest.raises(ValueError, match="x must be a finite number"):
            check_number("x", bad)


def test_check_token_ids():
    out = check_token_ids([[1, 2, 3]], vocab_size=4)
    assert out.dtype == np.int32 and out.tolist() == [[1, 2, 3]]
    with pytest.raises(ValueError, match="4.*outside.*\\[0, 4\\)"):
        check_token_ids([[1, 4]], vocab_size=4)
    with pytest.raises(ValueError, match="-1"):
        check_token_ids([[-1, 2]], vocab_size=4)
    with pytest.raises(ValueError, match="1099511627776"):  # would wrap to 0 in int32
        check_token_ids([2**40], vocab_size=4)
    with pytest.raises(ValueError, match="integers"):
        check_token_ids([[1.5]], vocab_size=4)
    with pytest.raises(ValueError, match="prompt ids contain 9"):
        check_token_ids([9], vocab_size=4, name="prompt ids")
    assert check_token_ids(np.zeros((2, 0)), vocab_size=4).shape == (2, 0)  # empty: nothing to check


def test_is_concrete():
    assert is_concrete(np.zeros(2)) and is_concrete(jnp.zeros(2)) and is_concrete(3)
    seen = []
    jax.jit(lambda x: seen.append(is_concrete(x)) or x)(jnp.zeros(2))
    jax.grad(lambda x: seen.append(is_concrete(x)) or x)(1.0)
    assert seen == [False, False]
