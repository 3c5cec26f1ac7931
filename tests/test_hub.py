"""flaxgpt.io.hub: model names, sharded-checkpoint indexes and local paths (no network)."""

from __future__ import annotations

import json
import sys

import pytest

from flaxgpt.io.hub import HUB_MODELS, download, hub_repo, local_or_download, weight_map


def test_hub_repo_names():
    assert hub_repo("gpt2") == hub_repo(" GPT2 ") == "openai-community/gpt2"
    assert hub_repo("openai-community/gpt2-xl") == "openai-community/gpt2-xl"
    assert hub_repo("gpt3") is None and hub_repo("OpenAI-Community/gpt2") is None
    assert sorted(HUB_MODELS) == ["gpt2", "gpt2-large", "gpt2-medium", "gpt2-xl"]


def test_weight_map_is_checked(tmp_path):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"wte.weight": "model-1.safetensors"}}))
    assert weight_map(index) == {"wte.weight": "model-1.safetensors"}
    for bad, match in [({}, "has no weight_map"), ({"weight_map": {"w": "../x.safetensors"}}, "expected a .safetensors"),
                       ({"weight_map": {"w": "x.bin"}}, r"maps 'w' to 'x.bin'")]:  # fmt: skip
        index.write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            weight_map(index)


def test_local_paths_and_unknown_names(tmp_path, monkeypatch):
    assert local_or_download(tmp_path) == tmp_path
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="neither a file or directory nor a model name"):
        local_or_download("no-such-model")
    with pytest.raises(ValueError, match="unknown model name 'gpt3'"):
        download("gpt3")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # as if not installed
    with pytest.raises(ImportError, match="needs huggingface_hub"):
        download("gpt2")
