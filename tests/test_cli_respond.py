"""``flaxgpt respond`` on a tiny byte-level training run: the responses file equals the library's batched
responses and one-by-one greedy generation; the book's split and the errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flaxgpt.cli import main
from flaxgpt.data.instructions import format_input
from flaxgpt.finetune.respond import extract_response
from flaxgpt.generation.decode import generate
from flaxgpt.io.checkpoint import load_model_from_checkpoint
from flaxgpt.nn.model import GPTModel
from flaxgpt.text.tokenizers import get_tokenizer

RECORDS = [
    {"instruction": f"Repeat the number {i}.", "input": "" if i % 2 else f"number {i}", "output": f"{i}"}
    for i in range(20)
]


def train_tiny_run(folder: Path) -> Path:
    """A 2-step byte-level `flaxgpt train` run with a 256-token context (the prompts are ~150 bytes)."""
    text = folder / "text.txt"
    text.write_text("".join(format_input(r) + "\n\n### Response:\n" + r["output"] + "\n" for r in RECORDS) * 3)
    out = folder / "run"
    argv = ["train", "--text", str(text), "--tokenizer", "bytes", "--emb-dim", "32", "--n-layers", "2",
            "--n-heads", "2", "--context-length", "256", "--batch-size", "4", "--max-steps", "2",
            "--out", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return train_tiny_run(tmp_path_factory.mktemp("respond"))


def _one_by_one(run: Path, records: list[dict], max_new_tokens: int) -> list[str]:
    cfg, params, info = load_model_from_checkpoint(run)
    tok = get_tokenizer(info["tokenizer"])
    model, out = GPTModel(cfg), []
    for r in records:
        prompt = format_input(r)
        ids = np.asarray(tok.encode(prompt))
        gen = generate(model, params, ids, max_new_tokens=max_new_tokens, eos_id=tok.eot_token)  # (T + new,)
        out.append(extract_response(tok.decode([int(i) for i in gen]), prompt))
    return out


def test_respond_writes_the_books_file(run_dir, tmp_path, capsys):
    data = tmp_path / "records.json"
    data.write_text(json.dumps(RECORDS[:5]))
    argv = ["respond", "--checkpoint", str(run_dir), "--data", str(data), "--max-new-tokens", "16",
            "--batch-size", "2", "--show", "2"]
    assert main(argv) == 0
    path = run_dir / "instruction-data-with-response.json"  # the default --out
    written = json.loads(path.read_text())
    assert [{k: v for k, v in w.items() if k != "model_response"} for w in written] == RECORDS[:5]
    assert [w["model_response"] for w in written] == _one_by_one(run_dir, RECORDS[:5], 16)
    assert path.read_text() == json.dumps(written, indent=4)
    out = capsys.readouterr().out
    assert out.count("Model response:\n>> ") == 2 and "Correct response:\n>> 0" in out
    assert f"wrote 5 responses to {path}" in out


def test_respond_on_the_books_test_split(run_dir, tmp_path):
    source = tmp_path / "all.json"
    source.write_text(json.dumps(RECORDS))
    out = tmp_path / "answers.json"
    step = sorted((run_dir / "checkpoints").glob("step_*"))[-1]  # a checkpoint folder works too
    argv = ["respond", "--checkpoint", str(step), "--data", "test", "--source", str(source),
            "--out", str(out), "--max-new-tokens", "8", "--show", "0"]
    assert main(argv) == 0
    written = json.loads(out.read_text())
    assert [w["instruction"] for w in written] == [r["instruction"] for r in RECORDS[17:19]]  # int(20*.85)=17
    assert [w["model_response"] for w in written] == _one_by_one(run_dir, RECORDS[17:19], 8)


def test_respond_errors_are_one_line(run_dir, tmp_path, capsys):
    assert main(["respond", "--checkpoint", str(run_dir), "--data", str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert "neither test, val, train nor an existing file" in err and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x", "input": ""}]))
    assert main(["respond", "--checkpoint", str(run_dir), "--data", str(bad)]) == 2
    assert "output" in capsys.readouterr().err
    good = tmp_path / "good.json"
    good.write_text(json.dumps(RECORDS[:1]))
    assert main(["respond", "--checkpoint", str(tmp_path / "no-run"), "--data", str(good)]) == 2
    assert "no such checkpoint or run directory" in capsys.readouterr().err


def test_offline_download_failure_is_one_line(run_dir, tmp_path, monkeypatch, capsys) -> None:
    """No data folder, an empty cache, no network: `respond --data test` says so in one line (exit 2)."""
    import flaxgpt.data.instructions as instructions
    from flaxgpt.cli import main

    monkeypatch.delenv("FLAXGPT_DATA_DIR", raising=False)
    monkeypatch.setenv("FLAXGPT_CACHE_DIR", str(tmp_path / "cache"))

    def offline(url, dest, timeout=30.0):
        raise ConnectionError(f"could not download {url} to {dest}: no network")

    monkeypatch.setattr(instructions, "download_file", offline)
    rc = main(["respond", "--checkpoint", str(run_dir), "--data", "test"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no network" in err and "FLAXGPT_DATA_DIR" in err
