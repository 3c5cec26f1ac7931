"""Text generation: sampling strategies and the compiled prefill + decode loop."""
