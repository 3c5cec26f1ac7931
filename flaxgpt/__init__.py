"""flaxgpt: the GPT family from first principles in JAX/Flax linen.

The public API, grouped as the book's chapters go. Everything else lives in the submodules
(``flaxgpt.nn.attention`` for the chapter-3 teaching modules, ``flaxgpt.sharding``, ...).
"""

__version__ = "0.1.0"

# Configuration.
from flaxgpt.book.generate import generate_text_simple
from flaxgpt.config import GPT_CONFIG_124M, PRESETS, GPTConfig
from flaxgpt.data.windows import DataLoader, GPTDataset, create_dataloader, train_val_split

# Generation.
from flaxgpt.generation.decode import generate
from flaxgpt.io.book import params_from_book, params_to_book
from flaxgpt.io.checkpoint import latest_checkpoint, load_model_from_checkpoint, restore_checkpoint, save_checkpoint

# GPT-2 weights.
from flaxgpt.io.hf import params_from_hf, params_to_hf
from flaxgpt.io.pretrained import load_book, load_pretrained, save_book, save_pretrained

# Chapters 3-4: attention and the model.
from flaxgpt.nn.attention import MultiHeadAttention
from flaxgpt.nn.kv_cache import KVCache, init_cache
from flaxgpt.nn.layers import GELU, FeedForward, LayerNorm, TransformerBlock
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import count_params, init_params, param_bytes, param_shapes

# Scale.
from flaxgpt.sharding import make_mesh, shard_batch, shard_params, shard_train_state
from flaxgpt.text.bpe import gpt2_tokenizer
from flaxgpt.text.corpora import load_text

# Chapter 2: text data.
from flaxgpt.text.tokenizers import (
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    text_to_token_ids,
    token_ids_to_text,
)
from flaxgpt.training.loop import evaluate, fit

# Chapter 5: pretraining.
from flaxgpt.training.losses import cross_entropy_loss, perplexity
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.state import TrainState, create_train_state, train_step

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
