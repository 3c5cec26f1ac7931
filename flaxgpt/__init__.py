"""flaxgpt: the GPT family from first principles in JAX/Flax linen."""

__version__ = "0.1.0"
