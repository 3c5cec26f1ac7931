"""flaxgpt: the GPT family from first principles in JAX/Flax linen.

The public API, grouped in the order data flows (and the book's chapters go). Everything else lives in
the stage subpackages: ``flaxgpt.text``, ``flaxgpt.data``, ``flaxgpt.nn``, ``flaxgpt.book`` (the chapter-3/4
teaching variants), ``flaxgpt.generation``, ``flaxgpt.training``, ``flaxgpt.finetune``, ``flaxgpt.io``,
``flaxgpt.sharding``.
"""

# The groups below are ordered by stage, not alphabetically (ruff's import sorting is off for this file).

__version__ = "0.1.0"

# Configuration.
from flaxgpt.config import GPT_CONFIG_124M, PRESETS, GPTConfig

# Chapter 2: text and data.
from flaxgpt.text.tokenizers import (
    SimpleTokenizerV1,
    SimpleTokenizerV2,
    build_vocab,
    text_to_token_ids,
    token_ids_to_text,
)
from flaxgpt.text.bpe import gpt2_tokenizer
from flaxgpt.text.corpora import load_text
from flaxgpt.data.windows import DataLoader, GPTDataset, create_dataloader, train_val_split

# Chapters 3-4: attention and the model.
from flaxgpt.nn.attention import MultiHeadAttention
from flaxgpt.nn.layers import GELU, FeedForward, LayerNorm, TransformerBlock
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import count_params, init_params, param_bytes, param_shapes
from flaxgpt.nn.kv_cache import KVCache, init_cache
from flaxgpt.book.generate import generate_text_simple

# Generation.
from flaxgpt.generation.decode import generate

# Chapter 5: training (one loop for every task).
from flaxgpt.training.losses import cross_entropy_loss, perplexity
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.tasks import PretrainTask, Task
from flaxgpt.training.state import TrainState, create_train_state, make_train_step, train_step
from flaxgpt.training.loop import evaluate, fit
from flaxgpt.io.checkpoint import latest_checkpoint, load_model_from_checkpoint, restore_checkpoint, save_checkpoint

# Chapter 6: classification fine-tuning.
from flaxgpt.data.sms_spam import load_sms_spam
from flaxgpt.data.classification import ClassificationDataset, classification_loaders
from flaxgpt.finetune.classify import ClassificationTask, classify, to_classifier

# Chapter 7: instruction fine-tuning.
from flaxgpt.data.instructions import InstructionDataset, format_input, instruction_loaders, load_instruction_data
from flaxgpt.finetune.instruct import InstructionTask
from flaxgpt.generation.stream import generate_stream

# Appendix E: LoRA.
from flaxgpt.nn.lora import LoRA, init_lora, lora_apply, merge_lora
from flaxgpt.finetune.lora_train import lora_train_state
from flaxgpt.io.adapters import load_lora, save_lora

# Speed: int8 weight-only inference for memory-bound decoding.
from flaxgpt.nn.quant import Int8Params, int8_apply, quantize_int8
from flaxgpt.io.peft import save_peft

# GPT-2 weights.
from flaxgpt.io.hf import params_from_hf, params_to_hf
from flaxgpt.io.book import params_from_book, params_to_book
from flaxgpt.io.pretrained import load_book, load_pretrained, save_book, save_pretrained

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
    "Task",
    "PretrainTask",
    "TrainState",
    "create_train_state",
    "make_train_step",
    "train_step",
    "evaluate",
    "fit",
    "save_checkpoint",
    "restore_checkpoint",
    "latest_checkpoint",
    "load_model_from_checkpoint",
    # ch. 6
    "load_sms_spam",
    "ClassificationDataset",
    "classification_loaders",
    "to_classifier",
    "ClassificationTask",
    "classify",
    # ch. 7
    "load_instruction_data",
    "format_input",
    "InstructionDataset",
    "instruction_loaders",
    "InstructionTask",
    "generate_stream",
    # appendix E
    "Int8Params",
    "quantize_int8",
    "int8_apply",
    "LoRA",
    "init_lora",
    "lora_apply",
    "merge_lora",
    "lora_train_state",
    "save_lora",
    "load_lora",
    "save_peft",
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
