"""Shared fixtures. Shared data files are found only through environment variables:
FLAXGPT_DATA_DIR (folder with the-verdict.txt) and FLAXGPT_GPT2_BPE_DIR (folder with GPT-2's
encoder.json and vocab.bpe); tests that need them skip when they are unset."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import tiktoken


def _env_dir(var: str, files: tuple[str, ...]) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"${var} is not set (a folder with {', '.join(files)})")
    folder = Path(value)
    missing = [name for name in files if not (folder / name).is_file()]
    if missing:
        pytest.skip(f"${var}={value} lacks {', '.join(missing)}")
    return folder


@pytest.fixture(scope="session")
def gpt2_bpe_dir() -> Path:
    """The folder in $FLAXGPT_GPT2_BPE_DIR holding encoder.json and vocab.bpe."""
    return _env_dir("FLAXGPT_GPT2_BPE_DIR", ("encoder.json", "vocab.bpe"))


@pytest.fixture(scope="session")
def verdict_text() -> str:
    """The book's short story, the-verdict.txt, from $FLAXGPT_DATA_DIR."""
    folder = _env_dir("FLAXGPT_DATA_DIR", ("the-verdict.txt",))
    with open(folder / "the-verdict.txt", encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="session")
def gpt2_tok(gpt2_bpe_dir: Path) -> tiktoken.Encoding:
    """The GPT-2 tiktoken encoding built from $FLAXGPT_GPT2_BPE_DIR."""
    from flaxgpt.text.bpe import gpt2_tokenizer

    return gpt2_tokenizer(gpt2_bpe_dir)


# The one tiny model of the suite: every test that needs "some small GPT" builds it from here, changing
# only the fields it is about (tiny_config(qkv_bias=True, tie_embeddings=True), ...).
TINY_FIELDS = dict(vocab_size=96, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0)


@pytest.fixture(scope="session")
def tiny_config():
    """A factory: ``tiny_config(**overrides)`` is the suite's tiny GPTConfig with those fields changed."""
    from flaxgpt.config import GPTConfig

    def make(**overrides):
        return GPTConfig(**{**TINY_FIELDS, **overrides})

    return make


@pytest.fixture(scope="session")
def tiny(tiny_config):
    """The model tests' config: the suite's tiny config with dropout on (the dropout and remat tests need it)."""
    return tiny_config(drop_rate=0.1)


@pytest.fixture(scope="session")
def tiny_params(tiny):
    """Parameters of ``tiny`` (key 0)."""
    import jax

    from flaxgpt.nn.params import init_params

    return init_params(tiny, jax.random.key(0))


@pytest.fixture(scope="session")
def ids(tiny):
    """(2, 10) ids shared by the model tests, so that their jitted forwards share compiles."""
    import jax
    import numpy as np

    return np.asarray(jax.random.randint(jax.random.key(1), (2, 10), 0, tiny.vocab_size), np.int32)


# --------------------------------------------------------------------------- the fine-tuning CLI tests' inputs


@pytest.fixture(scope="session")
def base_run(tmp_path_factory) -> Path:
    """A tiny byte-level `flaxgpt train` run to fine-tune from."""
    root = tmp_path_factory.mktemp("base")
    text = root / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    from flaxgpt.cli import main

    rc = main(["train", "--text", str(text), "--tokenizer", "bytes", "--emb-dim", "32", "--n-layers", "2",
               "--n-heads", "2", "--context-length", "32", "--batch-size", "4", "--max-steps", "2",
               "--out", str(root / "run")])
    assert rc == 0
    return root / "run"


@pytest.fixture(scope="session")
def data_csv(tmp_path_factory) -> Path:
    """80 random lowercase texts; label 1 when the text holds a 'z'."""
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for _ in range(80):
        t = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(4, 20)))
        rows.append(f"{t},{int('z' in t)}")
    path = tmp_path_factory.mktemp("data") / "d.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def instruct_json(tmp_path_factory) -> Path:
    """24 instruction records (20 / 2 / 2 after the book's 85/10/5 split), every third without input."""
    rng = np.random.default_rng(1)
    words = "red green blue cat dog sun moon tree".split()
    recs = [{"instruction": " ".join(rng.choice(words, 2)), "input": "" if i % 3 else str(rng.choice(words)),
             "output": " ".join(rng.choice(words, 3))} for i in range(24)]
    path = tmp_path_factory.mktemp("sft") / "d.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    return path


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drops JAX's compiled programs after each test module: the suite compiles thousands of small programs,
    and keeping them all grows one pytest process by gigabytes."""
    yield
    import jax

    jax.clear_caches()
