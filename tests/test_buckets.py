"""flaxgpt.generation.buckets: the prompt and new-token length buckets."""

from __future__ import annotations

from flaxgpt.generation.buckets import new_tokens_bucket, prompt_bucket


def test_buckets():
    assert [prompt_bucket(t, 1024) for t in (1, 8, 9, 100, 1000)] == [8, 8, 16, 128, 1024]
    assert prompt_bucket(50, 40) == 40
    assert [new_tokens_bucket(n, 1024) for n in (1, 8, 9, 13, 17, 25, 33, 49, 100)] == [
        8, 8, 12, 16, 24, 32, 48, 64, 128,
    ]
    assert new_tokens_bucket(500, 300) == 300


def test_every_length_fits_its_bucket_and_buckets_are_few():
    for ctx in (16, 100, 1024):
        prompts = [prompt_bucket(t, ctx) for t in range(1, ctx + 1)]
        assert all(t <= b <= ctx for t, b in zip(range(1, ctx + 1), prompts))
        assert prompts == sorted(prompts)  # monotone: a longer prompt never gets a smaller bucket
        news = [new_tokens_bucket(n, ctx) for n in range(1, ctx + 1)]
        assert all(n <= b <= ctx for n, b in zip(range(1, ctx + 1), news)) and news == sorted(news)
    # 1024 lengths share 8 prompt buckets (8 ... 1024) and 15 new-token buckets (8, 12, 16, ..., 1024)
    assert len({prompt_bucket(t, 1024) for t in range(1, 1025)}) == 8
    assert len({new_tokens_bucket(n, 1024) for n in range(1, 1025)}) == 15


def test_new_token_buckets_waste_at_most_half():
    # padding bounds the wasted decode steps: a bucket is < 1.5x the count it serves (beyond the minimum 8)
    for n in range(9, 1025):
        assert new_tokens_bucket(n, 4096) < 1.5 * n
