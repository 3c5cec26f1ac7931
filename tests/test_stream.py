"""flaxgpt.generation.stream: tokens streamed out of the compiled decode equal generate's, arrive while
the program runs, stop at EOS and on close, and reuse one compiled program per bucket."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_decode import count_compilations

from flaxgpt.generation.decode import generate
from flaxgpt.generation.stream import generate_stream, stream_text
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.text.tokenizers import ByteTokenizer

PROMPT = [5, 17, 42, 9, 3]


@pytest.fixture(scope="module")
def model_params(tiny_config):
    cfg = tiny_config(context_length=64)
    return GPTModel(cfg), init_params(cfg, jax.random.key(0))


def _new_tokens(model, params, prompt, **kw) -> list[int]:
    out = generate(model, params, np.asarray(prompt), **kw)  # (T + new,)
    return [int(t) for t in np.asarray(out)[len(prompt) :]]


@pytest.mark.parametrize(
    "kw",
    [
        dict(max_new_tokens=12),
        dict(max_new_tokens=20, temperature=1.3, top_k=20, key=jax.random.key(3)),
        dict(max_new_tokens=9, temperature=0.8, top_p=0.9, key=jax.random.key(4)),
    ],
    ids=["greedy", "top-k", "top-p"],
)
def test_stream_equals_generate(model_params, kw):
    model, params = model_params
    ref = _new_tokens(model, params, PROMPT, **kw)
    assert len(ref) == kw["max_new_tokens"]
    streamed = list(generate_stream(model, params, PROMPT, **kw))
    assert streamed == ref


def test_sampled_stream_depends_on_the_key(model_params):
    model, params = model_params
    kw = dict(max_new_tokens=16, temperature=1.5)
    a = list(generate_stream(model, params, PROMPT, key=jax.random.key(1), **kw))
    assert a == list(generate_stream(model, params, PROMPT, key=jax.random.key(1), **kw))
    assert a != list(generate_stream(model, params, PROMPT, key=jax.random.key(2), **kw))


def test_stream_stops_before_eos(model_params):
    model, params = model_params
    free = _new_tokens(model, params, PROMPT, max_new_tokens=16, temperature=2.0, key=jax.random.key(7))
    cut = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # first new token seen at step i
    eos = free[cut]
    kw = dict(max_new_tokens=16, temperature=2.0, key=jax.random.key(7), eos_id=eos)
    stream = generate_stream(model, params, PROMPT, **kw)
    assert list(stream) == free[:cut] == _new_tokens(model, params, PROMPT, **kw)
    assert stream.finished.is_set()
    assert list(stream) == []  # exhausted


def test_first_token_arrives_while_the_program_still_runs(model_params):
    """With buffer=1 the compiled loop cannot run more than one token ahead of the reader, so when the
    first token is read the program must still be running (no timing involved)."""
    model, params = model_params
    ref = _new_tokens(model, params, PROMPT, max_new_tokens=10)
    stream = generate_stream(model, params, PROMPT, 10, buffer=1)
    got = [next(stream)]
    assert not stream.finished.is_set()  # later tokens are still pending inside the compiled loop
    got += list(stream)
    assert stream.finished.is_set()
    assert got == ref


def test_close_stops_the_compiled_loop_early(model_params):
    model, params = model_params
    with generate_stream(model, params, PROMPT, 40, buffer=1) as stream:
        first = [next(stream), next(stream)]
    assert stream.finished.is_set()  # close() returned only after the program did
    assert first == _new_tokens(model, params, PROMPT, max_new_tokens=2)
    assert list(stream) == []


def test_no_recompile_within_a_bucket(tiny_config):
    cfg = tiny_config(context_length=64, vocab_size=91)  # a config no other test compiles
    model, params = GPTModel(cfg), init_params(cfg, jax.random.key(1))
    with count_compilations() as first:
        list(generate_stream(model, params, [1, 2, 3, 4, 5], 9))
    assert first["compile"] >= 1
    calls = [
        dict(prompt_ids=[7, 8, 9, 10, 11, 12, 13], max_new_tokens=11),
        dict(prompt_ids=[7, 8], max_new_tokens=12, temperature=0.7, top_k=5, key=jax.random.key(5)),
        dict(prompt_ids=np.arange(1, 9), max_new_tokens=10, eos_id=3, buffer=2),
    ]
    for kw in calls:
        with count_compilations() as again:
            list(generate_stream(model, params, **kw))
        assert again == {"trace": 0, "compile": 0}, kw
    with count_compilations() as other_bucket:  # the counter does see a new prompt bucket
        list(generate_stream(model, params, np.arange(1, 10), 9))
    assert other_bucket["compile"] >= 1


def test_bad_arguments_raise_before_running(model_params):
    model, params = model_params
    with pytest.raises(ValueError, match="1-D"):
        generate_stream(model, params, [[1, 2]], 4)
    with pytest.raises(ValueError, match="context_length"):
        generate_stream(model, params, PROMPT, 64)
    with pytest.raises(ValueError, match="PRNG key"):
        generate_stream(model, params, PROMPT, 4, temperature=1.0)
    with pytest.raises(ValueError, match="buffer"):
        generate_stream(model, params, PROMPT, 4, buffer=0)
    assert list(generate_stream(model, params, PROMPT, 0)) == []


def test_stream_text_never_splits_a_character():
    tok = ByteTokenizer()
    ids = tok.encode("héllo → wörld")  # multi-byte characters cut between tokens
    pieces = list(stream_text(iter(ids), tok))
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5  # it streams, not one piece at the end
    assert list(stream_text(iter([0xC3]), tok)) == ["\ufffd"]  # a cut character at the very end is flushed


def test_dropping_an_unread_stream_stops_the_program(model_params):
    """A stream dropped after one token (no close()) is collected and its program stops: nothing keeps it."""
    import gc

    from flaxgpt.generation import stream as stream_module

    model, params = model_params
    s = generate_stream(model, params, np.asarray([1, 2, 3]), 40, buffer=1)
    next(s)
    finished = s.finished
    del s
    gc.collect()
    assert finished.wait(timeout=30), "the dropped stream's program did not stop"
    assert not stream_module._CHANNELS  # nothing left registered
