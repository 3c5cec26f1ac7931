"""flaxgpt.finetune.respond: batched greedy responses equal one-by-one generation, the book's response
extraction, the per-record context cap, and the book's responses file."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from flaxgpt.data.instructions import format_input
from flaxgpt.finetune.respond import extract_response, generate_responses, write_responses
from flaxgpt.generation.decode import generate
from flaxgpt.nn.model import GPTModel
from flaxgpt.nn.params import init_params
from flaxgpt.text.tokenizers import ByteTokenizer

ENTRIES = [
    {"instruction": "Rewrite the sentence.", "input": "The cake was eaten by me.", "output": "I ate the cake."},
    {"instruction": "Name a color.", "input": "", "output": "Blue."},
    {"instruction": "What is 2+2?", "input": "", "output": "4"},
    {"instruction": "Translate to French.", "input": "Good morning, my friend.", "output": "Bonjour, mon ami."},
    {"instruction": "Give an antonym.", "input": "hot", "output": "cold"},
]
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model_params(tiny_config):
    cfg = tiny_config(vocab_size=TOK.n_vocab, context_length=192)
    return GPTModel(cfg), init_params(cfg, jax.random.key(0))


def _one_by_one(model, params, entries, max_new_tokens, eos_id):
    """The book's loop: one prompt at a time through generate, then the book's extraction."""
    out = []
    for e in entries:
        prompt = format_input(e)
        ids = np.asarray(TOK.encode(prompt))
        cap = min(max_new_tokens, model.cfg.context_length - len(ids))
        gen = generate(model, params, ids, max_new_tokens=cap, eos_id=eos_id)  # (T + new,)
        text = TOK.decode([int(i) for i in gen])
        out.append(text[len(prompt) :].replace("### Response:", "").strip())
    return out


def test_extract_response_golden():
    prompt = "Below is an instruction.\n\n### Instruction:\nName a color."
    generated = prompt + "\n\n### Response:\nBlue is a color.  \n"
    assert extract_response(generated, prompt) == "Blue is a color."
    assert extract_response(prompt + " no header ", prompt) == "no header"
    assert extract_response(prompt, prompt) == ""


def test_batched_equals_one_by_one(model_params):
    model, params = model_params
    got = generate_responses(model, params, ENTRIES, TOK, max_new_tokens=20, batch_size=3)
    assert len(got) == len(ENTRIES) and all(isinstance(r, str) for r in got)
    assert got == _one_by_one(model, params, ENTRIES, 20, TOK.eot_token)
    assert got == generate_responses(model, params, ENTRIES, TOK, max_new_tokens=20, batch_size=1)
    assert any(len(r) > 3 for r in got)  # it did generate something


def test_eos_cuts_responses(model_params):
    model, params = model_params
    free = generate_responses(model, params, ENTRIES[:2], TOK, max_new_tokens=20, batch_size=2)
    eos = TOK.encode(free[0])[len(free[0]) // 2]  # a byte in the middle of the first response
    got = generate_responses(model, params, ENTRIES[:2], TOK, max_new_tokens=20, batch_size=2, eos_id=eos)
    assert got == _one_by_one(model, params, ENTRIES[:2], 20, eos)
    assert len(got[0]) < len(free[0])


def test_long_prompts_are_capped_per_record(model_params):
    model, params = model_params
    long = {"instruction": "x" * 30, "input": "y" * 13, "output": ""}  # prompt: 180 of 192 tokens
    entries = [ENTRIES[1], long, ENTRIES[2]]
    assert len(TOK.encode(format_input(long))) == 180
    got = generate_responses(model, params, entries, TOK, max_new_tokens=30, batch_size=3)
    assert got == _one_by_one(model, params, entries, 30, TOK.eot_token)
    assert len(got[1]) <= 12  # 12 new bytes at most (a character per byte at most)
    too_long = {"instruction": "z" * 100, "input": "", "output": ""}
    with pytest.raises(ValueError, match="record 1: its prompt is 2"):
        generate_responses(model, params, [ENTRIES[0], too_long], TOK, max_new_tokens=8)
    with pytest.raises(ValueError, match="batch_size"):
        generate_responses(model, params, ENTRIES, TOK, batch_size=0)


def test_write_responses_is_the_books_file(tmp_path):
    path = tmp_path / "instruction-data-with-response.json"
    responses = [f"answer {i}" for i in range(len(ENTRIES))]
    assert write_responses(ENTRIES, responses, path) == path
    book = [dict(e) for e in ENTRIES]
    for e, r in zip(book, responses):
        e["model_response"] = r
    assert path.read_text(encoding="utf-8") == json.dumps(book, indent=4)  # the book's json.dump(indent=4)
    assert path.read_text(encoding="utf-8").startswith('[\n    {\n        "instruction": "Rewrite the sentence.",')
    assert ENTRIES[0].keys() == {"instruction", "input", "output"}  # the inputs are not modified
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left
    with pytest.raises(ValueError, match="5 records but 2 responses"):
        write_responses(ENTRIES, responses[:2], path)
