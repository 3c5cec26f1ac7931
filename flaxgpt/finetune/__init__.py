"""Fine-tuning tasks that plug into the one training loop: trainable-parameter selection, and the
chapter-6 classifier."""
