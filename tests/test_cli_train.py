"""``flaxgpt train``: bad input, outputs, exact resume through the CLI, SIGTERM and SIGKILL in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flaxgpt.cli import main
from flaxgpt.io.checkpoint import list_checkpoints, load_model_from_checkpoint
from flaxgpt.training.metrics import read_metrics

TINY = ["--emb-dim", "16", "--n-layers", "1", "--n-heads", "2", "--context-length", "8", "--batch-size", "2"]
PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


@pytest.fixture
def text_file(tmp_path, verdict_text) -> Path:
    path = tmp_path / "story.txt"
    path.write_text(verdict_text[:6000], encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _bpe(monkeypatch, gpt2_bpe_dir):
    monkeypatch.setenv("FLAXGPT_GPT2_BPE_DIR", str(gpt2_bpe_dir))


def _run_cli(argv, capsys):
    rc = main(["train", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize(
    "content, extra, message",
    [
        (None, [], "no such text file"),
        (b"", [], "empty"),
        (b"\xff\xfe\x00abc", [], "not valid UTF-8"),
        (b"only a few words here", [], "one window needs"),
        (b"word " * 400, ["--batch-size", "500"], "fewer than --batch-size 500"),
        (b"word " * 400, ["--n-heads", "3"], "divisible by n_heads"),
        (b"word " * 400, ["--batch-size", "0"], "--batch-size must be >= 1"),
        (b"word " * 400, ["--val-ratio", "0"], "--val-ratio must be in"),
        (b"word " * 400, ["--preset", "gpt5"], "unknown preset"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, content, extra, message):
    path = tmp_path / "in.txt"
    if content is not None:
        path.write_bytes(content)
    argv = ["--text", str(path), "--out", str(tmp_path / "run"), *TINY, *extra]  # later flags win
    rc, out, err = _run_cli(argv, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flaxgpt train: error:") and message in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_resume_without_run_is_an_error(tmp_path, capsys):
    rc, _, err = _run_cli(["--out", str(tmp_path / "none"), "--resume"], capsys)
    assert rc == 2 and "no such checkpoint or run directory" in err


def _losses(run: Path):
    return [(r["step"], r["train_loss"], r["val_loss"], r["tokens_seen"]) for r in read_metrics(run / "metrics.jsonl")]


def test_outputs_and_exact_resume(tmp_path, text_file, capsys):
    common = ["--text", str(text_file), *TINY, "--eval-freq", "2", "--eval-iter", "2", "--seed", "5"]
    straight = tmp_path / "straight"
    rc, out, _ = _run_cli([*common, "--out", str(straight), "--max-steps", "6"], capsys)
    assert rc == 0 and "sample (temperature" in out and "Every effort moves you" in out
    for name in ("metrics.jsonl", "loss.png", "config.json"):
        assert (straight / name).is_file(), name
    config = json.loads((straight / "config.json").read_text())
    assert config["model"]["emb_dim"] == 16 and config["train"]["stride"] is None
    assert [s for s, *_ in _losses(straight)] == [1, 3, 5, 6]

    resumed = tmp_path / "resumed"
    assert _run_cli([*common, "--out", str(resumed), "--max-steps", "3"], capsys)[0] == 0
    rc, out, _ = _run_cli(["--out", str(resumed), "--resume", "--max-steps", "6"], capsys)
    assert rc == 0 and "resuming" in out
    assert _losses(resumed) == _losses(straight)
    _, _, info = load_model_from_checkpoint(resumed)
    assert info["step"] == 6

    # a finished run is not overwritten by accident; data settings must match on resume
    rc, _, err = _run_cli([*common, "--out", str(straight), "--max-steps", "6"], capsys)
    assert rc == 2 and "--resume" in err
    rc, _, err = _run_cli(["--out", str(resumed), "--resume", "--batch-size", "4"], capsys)
    assert rc == 2 and "exact resume" in err

    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert f.suffix not in (".pkl", ".pickle") and f.read_bytes()[:2] not in PICKLE_MAGIC


def _spawn(argv, bpe_dir):
    env = dict(os.environ, FLAXGPT_GPT2_BPE_DIR=str(bpe_dir), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "flaxgpt", "train", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _newest_step(run: Path) -> int:
    ckpts = list_checkpoints(run)
    return int(ckpts[-1].name.split("_")[1]) if ckpts else -1


def _wait_for_checkpoint(proc, run: Path, after: int = -1, timeout: float = 240.0) -> None:
    """Waits until the run has a checkpoint of a step later than ``after``."""
    deadline = time.monotonic() + timeout
    while _newest_step(run) <= after:
        if proc.poll() is not None:
            pytest.fail(f"training exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("no checkpoint appeared in time")
        time.sleep(0.2)


def test_sigterm_then_sigkill_leave_loadable_checkpoints(tmp_path, text_file, gpt2_bpe_dir):
    run = tmp_path / "run"
    argv = ["--text", str(text_file), "--out", str(run), *TINY, "--checkpoint-every", "1",
            "--eval-freq", "100000", "--max-steps", "100000"]

    proc = _spawn(argv, gpt2_bpe_dir)
    _wait_for_checkpoint(proc, run)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "--resume" in out and "Traceback" not in err
    stopped_at = load_model_from_checkpoint(run)[2]["step"]

    proc = _spawn([*argv, "--resume"], gpt2_bpe_dir)
    _wait_for_checkpoint(proc, run, after=stopped_at + 1)  # the resumed run has written new ones
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: maybe mid-write
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    cfg, params, info = load_model_from_checkpoint(run)
    assert info["step"] > stopped_at and cfg.emb_dim == 16
    assert not Path(info["path"]).name.startswith(".tmp")
    assert all(p.name.startswith("step_") for p in list_checkpoints(run))


def test_auto_tokenizer_falls_back_to_bytes_offline_and_generate_uses_it(tmp_path, capsys, monkeypatch):
    """With no GPT-2 BPE files reachable, the default run still trains (on UTF-8 bytes, a 257-token model),
    records the tokenizer in its checkpoint, and `flaxgpt generate --checkpoint` decodes with it."""
    import tiktoken

    import flaxgpt.text.tokenizers as tokenizer_module

    monkeypatch.delenv("FLAXGPT_GPT2_BPE_DIR")

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    monkeypatch.setattr(tokenizer_module.tiktoken, "get_encoding", offline)
    path = tmp_path / "in.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    out_dir = tmp_path / "run"
    rc, out, err = _run_cli(
        ["--text", str(path), "--out", str(out_dir), *TINY, "--max-steps", "3", "--eval-freq", "2"], capsys
    )
    assert rc == 0, err
    cfg, _, info = load_model_from_checkpoint(out_dir)
    assert info["tokenizer"] == "bytes"
    assert cfg.vocab_size == 257
    assert json.loads((out_dir / "config.json").read_text())["tokenizer"] == "bytes"

    rc = main(["generate", "--checkpoint", str(out_dir), "--prompt", "The", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert printed.startswith("The")

    # an explicit --tokenizer gpt2 that cannot be loaded is a one-line error, not a fallback
    rc, out, err = _run_cli(
        ["--text", str(path), "--out", str(tmp_path / "run2"), *TINY, "--tokenizer", "gpt2"], capsys
    )
    assert rc == 2
    assert "GPT-2 tokenizer" in err and "--tokenizer bytes" in err
    assert len(err.strip().splitlines()) == 1
