"""flaxgpt.generation.decode: KV-cache generation in one compiled while loop, checked against the book's
loop, the full forward pass and Hugging Face's GPT-2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax
import numpy as np
import pytest

from flaxgpt.book.generate import generate_text_simple
from flaxgpt.config import GPTConfig
from flaxgpt.generation.decode import decode_step, generate, left_pad
from flaxgpt.nn.kv_cache import init_cache
from flaxgpt.nn.model import GPTModel, forward
from flaxgpt.nn.params import convert_layout, init_params

# A parametrize-level constant: the bad-input cases name its vocabulary (97) and context (64).
CFG = GPTConfig(vocab_size=97, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


RAGGED = [[5, 17, 42, 9, 3], [11, 2], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.fixture(scope="module")
def model() -> GPTModel:
    return GPTModel(CFG)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@contextlib.contextmanager
def count_compilations() -> Iterator[dict[str, int]]:
    """Counts JAX traces and XLA backend compilations inside the block (via ``jax.monitoring``)."""
    counts = {"trace": 0, "compile": 0}
    names = {
        "/jax/core/compile/jaxpr_trace_duration": "trace",
        "/jax/core/compile/backend_compile_duration": "compile",
    }

    def listener(event: str, duration: float, **kwargs) -> None:
        if event in names:
            counts[names[event]] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def _book(model, params, prompt, n):
    """The book's no-cache greedy loop on one prompt."""
    return np.asarray(generate_text_simple(model, params, np.asarray([prompt]), n, CFG.context_length))[0]


def test_left_pad():
    idx, offset = left_pad([np.array([1, 2, 3]), np.array([4])], 64)
    np.testing.assert_array_equal(offset, [5, 7])
    np.testing.assert_array_equal(idx[:, -3:], [[1, 2, 3], [0, 0, 4]])
    assert idx.shape == (2, 8)


def test_greedy_matches_book_loop_for_a_batch(model, params):
    prompt = np.array([[5, 17, 42, 9], [11, 2, 60, 33]])
    out = generate(model, params, prompt, max_new_tokens=12)
    ref = generate_text_simple(model, params, prompt, 12, CFG.context_length)
    assert out.shape == (2, 16)
    np.testing.assert_array_equal(out, ref)


def test_greedy_matches_book_loop_for_ragged_prompts(model, params):
    out = generate(model, params, RAGGED, max_new_tokens=12)
    assert isinstance(out, list) and len(out) == len(RAGGED)
    for prompt, row in zip(RAGGED, out):
        assert row.ndim == 1 and row.shape == (len(prompt) + 12,)
        np.testing.assert_array_equal(row, _book(model, params, prompt, 12))
        np.testing.assert_array_equal(row, generate(model, params, prompt, max_new_tokens=12))


def test_one_d_prompt_returns_one_d(model, params):
    out = generate(model, params, np.array([3, 4, 5]), max_new_tokens=10)
    assert out.shape == (13,)
    np.testing.assert_array_equal(out[:3], [3, 4, 5])
    np.testing.assert_array_equal(generate(model, params, [3, 4, 5], max_new_tokens=0), [3, 4, 5])


def test_scanned_layout_gives_the_same_tokens(model, params):
    cfg = CFG.replace(scan_layers=True)
    out = generate(GPTModel(cfg), convert_layout(params, cfg), RAGGED[:2], max_new_tokens=8)
    for a, b in zip(out, generate(model, params, RAGGED[:2], max_new_tokens=8)):
        np.testing.assert_array_equal(a, b)


def test_cached_logits_match_full_forward_at_every_position(model, params):
    """Prefill of a left-padded ragged batch, then one cached step per token (teacher forcing)."""
    seqs = [np.array(p + list(range(20, 30))) for p in RAGGED]  # prompt + 10 forced tokens
    prompts = [s[: len(p)] for s, p in zip(seqs, RAGGED)]
    idx, offset = left_pad(prompts, CFG.context_length)  # (B, Tb)
    tb = idx.shape[1]
    cache = init_cache(CFG, len(seqs), tb + 10, offset)
    logits, cache = jax.jit(lambda p, i, c: model.apply({"params": p}, i, cache=c))(params, idx, cache)
    step = jax.jit(lambda p, t, c: decode_step(model, p, t, c))
    steps = []
    for j in range(9):
        forced = np.array([s[len(p) + j] for s, p in zip(seqs, RAGGED)], np.int32)  # (B,)
        out, cache = step(params, forced, cache)  # (B, V)
        steps.append(out)
    steps = np.stack(steps, axis=1)  # (B, 9, V)
    for b, (s, p) in enumerate(zip(seqs, RAGGED)):
        full = np.asarray(forward(model, params, s[None]))[0]  # (T, V)
        np.testing.assert_allclose(logits[b, tb - len(p) :], full[: len(p)], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(steps[b], full[len(p) : len(p) + 9], atol=1e-5, rtol=1e-5)


def test_top_k_1_equals_greedy(model, params):
    greedy = generate(model, params, RAGGED, max_new_tokens=10)
    sampled = generate(model, params, RAGGED, max_new_tokens=10, temperature=1.3, top_k=1, key=jax.random.key(3))
    for a, b in zip(greedy, sampled):
        np.testing.assert_array_equal(a, b)


def test_same_key_same_output_other_key_other_output(model, params):
    kw = dict(max_new_tokens=12, temperature=1.5, top_p=0.95)
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    a = generate(model, params, prompt, key=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a, generate(model, params, prompt, key=jax.random.key(1), **kw))
    np.testing.assert_array_equal(a, generate(model, params, prompt, key=jax.random.PRNGKey(1), **kw))
    assert not np.array_equal(a, generate(model, params, prompt, key=jax.random.key(2), **kw))
    assert not np.array_equal(a, generate(model, params, prompt, max_new_tokens=12))  # not greedy


def _pick_eos(rows: np.ndarray) -> int:
    """A token that row 0 draws early and the other rows draw later or never."""
    for tok in rows[0]:
        firsts = [np.argmax(r == tok) if np.any(r == tok) else len(r) for r in rows]
        if firsts[0] < min(firsts[1:]) and firsts[0] > 0:
            return int(tok)
    pytest.fail(f"no usable EOS token in {rows}")


def test_eos_stops_each_row_on_its_own(model, params):
    prompt = np.array([[5, 17, 42, 9], [11, 2, 60, 33]])
    n = 12
    free = np.asarray(generate(model, params, prompt, max_new_tokens=n))[:, 4:]  # (B, n)
    eos = _pick_eos(free)
    expected = free.copy()
    for row in expected:
        if np.any(row == eos):
            row[np.argmax(row == eos) :] = eos
    out = generate(model, params, prompt, max_new_tokens=n, eos_id=eos)
    assert out.shape == (2, 4 + n)
    np.testing.assert_array_equal(out[:, 4:], expected)
    rows = generate(model, params, [list(p) for p in prompt], max_new_tokens=n, eos_id=eos)
    for p, row, gen in zip(prompt, rows, free):
        cut = np.argmax(gen == eos) if np.any(gen == eos) else n
        np.testing.assert_array_equal(row, np.concatenate([p, gen[:cut]]))  # EOS not included
    assert len(rows[0]) < 4 + n


def test_eos_in_every_row_ends_early_and_keeps_shape(model, params):
    prompt = np.array([[5, 17, 42, 9], [5, 17, 42, 9]])
    first = int(generate(model, params, prompt, max_new_tokens=10)[0, 4])
    out = generate(model, params, prompt, max_new_tokens=10, eos_id=first)
    np.testing.assert_array_equal(out[:, 4:], np.full((2, 10), first))
    assert [len(r) for r in generate(model, params, [[5, 17, 42, 9]], max_new_tokens=10, eos_id=first)] == [4]


def test_one_compilation_per_bucket():
    """A second call with another prompt length in the same bucket, another max_new_tokens in the same
    bucket and other sampling settings must not trace or compile anything."""
    cfg = CFG.replace(vocab_size=89)  # a config no other test uses, so the first call must compile
    model, params = GPTModel(cfg), init_params(cfg, jax.random.key(1))
    key = jax.random.key(5)
    with count_compilations() as first:
        generate(model, params, np.array([[1, 2, 3, 4, 5]]), max_new_tokens=9)
    assert first["compile"] >= 1 and first["trace"] >= 1
    calls = [
        dict(prompt=np.array([[7, 8, 9, 10, 11, 12, 13]]), max_new_tokens=11),
        dict(prompt=np.array([[7, 8]]), max_new_tokens=12, temperature=0.7, top_k=5, key=key),
        dict(prompt=[[3, 4, 5, 6, 7, 8, 9, 10]], max_new_tokens=10, temperature=1.2, top_p=0.5, key=key),
        dict(prompt=[1, 2, 3, 4, 5, 6], max_new_tokens=12, top_k=3, top_p=0.9, temperature=0.1, eos_id=7, key=key),
    ]
    for kwargs in calls:
        prompt = kwargs.pop("prompt")
        with count_compilations() as again:
            generate(model, params, prompt, **kwargs)
        assert again == {"trace": 0, "compile": 0}, kwargs
    with count_compilations() as other_bucket:  # the counter does see a new bucket
        generate(model, params, np.arange(1, 10)[None], max_new_tokens=9)
    assert other_bucket["compile"] >= 1


@pytest.mark.parametrize(
    "prompt, kwargs, match",
    [
        ([], {}, "empty"),
        (np.zeros((2, 0), np.int32), {}, "empty"),
        ([[1, 2], []], {}, "prompt 1"),
        ([1, 97], {}, "97"),
        ([[1, 2], [-1]], {}, "-1"),
        ([1.5, 2.0], {}, "integers"),
        (np.zeros((1, 2, 3), np.int32), {}, "shape"),
        ([1, 2], dict(temperature=-1.0), "temperature"),
        ([1, 2], dict(temperature=1.0, top_k=0, key=jax.random.key(0)), "top_k"),
        ([1, 2], dict(temperature=1.0, top_p=0.0, key=jax.random.key(0)), "top_p"),
        ([1, 2], dict(temperature=1.0, top_p=1.01, key=jax.random.key(0)), "top_p"),
        ([1, 2], dict(max_new_tokens=-1), "max_new_tokens"),
        ([1, 2], dict(max_new_tokens=2.0), "max_new_tokens"),
        ([1, 2], dict(temperature=0.8), "key"),
        ([1, 2], dict(temperature=0.8, key=np.zeros(3, np.uint32)), "key"),
        ([1, 2], dict(eos_id=97), "eos_id"),
        ([1] * 60, dict(max_new_tokens=5), "context_length 64"),
    ],
)
def test_bad_input_raises_before_compute(model, params, prompt, kwargs, match):
    kwargs = {"max_new_tokens": 3, **kwargs}
    with count_compilations() as counts, pytest.raises(ValueError, match=match):
        generate(model, params, prompt, **kwargs)
    assert counts == {"trace": 0, "compile": 0}


def test_prompt_plus_new_tokens_may_fill_the_context(model, params):
    out = generate(model, params, [1] * 60, max_new_tokens=4)
    assert out.shape == (64,)


def test_greedy_matches_hugging_face_generate():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from flaxgpt.io.hf import params_from_hf

    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=100, n_positions=64,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    with torch.no_grad():  # wider than GPT-2's N(0, 0.02) init, so greedy does not just repeat a token
        for name, p in hf.named_parameters():
            if ".ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3)
    cfg = GPTConfig(
        vocab_size=100, context_length=64, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0,
        qkv_bias=True, tie_embeddings=True,
    )
    params = params_from_hf({k: v.numpy() for k, v in hf.state_dict().items()}, cfg)
    prompts = [[5, 17, 42, 9, 3], [11, 2], [7, 7, 7, 1]]
    n = 20
    ours = generate(GPTModel(cfg), params, prompts, max_new_tokens=n)

    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        theirs = hf.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0
        ).numpy()
    for row, ref, p in zip(ours, theirs, prompts):
        np.testing.assert_array_equal(row, ref[width - len(p) :])
    assert len({tuple(np.asarray(r[-n:])) for r in ours}) == len(prompts)  # not a degenerate model
