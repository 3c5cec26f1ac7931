"""flaxgpt.book.shortcut: the book's ExampleDeepNeuralNetwork (section 4.4) and its gradient table, with and
without shortcut connections."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxgpt.book.shortcut import ExampleDeepNeuralNetwork

BOOK_LAYER_SIZES = [3, 3, 3, 3, 3, 1]


BOOK_INPUT = jnp.array([[1.0, 0.0, -1.0]])


BOOK_GRADS_PLAIN = [
    0.00020173587836325169,
    0.0001201116101583466,
    0.0007152041653171182,
    0.001398873864673078,
    0.005049646366387606,
]


BOOK_GRADS_SHORTCUT = [
    0.22169792652130127,
    0.20694105327129364,
    0.32896995544433594,
    0.2665732502937317,
    1.3258541822433472,
]


def _weight_grad_means(params, use_shortcut: bool) -> list[float]:
    model = ExampleDeepNeuralNetwork(BOOK_LAYER_SIZES, use_shortcut)

    def loss(p):
        out = model.apply({"params": p}, BOOK_INPUT)
        return jnp.mean((out - jnp.zeros_like(out)) ** 2)  # MSE against target [[0.]]

    grads = jax.grad(loss)(params)
    return [float(jnp.abs(grads[f"layers_{i}"]["kernel"]).mean()) for i in range(len(BOOK_LAYER_SIZES) - 1)]


def test_example_dnn_params_and_shapes():
    for use_shortcut in (False, True):
        model = ExampleDeepNeuralNetwork(BOOK_LAYER_SIZES, use_shortcut)
        p = model.init(jax.random.key(0), BOOK_INPUT)["params"]
        assert sorted(p) == [f"layers_{i}" for i in range(5)]
        assert p["layers_4"]["kernel"].shape == (3, 1)
        assert model.apply({"params": p}, BOOK_INPUT).shape == (1, 1)


def test_example_dnn_shortcut_changes_output():
    p = ExampleDeepNeuralNetwork(BOOK_LAYER_SIZES, False).init(jax.random.key(0), BOOK_INPUT)["params"]
    plain = ExampleDeepNeuralNetwork(BOOK_LAYER_SIZES, False).apply({"params": p}, BOOK_INPUT)
    short = ExampleDeepNeuralNetwork(BOOK_LAYER_SIZES, True).apply({"params": p}, BOOK_INPUT)
    assert not np.allclose(plain, short)


def test_example_dnn_shortcuts_keep_gradients_large():
    p = ExampleDeepNeuralNetwork(BOOK_LAYER_SIZES, False).init(jax.random.key(123), BOOK_INPUT)["params"]
    plain = _weight_grad_means(p, use_shortcut=False)
    short = _weight_grad_means(p, use_shortcut=True)
    assert plain[0] < plain[-1]  # vanishing towards the input without shortcuts
    assert min(short) > max(plain[:-1])


def _book_torch_weights(torch):
    """The book's network built in torch with torch.manual_seed(123), as flax params."""
    torch.manual_seed(123)
    layers = [
        torch.nn.Linear(d_in, d_out)
        for d_in, d_out in zip(BOOK_LAYER_SIZES[:-1], BOOK_LAYER_SIZES[1:], strict=True)
    ]
    return {
        f"layers_{i}": {
            "kernel": jnp.asarray(lin.weight.detach().numpy().T),
            "bias": jnp.asarray(lin.bias.detach().numpy()),
        }
        for i, lin in enumerate(layers)
    }


@pytest.mark.parametrize("use_shortcut, book", [(False, BOOK_GRADS_PLAIN), (True, BOOK_GRADS_SHORTCUT)])
def test_example_dnn_reproduces_book_gradient_table(use_shortcut, book):
    torch = pytest.importorskip("torch")
    params = _book_torch_weights(torch)
    np.testing.assert_allclose(_weight_grad_means(params, use_shortcut), book, rtol=1e-4)
