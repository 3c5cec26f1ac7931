"""Chapter 4, "Implementing a GPT model from scratch to generate text".

LayerNorm, GELU, the feed-forward network, shortcut connections, the transformer block, the 124M GPT
model (shapes and parameter counts) and the book's greedy generation loop on the untrained model.
Runs offline; for real text it needs GPT-2's BPE files:
    FLAXGPT_GPT2_BPE_DIR=/path/with/gpt2-files python examples/ch04_gpt_model.py

Without them it still runs, on the token ids the book prints. Numbers from randomly initialised weights
differ from the book's (JAX's and PyTorch's random generators differ).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.book.generate import generate_text_simple
from flaxgpt.book.shortcut import ExampleDeepNeuralNetwork
from flaxgpt.config import GPT_CONFIG_124M, GPTConfig
from flaxgpt.nn.layers import GELU, FeedForward, LayerNorm, TransformerBlock
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import count_params, init_params, param_bytes, param_shapes
from flaxgpt.text.bpe import gpt2_tokenizer
from flaxgpt.text.tokenizers import text_to_token_ids, token_ids_to_text

np.set_printoptions(precision=4, suppress=True)

# What the book's tokenizer gives for the texts below (used when no BPE files are available).
BOOK_BATCH = [[6109, 3626, 6100, 345], [6109, 1110, 6622, 257]]  # "Every effort moves you", ...
BOOK_HELLO = [15496, 11, 314, 716]  # "Hello, I am"


def section(title: str) -> None:
    print(f"\n=== {title}")


def load_tokenizer():
    """GPT-2's BPE if its files can be found, else None (with a message)."""
    try:
        return gpt2_tokenizer()
    except (RuntimeError, ValueError) as e:
        print(f"[{str(e).splitlines()[0]}]")
        print(
            "[set FLAXGPT_GPT2_BPE_DIR to a folder with GPT-2's encoder.json and vocab.bpe to see text;"
            " using the book's token ids instead]"
        )
        return None


def main() -> None:
    key = jax.random.key(123)
    cfg = GPT_CONFIG_124M
    book_keys = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "drop_rate", "qkv_bias")
    print("GPT_CONFIG_124M:", {k: getattr(cfg, k) for k in book_keys})

    section("4.1 Coding an LLM architecture: a batch of token ids")
    tokenizer = load_tokenizer()
    texts = ["Every effort moves you", "Every day holds a"]
    if tokenizer is not None:
        batch = np.concatenate([text_to_token_ids(t, tokenizer) for t in texts])  # (2, 4)
    else:
        batch = np.asarray(BOOK_BATCH, np.int32)
    print(batch)  # [[6109 3626 6100  345] [6109 1110 6622  257]]

    section("4.2 Normalising activations with layer normalization")
    k_x, k_w, key = jax.random.split(key, 3)
    batch_example = jax.random.normal(k_x, (2, 5))  # two examples, five features
    w = jax.random.uniform(k_w, (5, 6), minval=-(5**-0.5), maxval=5**-0.5)  # a Linear(5, 6) + ReLU
    out = jax.nn.relu(batch_example @ w)
    print("Layer outputs:\n", np.asarray(out))
    print("Mean:", np.asarray(out.mean(-1)), " Variance:", np.asarray(out.var(-1)))
    out_norm = (out - out.mean(-1, keepdims=True)) / jnp.sqrt(out.var(-1, keepdims=True))
    print("Normalised mean:", np.asarray(out_norm.mean(-1)), " variance:", np.asarray(out_norm.var(-1)))
    ln = LayerNorm()
    ln_params = ln.init(key, batch_example)["params"]  # scale = 1, shift = 0
    out_ln = ln.apply({"params": ln_params}, batch_example)
    print("LayerNorm mean:", np.asarray(out_ln.mean(-1)), " variance:", np.asarray(out_ln.var(-1)))

    section("4.3 A feed forward network with GELU activations")
    xs = jnp.linspace(-3, 3, 7)
    print("x:   ", np.asarray(xs))
    print("GELU:", np.asarray(GELU().apply({}, xs)))
    print("ReLU:", np.asarray(jax.nn.relu(xs)))
    k_w, k_x, key = jax.random.split(key, 3)
    x = jax.random.uniform(k_x, (2, 3, 768))
    ffn = FeedForward(cfg)
    ff_params = ffn.init(k_w, x)["params"]
    hidden = ff_params["fc1"]["kernel"].shape[1]  # 4 * 768
    print("FeedForward:", x.shape, "->", ffn.apply({"params": ff_params}, x).shape, " hidden width:", hidden)

    section("4.4 Adding shortcut connections (mean |gradient| of each layer's weight)")
    layer_sizes = [3, 3, 3, 3, 3, 1]
    sample_input = jnp.array([[1.0, 0.0, -1.0]])
    k_w, key = jax.random.split(key)
    dnn_params = ExampleDeepNeuralNetwork(layer_sizes, False).init(k_w, sample_input)["params"]
    for use_shortcut in (False, True):
        model = ExampleDeepNeuralNetwork(layer_sizes, use_shortcut)

        def loss(p, model=model):
            output = model.apply({"params": p}, sample_input)
            return jnp.mean((output - jnp.array([[0.0]])) ** 2)  # MSE against target 0

        grads = jax.grad(loss)(dnn_params)  # the same initial weights for both networks
        print(f"use_shortcut={use_shortcut}:")
        for i in range(len(layer_sizes) - 1):
            mean_grad = float(jnp.abs(grads[f"layers_{i}"]["kernel"]).mean())
            print(f"  layers.{i}.0.weight has gradient mean of {mean_grad}")

    section("4.5 Connecting attention and linear layers in a transformer block")
    k_w, k_x, key = jax.random.split(key, 3)
    x = jax.random.uniform(k_x, (2, 4, 768))
    block = TransformerBlock(cfg)
    block_params = block.init(k_w, x)["params"]
    out, _ = block.apply({"params": block_params}, x)
    print("Input shape:", x.shape, " Output shape:", out.shape)
    # Exercise 4.1: where the parameters of a block are.
    n_att, n_ff = count_params(block_params["att"]), count_params(block_params["ff"])
    print(f"Parameters: attention {n_att:,}, feed forward {n_ff:,}")

    section("4.6 Coding the GPT model")
    k_init, key = jax.random.split(key)
    start = time.perf_counter()
    params = jax.block_until_ready(init_params(cfg, k_init))  # one compiled program
    print(f"Initialised GPT_CONFIG_124M in {time.perf_counter() - start:.1f} s")
    model = GPTModel(cfg)
    logits = model.apply({"params": params}, jnp.asarray(batch), deterministic=True)
    print("Input batch:\n", batch)
    print("Output shape:", logits.shape)  # (2, 4, 50257)
    print("Logits of the first row:\n", np.asarray(logits[0, :, :4]), "...")
    total = count_params(params)
    print(f"Total number of parameters: {total:,}")  # 163,009,536
    print("Token embedding layer shape:", params["tok_emb"]["embedding"].shape)  # (50257, 768)
    print("Output layer shape:", params["out_head"]["kernel"].shape)  # (768, 50257)
    tied = total - count_params(params["out_head"])
    print(f"Number of trainable parameters considering weight tying: {tied:,}")  # 124,412,160
    print(f"Total size of the model: {param_bytes(params) / 1024**2:.2f} MB")  # 621.83 MB

    # Exercise 4.2: the larger GPT-2 models, counted from shapes alone (nothing is allocated).
    for name in ("gpt2-medium", "gpt2-large", "gpt2-xl"):
        shapes = param_shapes(GPTConfig.preset(name))
        mb = param_bytes(shapes) / 1024**2
        print(f"{name:>12}: {count_params(shapes):>13,} parameters, {mb:8.2f} MB at float32")

    section("4.7 Generating text (untrained model, greedy)")
    start_context = "Hello, I am"
    if tokenizer is not None:
        encoded = text_to_token_ids(start_context, tokenizer)  # (1, 4)
    else:
        encoded = np.asarray([BOOK_HELLO], np.int32)
    print("encoded:", encoded.tolist())  # [[15496, 11, 314, 716]]
    out = generate_text_simple(model, params, encoded, max_new_tokens=6, context_size=cfg.context_length)
    print("Output:", np.asarray(out).tolist())
    print("Output length:", out.shape[1])  # 10
    if tokenizer is not None:
        print("Decoded:", repr(token_ids_to_text(out, tokenizer)))  # gibberish: the model is untrained


if __name__ == "__main__":
    main()
