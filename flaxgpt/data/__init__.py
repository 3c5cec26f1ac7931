"""Batches: pretraining windows (later: classification and instruction batches)."""
