"""Tests for ``flaxgpt finetune classify`` and ``flaxgpt classify`` (flaxgpt/cli/finetune.py, classify.py):
outputs, exact resume, starting from a ``flaxgpt train`` run, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flaxgpt.cli import main


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _finetune(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "classify", "--checkpoint", str(base), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--eval-freq", "3", "--eval-iter", "2", "--lr", "1e-3", "--epochs", "2", *extra]


def test_outputs_classify_and_info(base_run: Path, data_csv: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cls"
    rc, text, _ = _run(capsys, *_finetune(base_run, data_csv, out, "--max-steps", "8"))
    assert rc == 0, text
    for name in ("metrics.jsonl", "loss.png", "accuracy.png", "results.json", "config.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"train_loss", "val_loss", "train_accuracy", "val_accuracy"} <= set(records[-1])
    assert records[-1]["step"] == 8 and records[-1]["tokens_seen"] == 8 * 4  # examples seen, as the book
    results = json.loads((out / "results.json").read_text())
    assert set(results["accuracy"]) == {"train", "validation", "test"}
    assert all(0.0 <= v <= 1.0 for v in results["accuracy"].values())

    rc, text, _ = _run(capsys, "classify", "--checkpoint", str(out), "abcz", "abc")
    assert rc == 0 and [line.split("\t")[1] for line in text.splitlines()] == ["abcz", "abc"]
    assert all(line.split("\t")[0] in ("0", "1") for line in text.splitlines())

    rc, text, _ = _run(capsys, "info", str(out))
    assert rc == 0 and "classifier: 32 -> 2 classes" in text


def test_trainable_last_block_leaves_the_rest_bit_identical(base_run: Path, data_csv: Path, tmp_path: Path,
                                                             capsys) -> None:
    from flaxgpt.io.checkpoint import load_model_from_checkpoint

    out = tmp_path / "cls"
    rc, _, _ = _run(capsys, *_finetune(base_run, data_csv, out, "--max-steps", "4"))
    assert rc == 0
    from flaxgpt.nn.params import unstack_layers

    # the base run scans its layers (flaxgpt train's default): compare layer by layer
    base, tuned = (unstack_layers(p) if "trf_blocks" in p else p
                   for p in (load_model_from_checkpoint(run)[1] for run in (base_run, out)))
    np.testing.assert_array_equal(tuned["tok_emb"]["embedding"], base["tok_emb"]["embedding"])
    np.testing.assert_array_equal(tuned["trf_blocks_0"]["att"]["W_query"]["kernel"],
                                  base["trf_blocks_0"]["att"]["W_query"]["kernel"])
    assert not np.array_equal(tuned["trf_blocks_1"]["att"]["W_query"]["kernel"],
                              base["trf_blocks_1"]["att"]["W_query"]["kernel"])


def test_resume_continues_exactly(base_run: Path, data_csv: Path, tmp_path: Path, capsys) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _run(capsys, *_finetune(base_run, data_csv, whole, "--max-steps", "12"))[0] == 0
    assert _run(capsys, *_finetune(base_run, data_csv, split, "--max-steps", "6", "--checkpoint-every", "3"))[0] == 0
    rc, text, _ = _run(capsys, *_finetune(base_run, data_csv, split, "--max-steps", "12", "--resume"))
    assert rc == 0 and "resuming" in text

    def losses(run: Path) -> list[tuple[int, float, float]]:
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"], r["val_accuracy"]) for r in recs]

    # same machine, same seed: identical; the split run also evaluated where it stopped (step 6)
    assert [r for r in losses(split) if r[0] != 6] == losses(whole)
    assert 6 in [r[0] for r in losses(split)] and 6 not in [r[0] for r in losses(whole)]


@pytest.mark.parametrize(
    "extra, match",
    [
        (("--trainable", "everything"), "trainable must be one of"),
        (("--trainable", "nothing_here/"), "match no parameter"),
        (("--epochs", "0"), "--epochs must be >= 1"),
    ],
)
def test_bad_options_are_one_line_errors(base_run: Path, data_csv: Path, tmp_path: Path, capsys, extra, match) -> None:
    rc, _, err = _run(capsys, *_finetune(base_run, data_csv, tmp_path / "x", *extra))
    assert rc == 2 and match in err and len(err.strip().splitlines()) == 1


def test_bad_data_and_resume_errors(base_run: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("message,label\nhi,0\n", encoding="utf-8")
    rc, _, err = _run(capsys, *_finetune(base_run, bad, tmp_path / "x"))
    assert rc == 2 and "no column 'text'" in err
    rc, _, err = _run(capsys, *_finetune(base_run, bad, tmp_path / "none", "--resume"))
    assert rc == 2 and "no checkpoint" in err
    rc, _, err = _run(capsys, "classify", "--checkpoint", str(base_run), "hello")
    assert rc == 2 and "not a classifier run" in err


def test_from_a_hugging_face_folder_tied_gpt2(gpt2_bpe_dir, data_csv: Path, tmp_path: Path, capsys) -> None:
    """--pretrained DIR: a tied GPT-2 (qkv bias) saved as Hugging Face files, GPT-2's tokenizer."""
    import jax

    from flaxgpt.config import GPTConfig
    from flaxgpt.io.checkpoint import load_model_from_checkpoint
    from flaxgpt.io.pretrained import save_pretrained
    from flaxgpt.nn.params import init_params

    cfg = GPTConfig(context_length=32, emb_dim=16, n_heads=2, n_layers=2, qkv_bias=True, tie_embeddings=True,
                    init="gpt2")
    save_pretrained(cfg, init_params(cfg, jax.random.key(0)), tmp_path / "hf")
    out = tmp_path / "cls"
    rc, text, err = _run(capsys, "finetune", "classify", "--pretrained", str(tmp_path / "hf"), "--data",
                         str(data_csv), "--out", str(out), "--batch-size", "4", "--max-steps", "3",
                         "--eval-freq", "2", "--eval-iter", "1", "--trainable", "head")
    assert rc == 0, err
    ccfg, params, _ = load_model_from_checkpoint(out)
    assert ccfg.num_classes == 2 and not ccfg.tie_embeddings and ccfg.qkv_bias
    assert params["out_head"]["kernel"].shape == (16, 2)
    assert "classifier: 34 trainable" in text  # --trainable head: a 16 x 2 kernel and 2 biases


# --------------------------------------------------------------------------- finetune instruct


def _instruct(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["finetune", "instruct", "--checkpoint", str(base), "--data", str(data), "--out", str(out),
            "--batch-size", "4", "--eval-freq", "2", "--eval-iter", "1", "--lr", "1e-3", "--epochs", "2",
            "--sample-tokens", "0", *extra]


def test_instruct_outputs_and_checkpoint_extra(base_run: Path, instruct_json: Path, tmp_path: Path, capsys) -> None:
    from flaxgpt.io.checkpoint import resolve_checkpoint

    out = tmp_path / "sft"
    rc, text, err = _run(capsys, *_instruct(base_run, instruct_json, out, "--max-steps", "6", "--sample-tokens", "4"))
    assert rc == 0, err
    assert "20 / 2 / 2 train / validation / test records in 5 / 1 / 1 batches" in text and "initial: train loss" in text
    for name in ("metrics.jsonl", "loss.png", "results.json", "config.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 3, 5, 6] and {"train_loss", "val_loss"} <= set(records[-1])
    # tokens seen: trained target tokens; every text is longer than the base's 32-token context, so each
    # row of a batch is cut to 32 real targets
    assert records[-1]["tokens_seen"] == 6 * 4 * 32
    results = json.loads((out / "results.json").read_text())
    assert set(results["loss"]) == {"train", "validation", "test"} and results["initial_loss"]["train"] > 0
    assert results["loss"]["train"] < results["initial_loss"]["train"]
    meta = resolve_checkpoint(out)[1]
    assert meta["extra"]["instruct"] == {"mask_instruction": False, "pad_token_id": 256, "data": str(instruct_json)}
    assert meta["tokenizer"] == "bytes"


def test_instruct_resume_continues_exactly(base_run: Path, instruct_json: Path, tmp_path: Path, capsys) -> None:
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert _run(capsys, *_instruct(base_run, instruct_json, whole, "--max-steps", "7"))[0] == 0  # epochs of 5
    assert _run(capsys, *_instruct(base_run, instruct_json, split, "--max-steps", "4", "--checkpoint-every", "2"))[0] == 0
    rc, _, err = _run(capsys, *_instruct(base_run, instruct_json, split, "--resume", "--batch-size", "2"))
    assert rc == 2 and "--batch-size 2 differs from the run's 4" in err
    rc, text, _ = _run(capsys, *_instruct(base_run, instruct_json, split, "--max-steps", "7", "--resume"))
    assert rc == 0 and "resuming" in text

    def losses(run: Path) -> list[tuple[int, float, float]]:
        recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["train_loss"], r["val_loss"], r["tokens_seen"]) for r in recs]

    assert [r for r in losses(split) if r[0] != 4] == losses(whole)
    assert losses(whole)[-1][0] == 7 and 4 in [r[0] for r in losses(split)]


def test_instruct_errors_are_one_line(base_run: Path, instruct_json: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}] * 3 + [{"instruction": "c"}]),
                   encoding="utf-8")
    rc, _, err = _run(capsys, *_instruct(base_run, bad, tmp_path / "x"))
    assert rc == 2 and "record 3 has no 'output' field" in err and len(err.strip().splitlines()) == 1
    few = tmp_path / "few.json"
    few.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 3), encoding="utf-8")
    rc, _, err = _run(capsys, *_instruct(base_run, few, tmp_path / "x"))
    assert rc == 2 and "needs at least --batch-size 4" in err
    rc, _, err = _run(capsys, *_instruct(base_run, instruct_json, tmp_path / "x", "--max-length", "64"))
    assert rc == 2 and "exceeds the model's context length 32" in err
    rc, _, err = _run(capsys, *_instruct(base_run, instruct_json, tmp_path / "x", "--mask-instruction"))
    assert rc == 2 and "every training target is masked" in err  # 32 tokens hold no response
    rc, _, err = _run(capsys, *_instruct(base_run, tmp_path / "none.json", tmp_path / "x"))
    assert rc == 2 and "no such instruction data file" in err


def test_resume_keeps_the_runs_objective_and_optimizer(base_run: Path, data_csv: Path, tmp_path: Path,
                                                       capsys) -> None:
    """--resume takes options not given again from the run, and refuses ones given with another value."""
    out = tmp_path / "cls"
    assert _run(capsys, *_finetune(base_run, data_csv, out, "--max-steps", "3", "--pool", "last_nonpad"))[0] == 0
    rc, _, err = _run(capsys, *_finetune(base_run, data_csv, out, "--max-steps", "6", "--resume",
                                         "--pool", "last"))
    assert rc == 2 and "--pool last differs from the run's last_nonpad" in err
    rc, _, err = _run(capsys, *_finetune(base_run, data_csv, out, "--max-steps", "6", "--resume",
                                         "--trainable", "all"))
    assert rc == 2 and "--trainable all differs" in err
    argv = ["finetune", "classify", "--checkpoint", str(base_run), "--data", str(data_csv), "--out", str(out),
            "--batch-size", "4", "--eval-freq", "3", "--eval-iter", "2", "--epochs", "2", "--max-steps", "6",
            "--resume"]  # no --lr 1e-3, no --pool: the run's
    rc, text, err = _run(capsys, *argv)
    assert rc == 0, err
    saved = json.loads((out / "config.json").read_text())["finetune"]
    assert saved["pool"] == "last_nonpad" and saved["lr"] == 1e-3


def test_generation_commands_refuse_a_classifier_run(base_run: Path, data_csv: Path, tmp_path: Path,
                                                     capsys, monkeypatch) -> None:
    import io

    out = tmp_path / "cls"
    assert _run(capsys, *_finetune(base_run, data_csv, out, "--max-steps", "2"))[0] == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    for argv in (["chat", "--checkpoint", str(out)], ["respond", "--checkpoint", str(out), "--data", str(data_csv)]):
        rc, text, err = _run(capsys, *argv)
        assert rc == 2 and "classifier" in err and len(err.strip().splitlines()) == 1, argv
        assert "type a message" not in text  # refused before the chat starts


def test_fine_tuning_really_learns_a_rule(base_run: Path, tmp_path: Path, capsys) -> None:
    """An almost untrained base fine-tuned end to end clearly beats chance on a learnable rule ('z' in text)."""
    rng = np.random.default_rng(0)
    rows = ["text,label"]
    for _ in range(240):
        t = "".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), size=rng.integers(4, 20)))
        rows.append(f"{t},{int('z' in t)}")
    data = tmp_path / "rule.csv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    labels = np.asarray([int(r.rsplit(",", 1)[1]) for r in rows[1:]])
    majority = max(labels.mean(), 1 - labels.mean())
    out = tmp_path / "cls"
    rc, _, err = _run(capsys, "finetune", "classify", "--checkpoint", str(base_run), "--data", str(data), "--out",
                      str(out), "--trainable", "all", "--lr", "3e-3", "--epochs", "6", "--eval-freq", "50",
                      "--eval-iter", "1")
    assert rc == 0, err
    accuracy = json.loads((out / "results.json").read_text())["accuracy"]
    assert accuracy["test"] >= 0.9 > majority + 0.1, (accuracy, majority)


def test_from_scratch_resume_keeps_the_runs_tokenizer(data_csv: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    import tiktoken

    out = tmp_path / "scratch"
    argv = ["finetune", "classify", "--from-scratch", "--data", str(data_csv), "--out", str(out), "--batch-size", "4",
            "--eval-freq", "2", "--eval-iter", "1", "--epochs", "1", "--checkpoint-every", "2"]
    with monkeypatch.context() as m:  # no GPT-2 files: the run starts on bytes
        m.delenv("FLAXGPT_GPT2_BPE_DIR", raising=False)
        m.setattr(tiktoken, "get_encoding", lambda name: (_ for _ in ()).throw(ConnectionError("offline")))
        rc, text, _ = _run(capsys, *argv, "--max-steps", "2")
        assert rc == 0, text
    # GPT-2's files are back (if the machine has them): the resumed run still uses bytes
    rc, text, err = _run(capsys, *argv, "--max-steps", "3", "--resume")
    assert rc == 0 and "resuming" in text, err
    assert json.loads((out / "config.json").read_text())["tokenizer"] == "bytes"
