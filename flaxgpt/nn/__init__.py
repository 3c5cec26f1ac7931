"""Neural-network modules: initializers, attention, layers, the KV cache, the GPT model and its parameters."""
