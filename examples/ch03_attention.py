"""Chapter 3, "Coding attention mechanisms": from weightless self-attention to multi-head attention.

Follows the chapter's sections with the book's six-token example "Your journey starts with one step".
Needs no data files and no network:
    python examples/ch03_attention.py

Numbers that depend only on the inputs (section 3.3) match the book's printout; numbers that depend on
randomly initialised weights differ, because JAX's and PyTorch's random generators differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from flaxgpt.book.attention import (
    CausalAttention,
    MultiHeadAttentionWrapper,
    SelfAttentionV1,
    SelfAttentionV2,
    simple_self_attention,
)
from flaxgpt.nn.attention import MultiHeadAttention
from flaxgpt.nn.params import count_params

np.set_printoptions(precision=4, suppress=True)

# Section 3.3: one 3-d embedding per word of "Your journey starts with one step".
INPUTS = jnp.array(
    [
        [0.43, 0.15, 0.89],  # Your     (x^1)
        [0.55, 0.87, 0.66],  # journey  (x^2)
        [0.57, 0.85, 0.64],  # starts   (x^3)
        [0.22, 0.58, 0.33],  # with     (x^4)
        [0.77, 0.25, 0.10],  # one      (x^5)
        [0.05, 0.80, 0.55],  # step     (x^6)
    ]
)


def section(title: str) -> None:
    print(f"\n=== {title}")


def main() -> None:
    key = jax.random.key(123)

    section("3.3.1 A simple self-attention mechanism without trainable weights")
    query = INPUTS[1]  # x^2, "journey"
    attn_scores_2 = INPUTS @ query  # (6,) dot products
    print("Attention scores for x^2:", np.asarray(attn_scores_2))  # [0.9544 1.495 1.4754 ...]
    naive = attn_scores_2 / attn_scores_2.sum()
    print("Normalised by the sum:   ", np.asarray(naive), "sum:", float(naive.sum()))
    attn_weights_2 = jax.nn.softmax(attn_scores_2)
    print("Softmax weights:         ", np.asarray(attn_weights_2), "sum:", float(attn_weights_2.sum()))
    context_vec_2 = attn_weights_2 @ INPUTS  # (3,)
    print("Context vector z^2:      ", np.asarray(context_vec_2))  # [0.4419 0.6515 0.5683]

    section("3.3.2 Attention weights for all input tokens")
    attn_scores = INPUTS @ INPUTS.T  # (6, 6)
    print("Attention scores:\n", np.asarray(attn_scores))
    attn_weights = jax.nn.softmax(attn_scores, axis=-1)
    print("Row sums of the weights:", np.asarray(attn_weights.sum(-1)))
    print("All context vectors (simple_self_attention):\n", np.asarray(simple_self_attention(INPUTS)))

    section("3.4.1 Self-attention with trainable weights, step by step")
    d_out = 2  # d_in is 3
    k_w, key = jax.random.split(key)
    sa_v1 = SelfAttentionV1(d_out)
    params_v1 = sa_v1.init(k_w, INPUTS)["params"]  # W_query, W_key, W_value: (3, 2), U[0, 1)
    x_2 = INPUTS[1]
    query_2 = x_2 @ params_v1["W_query"]  # (2,)
    keys = INPUTS @ params_v1["W_key"]  # (6, 2)
    values = INPUTS @ params_v1["W_value"]  # (6, 2)
    print("query_2:", np.asarray(query_2), " keys.shape:", keys.shape, " values.shape:", values.shape)
    attn_scores_2 = keys @ query_2  # (6,)
    print("omega_22 =", float(attn_scores_2[1]), " all scores for query 2:", np.asarray(attn_scores_2))
    attn_weights_2 = jax.nn.softmax(attn_scores_2 / keys.shape[-1] ** 0.5)
    print("Scaled softmax weights:", np.asarray(attn_weights_2))
    print("Context vector z^2:", np.asarray(attn_weights_2 @ values))

    section("3.4.2 A compact self-attention class")
    print("SelfAttentionV1 output:\n", np.asarray(sa_v1.apply({"params": params_v1}, INPUTS)))
    k_w, key = jax.random.split(key)
    sa_v2 = SelfAttentionV2(d_out)
    params_v2 = sa_v2.init(k_w, INPUTS)["params"]  # Dense kernels (3, 2), no bias
    out_v2 = sa_v2.apply({"params": params_v2}, INPUTS)
    print("SelfAttentionV2 output (Dense layers, no bias):\n", np.asarray(out_v2))
    # Exercise 3.1: give V1 the V2 weights and both agree.
    transferred = {name: params_v2[name]["kernel"] for name in ("W_query", "W_key", "W_value")}
    out_v1 = sa_v1.apply({"params": transferred}, INPUTS)
    print("V1 with V2's weights equals V2:", bool(jnp.allclose(out_v1, out_v2, atol=1e-6)))

    section("3.5.1 Hiding future words with causal attention")
    q = INPUTS @ params_v2["W_query"]["kernel"]
    k = INPUTS @ params_v2["W_key"]["kernel"]
    scores = q @ k.T  # (6, 6)
    weights = jax.nn.softmax(scores / k.shape[-1] ** 0.5, axis=-1)
    context_length = scores.shape[0]
    mask_simple = jnp.tril(jnp.ones((context_length, context_length)))
    masked_simple = weights * mask_simple
    renorm = masked_simple / masked_simple.sum(-1, keepdims=True)
    print("Masked and renormalised weights:\n", np.asarray(renorm))
    masked = jnp.where(mask_simple.astype(bool), scores, -jnp.inf)  # -inf above the diagonal
    weights_inf = jax.nn.softmax(masked / k.shape[-1] ** 0.5, axis=-1)
    print("Same weights with -inf before the softmax:", bool(jnp.allclose(renorm, weights_inf, atol=1e-6)))

    section("3.5.2 Masking additional attention weights with dropout")
    k_drop, key = jax.random.split(key)
    keep = jax.random.bernoulli(k_drop, 0.5, (6, 6))
    print("Dropout (rate 0.5) on a matrix of ones, survivors scaled by 2:\n", np.asarray(keep * 2.0))

    section("3.5.3 A compact causal attention class")
    batch = jnp.stack([INPUTS, INPUTS])  # (2, 6, 3)
    print("batch.shape:", batch.shape)
    k_w, k_drop, key = jax.random.split(key, 3)
    ca = CausalAttention(d_out, context_length=batch.shape[1], dropout=0.0)
    params_ca = ca.init(k_w, batch)["params"]
    context_vecs, weights = ca.apply({"params": params_ca}, batch, return_weights=True)
    print("context_vecs.shape:", context_vecs.shape)  # (2, 6, 2)
    print("Causal weights (row sums", np.asarray(weights[0].sum(-1)), "):\n", np.asarray(weights[0]))
    ca_drop = CausalAttention(d_out, context_length=batch.shape[1], dropout=0.5)
    _, w_drop = ca_drop.apply(
        {"params": params_ca}, batch, deterministic=False, return_weights=True, rngs={"dropout": k_drop}
    )
    print("With dropout 0.5 in training mode:\n", np.asarray(w_drop[0]))

    section("3.6.1 Stacking multiple single-head attention layers")
    k_w, key = jax.random.split(key)
    mha_w = MultiHeadAttentionWrapper(d_out=2, context_length=6, dropout=0.0, num_heads=2)
    params_w = mha_w.init(k_w, batch)["params"]
    out = mha_w.apply({"params": params_w}, batch)
    print("Wrapper output:\n", np.asarray(out))
    print("context_vecs.shape:", out.shape)  # (2, 6, 4)

    section("3.6.2 Multi-head attention with weight splits")
    k_w, key = jax.random.split(key)
    mha = MultiHeadAttention(d_out=2, num_heads=2, context_length=6)
    params_mha = mha.init(k_w, batch)["params"]
    out, _ = mha.apply({"params": params_mha}, batch)
    print("MultiHeadAttention output:\n", np.asarray(out))
    print("context_vecs.shape:", out.shape)  # (2, 6, 2)

    # Exercise 3.3: a GPT-2-sized attention module, counted from shapes alone.
    gpt2_mha = MultiHeadAttention(d_out=768, num_heads=12, context_length=1024)
    x_spec = jax.ShapeDtypeStruct((1, 1024, 768), jnp.float32)
    shapes = jax.eval_shape(gpt2_mha.init, jax.random.key(0), x_spec)
    print(f"GPT-2-sized MultiHeadAttention (768 wide, 12 heads): {count_params(shapes):,} parameters")


if __name__ == "__main__":
    main()
