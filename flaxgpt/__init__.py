"""flaxgpt: the GPT family from first principles in JAX/Flax linen.

The public API, grouped as the book's chapters go. Everything else lives in the submodules
(``flaxgpt.attention`` for the chapter-3 teaching modules, ``flaxgpt.sharding``, ...).
"""

__version__ = "0.1.0"

# Configuration.
from flaxgpt.config import GPT_CONFIG_124M, PRESETS, GPTConfig

# Chapter 2: text data.
from flaxgpt.tokenizer import (
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    gpt2_tokenizer,
    text_to_token_ids,
    token_ids_to_text,
)
from flaxgpt.data import DataLoader, GPTDataset, create_dataloader, load_text, train_val_split

# Chapters 3-4: attention and the model.
from flaxgpt.attention import MultiHeadAttention
from flaxgpt.layers import GELU, FeedForward, LayerNorm, TransformerBlock
from flaxgpt.model import (
    GPTModel,
    count_params,
    generate_text_simple,
    init_params,
    param_bytes,
    param_shapes,
)
from flaxgpt.kv_cache import KVCache, init_cache

# Generation.
from flaxgpt.generate import generate

# Chapter 5: pretraining.
from flaxgpt.losses import cross_entropy_loss, perplexity
from flaxgpt.optim import make_optimizer
from flaxgpt.train import TrainState, create_train_state, evaluate, fit, train_step
from flaxgpt.checkpoint import latest_checkpoint, load_model_from_checkpoint, restore_checkpoint, save_checkpoint

# GPT-2 weights.
from flaxgpt.weights import params_from_hf, params_to_hf
from flaxgpt.book_weights import params_from_book, params_to_book
from flaxgpt.pretrained import load_book, load_pretrained, save_book, save_pretrained

# Scale.
from flaxgpt.sharding import make_mesh, shard_batch, shard_params, shard_train_state

__all__ = [
    "__version__",
    # config
    "GPTConfig",
    "GPT_CONFIG_124M",
    "PRESETS",
    # ch. 2
    "SimpleTokenizerV1",
    "SimpleTokenizerV2",
    "build_vocab",
    "gpt2_tokenizer",
    "text_to_token_ids",
    "token_ids_to_text",
    "GPTDataset",
    "DataLoader",
    "create_dataloader",
    "train_val_split",
    "load_text",
    # ch. 3-4
    "MultiHeadAttention",
    "LayerNorm",
    "GELU",
    "FeedForward",
    "TransformerBlock",
    "GPTModel",
    "init_params",
    "param_shapes",
    "count_params",
    "param_bytes",
    "generate_text_simple",
    "KVCache",
    "init_cache",
    # generation
    "generate",
    # ch. 5
    "cross_entropy_loss",
    "perplexity",
    "make_optimizer",
    "TrainState",
    "create_train_state",
    "train_step",
    "evaluate",
    "fit",
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint",
    "load_model_from_checkpoint",
    # weights
    "params_from_hf",
    "params_to_hf",
    "params_from_book",
    "params_to_book",
    "load_pretrained",
    "save_pretrained",
    "load_book",
    "save_book",
    # scale
    "make_mesh",
    "shard_params",
    "shard_train_state",
    "shard_batch",
]
