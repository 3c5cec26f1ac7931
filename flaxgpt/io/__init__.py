"""Files in and out: atomic writes and hashes, safetensors, weight mapping tables, Hugging Face, the book's
names, the hub, and training checkpoints."""
