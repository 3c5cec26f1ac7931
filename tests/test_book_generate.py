"""flaxgpt.book.generate: the book's greedy generate_text_simple loop (no KV cache), checked against
the argmax of full forward passes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from _logits import logits as _logits

from flaxgpt.book.generate import generate_text_simple
from flaxgpt.nn.model import GPTModel


def _assert_book_greedy(cfg, params, out, prompt_len: int, context_size: int) -> None:
    """Each generated token is the argmax of the model's last logits on the window before it, where the
    window is the last ``context_size`` tokens (the book's loop). All windows go through one batched
    forward, so the check compiles once instead of once per length."""
    out = np.asarray(out)
    steps = range(prompt_len, out.shape[1])
    if prompt_len >= context_size:  # every window is cropped to exactly context_size
        windows = np.concatenate([out[:, t - context_size : t] for t in steps])  # (steps * B, ctx)
        last = _logits(cfg, params, windows)[:, -1]  # (steps * B, V)
        expected = np.asarray(jnp.argmax(last, -1)).reshape(len(steps), -1).T  # (B, steps)
    else:  # no cropping: causality makes each window's last logits a row of one forward
        assert out.shape[1] - 1 <= context_size
        logits = _logits(cfg, params, out[:, :-1])  # (B, T - 1, V)
        expected = np.asarray(jnp.argmax(logits[:, prompt_len - 1 :], -1))  # (B, steps)
    np.testing.assert_array_equal(out[:, prompt_len:], expected)


def test_generate_text_simple_is_the_books_greedy_loop(tiny, ids, tiny_params):
    # Windows of 4..9 tokens are right-padded to buckets of 8 and 16: padding must not leak.
    model = GPTModel(tiny)
    idx = ids[:, :4]
    out = generate_text_simple(model, tiny_params, idx, max_new_tokens=6, context_size=16)
    assert out.shape == (2, 10) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :4], idx)
    _assert_book_greedy(tiny, tiny_params, out, prompt_len=4, context_size=16)


@pytest.mark.parametrize("prompt_len, context_size", [(6, 5), (18, 16)])  # 16: the context_length
def test_generate_text_simple_crops_to_context_size(tiny, ids, tiny_params, prompt_len, context_size):
    model = GPTModel(tiny)
    idx = np.concatenate([ids, ids], axis=1)[:, :prompt_len]  # (2, prompt_len)
    out = generate_text_simple(model, tiny_params, idx, max_new_tokens=8, context_size=context_size)
    assert out.shape == (2, prompt_len + 8)
    _assert_book_greedy(tiny, tiny_params, out, prompt_len, context_size)


def test_generate_text_simple_validates_inputs(tiny, tiny_params):
    model = GPTModel(tiny)
    ok = [[1, 2, 3]]
    np.testing.assert_array_equal(generate_text_simple(model, tiny_params, ok, 0, 8), ok)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate_text_simple(model, tiny_params, [[1, tiny.vocab_size]], 2, 8)
    with pytest.raises(ValueError, match="-3"):
        generate_text_simple(model, tiny_params, [[-3, 1]], 2, 8)
    with pytest.raises(ValueError, match="context_size"):
        generate_text_simple(model, tiny_params, ok, 2, tiny.context_length + 1)
    with pytest.raises(ValueError, match="context_size"):
        generate_text_simple(model, tiny_params, ok, 2, 0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_text_simple(model, tiny_params, ok, -1, 8)
    with pytest.raises(ValueError, match="shape"):
        generate_text_simple(model, tiny_params, [1, 2, 3], 2, 8)
