"""Tests for ``flaxgpt score`` (flaxgpt/cli/score.py) against the stub Ollama server of test_score.py:
the book's summary lines, ``--out``, the settings reaching the request, one-line errors with exit 2."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from test_score import ENTRIES, OllamaStub, book_replies, closed_port_url

from flaxgpt.cli import main
from flaxgpt.finetune.score import judge_prompt


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def responses(tmp_path: Path) -> Path:
    path = tmp_path / "instruction-data-with-response.json"
    path.write_text(json.dumps(ENTRIES, indent=4), encoding="utf-8")
    return path


def test_score_prints_the_books_lines_and_writes_out(responses: Path, tmp_path: Path, capsys, caplog) -> None:
    out = tmp_path / "scores.json"
    with caplog.at_level(logging.WARNING),  OllamaStub(book_replies()).running() as stub:
        rc, text, err = _run(capsys, "score", str(responses), "--url", stub.url, "--out", str(out))
    assert rc == 0, err
    lines = text.splitlines()
    assert lines[:2] == ["Number of scores: 2 of 3", "Average score: 92.50"]
    assert "Could not convert score: eighty" in caplog.text
    assert "Scoring entries" in err  # the progress bar
    assert [r["body"] for r in stub.requests] == [stub.expected_body(judge_prompt(e)) for e in ENTRIES]
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["number_of_scores"] == 2 and report["total"] == 3 and report["average"] == 92.5
    assert [e["score"] for e in report["entries"]] == [85, None, 100]
    assert report["entries"][1]["reply"] == "eighty"
    assert report["model"] == "llama3" and report["key"] == "model_response"


def test_score_key_model_and_jsonl(tmp_path: Path, capsys) -> None:
    entries = [{k: v for k, v in e.items() if k != "model_response"} | {"answer": e["model_response"]}
               for e in ENTRIES[:2]]
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in entries), encoding="utf-8")
    replies = {judge_prompt(entries[0], "answer"): ["6", "0"], judge_prompt(entries[1], "answer"): ["7", "5"]}
    with OllamaStub(replies).running() as stub:
        rc, text, err = _run(capsys, "score", str(path), "--key", "answer", "--model", "phi3", "--url", stub.url,
                             "--no-progress")
    assert rc == 0, err
    assert text.splitlines() == ["Number of scores: 2 of 2", "Average score: 67.50"]
    assert "Scoring entries" not in err
    assert {r["body"]["model"] for r in stub.requests} == {"phi3"}


def test_no_integer_scores_exit_1(responses: Path, capsys) -> None:
    with OllamaStub({}).running() as stub:  # every prompt answered "no such prompt"
        rc, text, _ = _run(capsys, "score", str(responses), "--url", stub.url, "--no-progress")
    assert rc == 1
    assert text.splitlines() == ["Number of scores: 0 of 3", "Average score: n/a (no integer scores)"]


def test_no_server_one_line_exit_2(responses: Path, capsys) -> None:
    url = closed_port_url()
    rc, text, err = _run(capsys, "score", str(responses), "--url", url)
    assert rc == 2 and text == ""  # and no progress bar before the one line
    assert err.strip().splitlines() == [
        f"flaxgpt score: error: no Ollama server answers at {url} (start it with `ollama serve` and "
        "`ollama pull llama3`)"]


def test_bad_inputs_one_line_exit_2(tmp_path: Path, capsys) -> None:
    url = closed_port_url()  # never reached: the input is checked first
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps([ENTRIES[0], {"instruction": "x", "input": "", "output": "y"}]), encoding="utf-8")
    not_json = tmp_path / "bad.json"
    not_json.write_text("{not json\n", encoding="utf-8")
    an_object = tmp_path / "obj.json"
    an_object.write_text('{"a": 1}', encoding="utf-8")
    empty = tmp_path / "empty.json"
    empty.write_text("[]", encoding="utf-8")
    for path, message in ((lacking, "entry 1 lacks 'model_response'"), (not_json, "neither a JSON list"),
                          (an_object, "must hold a JSON list"), (empty, "holds no entries"),
                          (tmp_path / "missing.json", "No such file")):
        rc, text, err = _run(capsys, "score", str(path), "--url", url, "--no-progress")
        assert rc == 2, path
        assert len(err.strip().splitlines()) == 1 and message in err, err
    rc, _, err = _run(capsys, "score", str(lacking), "--timeout", "0")
    assert rc == 2 and "--timeout must be > 0" in err
