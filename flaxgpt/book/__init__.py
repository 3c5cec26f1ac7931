"""The book's teaching variants (chapters 3-4), kept apart from the production path in ``flaxgpt.nn``."""
