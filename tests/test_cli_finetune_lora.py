"""Tests for LoRA in ``flaxgpt finetune classify|instruct`` (``--lora-rank``, ``--lora-alpha``, ``--lora-targets``;
flaxgpt/cli/finetune.py), and for what reads a LoRA run: ``classify``, ``info``, ``convert --to lora|peft|hf``."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from flaxgpt.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _classify(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "classify", "--checkpoint", str(base), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--eval-freq", "3", "--eval-iter", "2", "--lr", "1e-3", "--epochs", "2",
            "--lora-rank", "4", "--lora-alpha", "8", *extra]


def _leaves_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


def test_classify_with_lora_trains_only_the_adapters(base_run: Path, data_csv: Path, tmp_path: Path, capsys) -> None:
    from flaxgpt.io.adapters import load_lora
    from flaxgpt.io.checkpoint import load_lora_from_checkpoint, load_model_from_checkpoint
    from flaxgpt.nn.lora import lora_apply, merge_lora
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import count_params

    out = tmp_path / "lora"
    rc, text, _ = _run(capsys, *_classify(base_run, data_csv, out, "--max-steps", "6"))
    assert rc == 0, text
    assert "LoRA rank 4, alpha 8" in text
    cfg, base, lora, info = load_lora_from_checkpoint(out)
    assert info["lora"]["rank"] == 4 and info["lora"]["alpha"] == 8.0 and info["lora"]["targets"] == "all"
    results = json.loads((out / "results.json").read_text())
    assert results["trainable_params"] == count_params(lora) > 0
    assert results["frozen_params"] == count_params(base)
    # the trunk is the pretrained run's, bit for bit (the head is the new classifier head, frozen too)
    _, pretrained, _ = load_model_from_checkpoint(base_run)
    trunk = {k: v for k, v in base.items() if k != "out_head"}
    assert _leaves_equal(trunk, {k: v for k, v in pretrained.items() if k in trunk})
    assert float(np.abs(np.asarray(lora.layers["out_head"]["B"])).max()) > 0  # the adapters moved

    # the adapters alone, and the merged model every other command loads
    alone = load_lora(out / "adapters", base)
    assert _leaves_equal(alone, lora) and alone.alpha == lora.alpha
    _, merged, merged_info = load_model_from_checkpoint(out)
    assert merged_info["lora"]["rank"] == 4
    ids = np.arange(12, dtype=np.int32).reshape(2, 6) % cfg.vocab_size
    model = GPTModel(cfg)
    want = lora_apply(model, base, lora, ids, positions="last")
    np.testing.assert_allclose(model.apply({"params": merged}, ids, positions="last"), want, atol=1e-5)
    np.testing.assert_allclose(model.apply({"params": merge_lora(base, lora)}, ids, positions="last"), want,
                               atol=1e-5)

    rc, text, _ = _run(capsys, "classify", "--checkpoint", str(out), "abcz", "abc")
    assert rc == 0 and len(text.splitlines()) == 2
    rc, text, _ = _run(capsys, "info", str(out))
    assert rc == 0 and f"rank 4, alpha 8.0, targets all: {count_params(lora):,} adapter params" in text


def test_lora_resume_continues_exactly(base_run: Path, data_csv: Path, tmp_path: Path, capsys) -> None:
    from flaxgpt.io.checkpoint import load_lora_from_checkpoint

    straight, parts = tmp_path / "straight", tmp_path / "parts"
    assert _run(capsys, *_classify(base_run, data_csv, straight, "--max-steps", "8"))[0] == 0
    assert _run(capsys, *_classify(base_run, data_csv, parts, "--max-steps", "4", "--checkpoint-every", "4"))[0] == 0
    # resumed without the LoRA options: they are the run's
    argv = _classify(base_run, data_csv, parts, "--max-steps", "8", "--resume")
    for flag in ("--lora-rank", "--lora-alpha"):
        i = argv.index(flag)
        del argv[i:i + 2]
    rc, text, _ = _run(capsys, *argv)
    assert rc == 0 and "resuming" in text, text
    _, _, a, _ = load_lora_from_checkpoint(straight)
    _, _, b, _ = load_lora_from_checkpoint(parts)
    assert _leaves_equal(a, b)
    losses = [{r["step"]: r["train_loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if "train_loss" in r and r["step"] > 4} for d in (straight, parts)]
    assert losses[0] == losses[1] and losses[0]  # the evaluations after the resume

    rc, _, err = _run(capsys, *_classify(base_run, data_csv, parts, "--max-steps", "9", "--resume",
                                         "--lora-rank", "8"))
    assert rc == 2 and "--lora-rank 8 differs from the run's 4" in err


@pytest.mark.parametrize("extra, match", [
    (("--trainable", "all"), "--trainable and --lora-rank exclude each other"),
    (("--lora-targets", "W_nothing"), "'W_nothing' matches no linear layer"),
    (("--lora-alpha", "0"), "alpha must be > 0"),
    (("--lora-dropout", "1"), "dropout must be < 1"),
])
def test_bad_lora_options_are_one_line_errors(base_run: Path, data_csv: Path, tmp_path: Path, capsys, extra,
                                               match) -> None:
    rc, _, err = _run(capsys, *_classify(base_run, data_csv, tmp_path / "x", *extra))
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_instruct_with_lora_exports_peft_lora_and_merged_hf(base_run: Path, instruct_json: Path, tmp_path: Path,
                                                            capsys) -> None:
    from flaxgpt.io.adapters import load_lora
    from flaxgpt.io.checkpoint import load_lora_from_checkpoint, load_model_from_checkpoint
    from flaxgpt.io.pretrained import load_book

    out = tmp_path / "sft"
    argv = ["finetune", "instruct", "--checkpoint", str(base_run), "--data", str(instruct_json), "--out", str(out),
            "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--lr", "1e-3", "--epochs", "1",
            "--sample-tokens", "4", "--lora-rank", "2", "--lora-targets", "attention"]
    rc, text, _ = _run(capsys, *argv)
    assert rc == 0, text
    cfg, base, lora, _ = load_lora_from_checkpoint(out)
    assert sorted({p.rsplit("/", 1)[1] for p in lora.layers}) == ["W_key", "W_query", "W_value", "out_proj"]

    rc, text, _ = _run(capsys, "convert", str(out), str(tmp_path / "peft"), "--to", "peft")
    assert rc == 0, text
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    rc, _, _ = _run(capsys, "convert", str(out), str(tmp_path / "alone"), "--to", "lora")
    assert rc == 0 and _leaves_equal(load_lora(tmp_path / "alone", base), lora)
    rc, _, err = _run(capsys, "convert", str(out), str(tmp_path / "hf"), "--to", "hf")
    assert rc == 2 and "not GPT-2's" in err  # a byte-level run is not passed off as GPT-2
    rc, _, _ = _run(capsys, "convert", str(out), str(tmp_path / "merged.safetensors"), "--to", "book")
    assert rc == 0
    from flaxgpt.nn.params import unstack_layers

    _, merged, _ = load_model_from_checkpoint(out)
    merged = unstack_layers(merged) if "trf_blocks" in merged else merged  # a scanned base run: the book's layout
    _, exported = load_book(tmp_path / "merged.safetensors", n_heads=cfg.n_heads)
    assert _leaves_equal({k: v for k, v in exported.items() if k in merged}, merged)

    rc, _, err = _run(capsys, "convert", str(base_run), str(tmp_path / "no"), "--to", "peft")
    assert rc == 2 and "not a LoRA run" in err


def test_a_lora_run_with_orbax_checkpoints_exports_its_adapters(base_run: Path, data_csv: Path, tmp_path: Path,
                                                                capsys) -> None:
    from flaxgpt.io.adapters import load_lora
    from flaxgpt.io.checkpoint import load_lora_from_checkpoint

    out = tmp_path / "orbax-lora"
    rc, text, _ = _run(capsys, *_classify(base_run, data_csv, out, "--max-steps", "3", "--checkpoint-format", "orbax"))
    assert rc == 0, text
    assert (out / "orbax").is_dir() and not (out / "checkpoints").exists()
    _, base, lora, info = load_lora_from_checkpoint(out)
    assert info["lora"]["rank"] == 4
    rc, _, _ = _run(capsys, "convert", str(out), str(tmp_path / "alone"), "--to", "lora")
    assert rc == 0 and _leaves_equal(load_lora(tmp_path / "alone", base), lora)
    assert _leaves_equal(load_lora(out / "adapters", base), lora)  # the run's own export, the same
