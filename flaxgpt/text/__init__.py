"""Text: tokenizers (the book's regex ones, GPT-2 BPE, bytes) and corpora with their checked downloads."""
