"""Chapter 2, "Working with text data": tokenizers, the sliding-window loader, embeddings.

Run offline with the shared files:
    FLAXGPT_DATA_DIR=/path/with/the-verdict.txt FLAXGPT_GPT2_BPE_DIR=/path/with/gpt2-files \
        python examples/ch02_text_data.py
"""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxgpt.data.windows import create_dataloader
from flaxgpt.text.bpe import gpt2_tokenizer
from flaxgpt.text.corpora import load_text
from flaxgpt.text.tokenizers import SimpleTokenizerV1, SimpleTokenizerV2, build_vocab


def main() -> None:
    # 2.1-2.2: read the short story and split it into words and punctuation.
    raw_text = load_text("verdict")
    print(f"Total number of characters: {len(raw_text)}")  # 20479
    words = [w.strip() for w in re.split(r'([,.:;?_!"()\']|--|\s)', raw_text) if w.strip()]
    print(f"{len(words)} word tokens, first 30: {words[:30]}")

    # 2.3: a vocabulary and the first tokenizer.
    vocab = build_vocab(raw_text)
    print(f"Vocabulary size (with <|endoftext|> and <|unk|>): {len(vocab)}")  # 1132
    tokenizer_v1 = SimpleTokenizerV1(vocab)
    text = '"It\'s the last he painted, you know," Mrs. Gisburn said with pardonable pride.'
    ids = tokenizer_v1.encode(text)
    print(f"V1 ids: {ids}")
    print(f"V1 decoded: {tokenizer_v1.decode(ids)!r}")
    try:
        tokenizer_v1.encode("Hello, do you like tea?")
    except ValueError as e:
        print(f"V1 cannot encode unknown words: {e}")

    # 2.4: special context tokens.
    tokenizer_v2 = SimpleTokenizerV2(vocab)
    text = " <|endoftext|> ".join(
        ("Hello, do you like tea?", "In the sunlit terraces of the palace.")
    )
    ids = tokenizer_v2.encode(text)
    print(f"V2 ids: {ids}")
    print(f"V2 decoded: {tokenizer_v2.decode(ids)!r}")

    # 2.5: byte-pair encoding (GPT-2, via tiktoken).
    bpe = gpt2_tokenizer()
    text = (
        "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
        " of someunknownPlace."
    )
    ids = bpe.encode(text, allowed_special={"<|endoftext|>"})
    print(f"BPE ids: {ids}")
    print(f"BPE decoded: {bpe.decode(ids)!r}")
    print(f"'Akwirw ier' -> {[bpe.decode([i]) for i in bpe.encode('Akwirw ier')]}")
    print(f"the-verdict has {len(bpe.encode(raw_text))} GPT-2 tokens")  # 5145

    # 2.6: input-target pairs with a sliding window.
    loader = create_dataloader(raw_text, batch_size=8, max_length=4, stride=4, shuffle=False)
    inputs, targets = next(iter(loader))
    print(f"{len(loader.dataset)} windows, {len(loader)} batches per epoch")
    print(f"Inputs:\n{inputs}\nTargets:\n{targets}")

    # 2.7-2.8: token embeddings plus absolute position embeddings.
    vocab_size, output_dim, context_length = 50257, 256, 4
    token_embedding = nn.Embed(vocab_size, output_dim)
    pos_embedding = nn.Embed(context_length, output_dim)
    key_tok, key_pos = jax.random.split(jax.random.PRNGKey(123))
    tok_params = token_embedding.init(key_tok, jnp.zeros((1, context_length), jnp.int32))
    pos_params = pos_embedding.init(key_pos, jnp.arange(context_length))

    token_embeddings = token_embedding.apply(tok_params, jnp.asarray(inputs))  # (8, 4, 256)
    pos_embeddings = pos_embedding.apply(pos_params, jnp.arange(context_length))  # (4, 256)
    input_embeddings = token_embeddings + pos_embeddings  # (8, 4, 256)
    print(f"token embeddings {token_embeddings.shape}, position embeddings "
          f"{pos_embeddings.shape}, input embeddings {input_embeddings.shape}")


if __name__ == "__main__":
    main()
