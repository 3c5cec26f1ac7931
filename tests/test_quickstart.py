"""The README's Quickstart, run exactly as printed, offline and without GPT-2's BPE files (what a newcomer
on a fresh machine with PyPI only gets): every command works, and the model's sample is made of words of the
corpus. The commands are read from the README itself, so the test follows it."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart_commands() -> list[str]:
    """The `flaxgpt ...` commands of the README's Quickstart code blocks, in order (comments removed)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            line = line.split("&&")[-1].strip()  # "pip install ... && flaxgpt train": the part after the install
            if line.startswith("flaxgpt "):
                commands.append(line)
    return commands


def test_the_readme_quickstart_runs_offline_as_printed(tmp_path: Path) -> None:
    commands = quickstart_commands()
    assert commands[0] == "flaxgpt train" and any(c.startswith("flaxgpt generate") for c in commands)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLAXGPT_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TIKTOKEN_CACHE_DIR=str(tmp_path / "no-tiktoken-cache"),
               FLAXGPT_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    flaxgpt = [sys.executable, "-m", "flaxgpt"]
    outputs = []
    for command in commands:
        r = subprocess.run(flaxgpt + shlex.split(command)[1:], cwd=tmp_path, env=env, capture_output=True,
                           text=True, timeout=900)
        assert r.returncode == 0, f"{command}: {r.stderr[-2000:]}"
        outputs.append(r.stdout)
    train = outputs[0]
    assert train.count("BPE learned from the corpus") == 2  # said at the start and in the summary
    sample = train.split("\nsample (", 1)[1].split(":", 1)[1].split("\nwrote ", 1)[0]
    words = re.findall(r"[A-Za-z]{3,}", sample)
    assert len(words) >= 10, sample
    from pydoc_data.topics import topics

    vocabulary = set(re.findall(r"[A-Za-z]+", " ".join(topics.values())))
    real = [w for w in words if w in vocabulary]  # words of the corpus, not byte-level fragments
    assert len(real) >= 0.9 * len(words), (sample, set(words) - vocabulary)
    assert "tokenizer" in outputs[-1] and "bpe-" in outputs[-1]  # `flaxgpt info` names it
    assert (tmp_path / "runs" / "pydoc" / "samples.jsonl").is_file()  # the per-epoch samples are kept
