"""Tests for flaxgpt/finetune/score.py: the book's judge prompt (golden), the Ollama request and its
streamed reply against a stub server on 127.0.0.1 that checks every request, failures counted, errors."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from flaxgpt.finetune.score import (
    JUDGE_OPTIONS,
    OllamaError,
    ScoreResult,
    judge_prompt,
    parse_score,
    query_model,
    score_responses,
)

ENTRIES = [
    {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
     "output": "The car is as fast as lightning.", "model_response": "The car is as fast as a cheetah."},
    {"instruction": "What type of cloud is typically associated with thunderstorms?", "input": "",
     "output": "The type of cloud typically associated with thunderstorms is cumulonimbus.",
     "model_response": "The type of cloud associated with thunderstorms is a cumulus cloud."},
    {"instruction": "Name the author of 'Pride and Prejudice'.", "input": "",
     "output": "Jane Austen.", "model_response": "The author of 'Pride and Prejudice' is Jane Austen."},
]
# The book's prompt for ENTRIES[0] (with input) and ENTRIES[1] (without), written out by hand.
PROMPT_WITH_INPUT = (
    "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile.\n\n### Input:\nThe car is "
    "very fast.` and correct output `The car is as fast as lightning.`, score the model response `The car is "
    "as fast as a cheetah.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer "
    "number only."
)
PROMPT_WITHOUT_INPUT = (
    "Given the input `Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nWhat type of cloud is typically associated with "
    "thunderstorms?` and correct output `The type of cloud typically associated with thunderstorms is "
    "cumulonimbus.`, score the model response `The type of cloud associated with thunderstorms is a cumulus "
    "cloud.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)


class OllamaStub:
    """A tiny Ollama ``/api/chat`` on 127.0.0.1 (a free port) that records every request and answers each
    prompt with its list of streamed content chunks (one JSON line each, the last with ``done: true``)."""

    def __init__(self, replies: dict[str, list[str]], status: int = 200, error: str | None = None,
                 hang: bool = False) -> None:
        self.replies, self.status, self.error, self.hang = replies, status, error, hang
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stub.requests.append({"method": "POST", "path": self.path,
                                      "content_type": self.headers.get("Content-Type"), "body": json.loads(body)})
                if stub.hang:
                    stub.release.wait(10)
                    return
                if stub.status != 200:
                    self._send(stub.status, json.dumps({"error": stub.error}).encode())
                    return
                prompt = json.loads(body)["messages"][0]["content"]
                chunks = stub.replies.get(prompt, ["no such prompt"])
                lines = [json.dumps({"model": "llama3", "message": {"role": "assistant", "content": c},
                                     "done": k == len(chunks) - 1}) + "\n" for k, c in enumerate(chunks)]
                self._send(200, "".join(lines).encode(), "application/x-ndjson")

            def do_GET(self) -> None:  # noqa: N802
                stub.requests.append({"method": "GET", "path": self.path})
                self._send(405, b"{}")

            def _send(self, code: int, data: bytes, kind: str = "application/json") -> None:
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/chat"

    def expected_body(self, prompt: str, model: str = "llama3") -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": prompt}],
                "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}

    @contextlib.contextmanager
    def running(self) -> Iterator[OllamaStub]:
        thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.release.set()
            self.server.shutdown()
            self.server.server_close()
            thread.join(5)


def closed_port_url() -> str:
    """The chat URL on a 127.0.0.1 port that was just free: nothing listens there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/chat"


def book_replies() -> dict[str, list[str]]:
    """Entry 0 scores 85 (split "8", "5"), entry 1 answers "eighty" (a failure), entry 2 scores 100."""
    return {judge_prompt(ENTRIES[0]): ["8", "5"], judge_prompt(ENTRIES[1]): ["eigh", "ty"],
            judge_prompt(ENTRIES[2]): ["1", "0", "0\n"]}


def test_judge_prompt_is_the_books() -> None:
    assert judge_prompt(ENTRIES[0]) == PROMPT_WITH_INPUT
    assert judge_prompt(ENTRIES[1]) == PROMPT_WITHOUT_INPUT
    no_input = {k: v for k, v in ENTRIES[1].items() if k != "input"}  # an absent input is an empty one
    assert judge_prompt(no_input) == PROMPT_WITHOUT_INPUT
    other = {**ENTRIES[0], "my_key": "Fast."}
    assert judge_prompt(other, json_key="my_key").endswith(
        "score the model response `Fast.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only.")


def test_query_model_request_and_stream() -> None:
    with OllamaStub({PROMPT_WITH_INPUT: ["8", "5"]}).running() as stub:
        assert query_model(PROMPT_WITH_INPUT, url=stub.url, timeout=5) == "85"
    assert stub.requests == [{"method": "POST", "path": "/api/chat", "content_type": "application/json",
                              "body": stub.expected_body(PROMPT_WITH_INPUT)}]
    assert JUDGE_OPTIONS == {"seed": 123, "temperature": 0, "num_ctx": 2048}


def test_query_model_other_model_and_path() -> None:
    with OllamaStub({"hi": ["a", "b", "c"]}).running() as stub:
        url = stub.url.replace("/api/chat", "/v2/chat")
        assert query_model("hi", model="mistral", url=url, timeout=5) == "abc"
    assert stub.requests[0]["path"] == "/v2/chat"
    assert stub.requests[0]["body"] == stub.expected_body("hi", model="mistral")


def test_score_responses_counts_failures(caplog) -> None:
    with OllamaStub(book_replies()).running() as stub, caplog.at_level(logging.WARNING):
        result = score_responses(ENTRIES, url=stub.url, timeout=5)
    assert [r["body"] for r in stub.requests] == [stub.expected_body(judge_prompt(e)) for e in ENTRIES]
    assert all(r["path"] == "/api/chat" and r["content_type"] == "application/json" for r in stub.requests)
    assert result.scores == [85, 100]
    assert result.failures == [(1, "eighty")]
    assert result.entry_scores == [85, None, 100]
    assert result.replies == ["85", "eighty", "100\n"]
    assert result.total == 3
    assert result.average == pytest.approx(92.5)
    assert "Could not convert score: eighty" in caplog.text


def test_score_responses_other_key() -> None:
    entries = [{k: v for k, v in e.items() if k != "model_response"} | {"resp": e["model_response"]}
               for e in ENTRIES[:1]]
    with OllamaStub({judge_prompt(entries[0], "resp"): ["4", "2"]}).running() as stub:
        result = score_responses(entries, json_key="resp", model="llama3.1", url=stub.url, timeout=5)
    assert result.scores == [42]
    assert stub.requests[0]["body"]["model"] == "llama3.1"


def test_missing_key_names_the_index_and_sends_nothing() -> None:
    entries = [ENTRIES[0], {k: v for k, v in ENTRIES[1].items() if k != "model_response"}]
    with OllamaStub(book_replies()).running() as stub:
        with pytest.raises(ValueError, match=r"entry 1 lacks 'model_response'"):
            score_responses(entries, url=stub.url, timeout=5)
        with pytest.raises(ValueError, match=r"entry 0 lacks 'output'"):
            score_responses([{"instruction": "x", "input": "", "model_response": "z"}], url=stub.url)
        with pytest.raises(ValueError, match=r"entry 0 must be a JSON object"):
            score_responses(["text"], url=stub.url)
    assert stub.requests == []


def test_no_server_is_one_clear_line() -> None:
    url = closed_port_url()
    with pytest.raises(ConnectionError) as info:
        query_model("hi", url=url, timeout=5)
    message = str(info.value)
    assert message == (f"no Ollama server answers at {url} (start it with `ollama serve` and "
                       "`ollama pull llama3`)")
    with pytest.raises(ConnectionError, match="no Ollama server answers"):
        score_responses(ENTRIES, url=url, timeout=5)


def test_silent_server_times_out() -> None:
    with OllamaStub({}, hang=True).running() as stub:
        with pytest.raises(ConnectionError, match=r"did not answer within 0.3 s"):
            query_model("hi", url=stub.url, timeout=0.3)


def test_http_error_carries_ollamas_message() -> None:
    with OllamaStub({}, status=404, error="model 'llama3' not found, try pulling it first").running() as stub:
        with pytest.raises(OllamaError, match=r"HTTP 404: model 'llama3' not found, try pulling it first"):
            query_model("hi", url=stub.url, timeout=5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="http:// or https://"):
        query_model("hi", url="localhost:11434/api/chat")
    with pytest.raises(ValueError, match="model must be"):
        query_model("hi", model="", url="http://127.0.0.1:1/api/chat")
    with pytest.raises(ValueError, match="list of instruction records"):
        score_responses(ENTRIES[0], url="http://127.0.0.1:1/api/chat")


def test_parse_score_and_empty_average() -> None:
    assert parse_score("85") == 85 and parse_score(" 7\n") == 7  # int() as the book
    assert parse_score("eighty") is None and parse_score("85.5") is None and parse_score("") is None
    assert math.isnan(ScoreResult().average)
