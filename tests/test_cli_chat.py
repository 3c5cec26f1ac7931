"""``flaxgpt chat``: stdin lines in, streamed replies out, equal to the non-streamed generate's text; the
loop ends on EOF, an empty line or "exit"; the header is stripped from the stream."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from test_cli_respond import train_tiny_run

from flaxgpt.cli import main
from flaxgpt.cli.chat import HeaderStripper, strip_response_header
from flaxgpt.data.instructions import format_input
from flaxgpt.generation.decode import generate
from flaxgpt.io.checkpoint import load_model_from_checkpoint
from flaxgpt.nn.model import GPTModel
from flaxgpt.text.tokenizers import get_tokenizer


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("chat"))


class _Recorder(io.StringIO):
    """A stdout that keeps each write, to see the reply arrive in pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def _replies(run: Path, messages: list[str], max_new_tokens: int, **kw) -> str:
    """The non-streamed reference: generate each prompt, strip the header, one line per reply."""
    cfg, params, info = load_model_from_checkpoint(run)
    tok = get_tokenizer(info["tokenizer"])
    seed, out = kw.pop("seed", 0), []
    for turn, m in enumerate(messages):
        ids = np.asarray(tok.encode(format_input({"instruction": m, "input": ""})))
        key = jax.random.fold_in(jax.random.key(seed), turn)
        gen = generate(GPTModel(cfg), params, ids, max_new_tokens=max_new_tokens, eos_id=tok.eot_token,
                       key=key, **kw)  # (T + new,)
        out.append(strip_response_header(tok.decode([int(i) for i in np.asarray(gen)[len(ids) :]])) + "\n")
    return "".join(out)


def _chat(monkeypatch, run: Path, stdin: str, *args: str) -> _Recorder:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    recorder = _Recorder()
    monkeypatch.setattr(sys, "stdout", recorder)
    assert main(["chat", "--checkpoint", str(run), *args]) == 0
    return recorder


def test_chat_streams_the_generated_replies_and_ends_on_eof(run_dir, monkeypatch):
    messages = ["Repeat the number 3.", "Name a color."]
    out = _chat(monkeypatch, run_dir, "".join(m + "\n" for m in messages), "--max-new-tokens", "24")
    assert out.getvalue() == _replies(run_dir, messages, 24)
    first = out.getvalue().split("\n")[0]
    assert len(first) > 2
    assert len([w for w in out.writes if w]) > 3  # streamed in pieces, not printed at the end


def test_chat_sampling_uses_the_seed_and_exit_ends(run_dir, monkeypatch):
    stdin = "Name a color.\nexit\nNever answered.\n"
    args = ("--max-new-tokens", "16", "--temperature", "1.5", "--top-k", "50", "--seed", "7")
    out = _chat(monkeypatch, run_dir, stdin, *args).getvalue()
    assert out == _replies(run_dir, ["Name a color."], 16, temperature=1.5, top_k=50, seed=7)
    assert out != _replies(run_dir, ["Name a color."], 16)  # it did sample
    assert _chat(monkeypatch, run_dir, "\nNever answered.\n").getvalue() == ""  # an empty line ends


def test_chat_in_a_subprocess_ends_on_eof(run_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-m", "flaxgpt", "chat", "--checkpoint", str(run_dir), "--max-new-tokens", "12"],
        input="Name a color.\n", capture_output=True, text=True, timeout=300, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == _replies(run_dir, ["Name a color."], 12)


@pytest.mark.parametrize(
    "text",
    ["\n\n### Response:\n  Blue is\n a color.\n", "### Response:Blue", "  ### Resp", "Blue ### Response:",
     "\n\n### Response:\n\n", "", "#", "### Response: ### Response: x"],
)
def test_header_stripper_matches_the_non_streamed_strip(text):
    expected = strip_response_header(text)
    for cut in range(len(text) + 1):  # two pieces at every cut, and one character at a time
        for pieces in ([text[:cut], text[cut:]], list(text)):
            s = HeaderStripper()
            assert "".join(s.feed(p) for p in pieces) + s.flush() == expected, (pieces, expected)
    assert strip_response_header("\n\n### Response:\n  Blue is\n a color.\n") == "Blue is\n a color.\n"
