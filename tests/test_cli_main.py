"""Tests for the ``flaxgpt`` entry point (flaxgpt/cli/__init__.py) and the CLI's rough edges a newcomer meets:
a bare command, help text, a closed pipe, out of memory, a learned-tokenizer run exported to Hugging Face,
cumulative time and saved samples across a resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from flaxgpt.cli import _oom_line, main, plain


def test_bare_flaxgpt_prints_help_and_exits_2(capsys) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage: flaxgpt" in err and "train" in err


def test_help_text_has_no_rest_markup(capsys) -> None:
    assert plain("uses ``OUT/x`` and :func:`flaxgpt.fit`") == "uses OUT/x and flaxgpt.fit"
    for command in (["train"], ["finetune", "classify"]):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert "``" not in capsys.readouterr().out


def test_out_of_memory_is_one_line_with_what_to_shrink() -> None:
    line = _oom_line("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 102954131456 bytes.")
    assert "95.9 GiB" in line and "--batch-size" in line and "--context-length" in line and "\n" not in line


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("learned")
    (root / "t.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    argv = ["train", "--text", str(root / "t.txt"), "--tokenizer", "learned", "--emb-dim", "32", "--n-layers", "1",
            "--n-heads", "2", "--context-length", "16", "--batch-size", "4", "--max-steps", "4", "--eval-freq", "2",
            "--epochs", "2", "--checkpoint-every", "2", "--out", str(root / "run")]
    assert main(argv) == 0
    return root / "run"


def test_a_learned_tokenizer_run_is_not_exported_as_gpt2(learned_run: Path, tmp_path: Path, capsys) -> None:
    capsys.readouterr()
    assert main(["convert", str(learned_run), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "not GPT-2's" in err and "--to book" in err and not (tmp_path / "hf").exists()
    assert main(["info", str(learned_run)]) == 0
    assert "BPE learned from the run's corpus" in capsys.readouterr().out


def test_time_is_cumulative_and_samples_are_kept_across_a_resume(learned_run: Path, capsys) -> None:
    first = [json.loads(line) for line in (learned_run / "metrics.jsonl").read_text().splitlines()]
    # resumed with the same --tokenizer learned as the run was started with: the run's learned tokenizer
    argv = ["train", "--out", str(learned_run), "--resume", "--max-steps", "8", "--tokenizer", "learned"]
    assert main(argv) == 0
    records = [json.loads(line) for line in (learned_run / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in records if r["step"] > first[-1]["step"]]
    assert later and all(r["time_s"] > first[-1]["time_s"] for r in later)  # goes on, does not restart at 0
    samples = [json.loads(line) for line in (learned_run / "samples.jsonl").read_text().splitlines()]
    assert samples and all({"epoch", "step", "text"} <= set(s) for s in samples)


def test_a_closed_pipe_ends_quietly(learned_run: Path) -> None:
    r = subprocess.run(f"{sys.executable} -m flaxgpt info {learned_run} | head -1", shell=True, capture_output=True,
                       text=True, timeout=120)
    assert r.stdout.startswith("format") and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr
