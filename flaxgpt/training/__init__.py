"""Training: losses, optimizer, train state and step, tasks, the one training loop and its run directory."""
