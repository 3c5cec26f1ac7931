"""Length buckets: the padded lengths that bound how many programs generation compiles."""

from __future__ import annotations

__all__ = ["prompt_bucket", "new_tokens_bucket"]

def prompt_bucket(length: int, context_length: int) -> int:
    """Padded prompt length: the smallest power of two >= ``length`` (at least 8), capped at
    ``context_length``."""
    return min(max(8, 1 << (length - 1).bit_length()), context_length)


def new_tokens_bucket(n: int, context_length: int) -> int:
    """Cache slots reserved for new tokens: the smallest of 8, 12, 16, 24, 32, 48, ... that is >= ``n``,
    capped at ``context_length``."""
    b = 8
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3  # 8 -> 12 -> 16 -> 24 -> 32 -> ...
    return min(b, context_length)
