"""``flaxgpt generate``, ``flaxgpt convert`` and ``flaxgpt info PATH`` on tiny local models (no network)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _weights import assert_same_params, random_params

from flaxgpt.cli import main
from flaxgpt.config import GPTConfig
from flaxgpt.io.pretrained import load_book, load_pretrained, save_pretrained
from flaxgpt.nn.params import count_params

PROMPT = "Every effort moves you"
TINY = GPTConfig(
    vocab_size=61,
    context_length=8,
    emb_dim=16,
    n_heads=4,
    n_layers=2,
    drop_rate=0.0,
    qkv_bias=True,
    tie_embeddings=True,
    init="gpt2",
)


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    """A random GPT-2 with the real 50,257-token vocabulary but tiny width, saved by transformers."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_positions=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("hf") / "gpt2-tiny"
    model.save_pretrained(folder)
    return folder, model


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_greedy_generate_matches_transformers(hf_gpt2_dir, gpt2_tok, capsys):
    import torch

    folder, model = hf_gpt2_dir
    ids = gpt2_tok.encode(PROMPT)
    with torch.no_grad():
        want = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )[0].tolist()
    assert len(want) == len(ids) + 12
    code, out, _ = run_cli(
        capsys, "generate", "--pretrained", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12",
        "--temperature", "0",
    )
    assert code == 0
    assert out == gpt2_tok.decode(want) + "\n"
    assert out.startswith(PROMPT)


def test_sampling_is_reproducible_and_checkpoints_generate_too(hf_gpt2_dir, gpt2_tok, capsys, tmp_path):
    from flaxgpt.io.checkpoint import save_checkpoint

    folder, _ = hf_gpt2_dir
    args = [
        "--prompt",
        PROMPT,
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--top-k",
        "20",
        "--seed",
        "3",
    ]
    code, first, _ = run_cli(capsys, "generate", "--pretrained", str(folder), *args)
    assert code == 0 and first.startswith(PROMPT)
    assert run_cli(capsys, "generate", "--pretrained", str(folder), *args)[1] == first

    cfg, params = load_pretrained(folder)
    save_checkpoint(tmp_path / "run", {"params": params}, step=1, key=jax.random.key(0), config=cfg)
    assert run_cli(capsys, "generate", "--checkpoint", str(tmp_path / "run"), *args)[1] == first


def test_generate_errors_are_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "generate", "--checkpoint", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "is not a flaxgpt run or checkpoint folder" in err
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    code, _, err = run_cli(capsys, "generate", "--pretrained", str(tmp_path), "--prompt", "hi")
    assert code == 2 and err.startswith("flaxgpt generate: error:") and "pickle" in err
    assert len(err.strip().splitlines()) == 1


def test_convert_between_formats_and_info(capsys, tmp_path):
    params = random_params(TINY)
    src = save_pretrained(TINY, params, tmp_path / "hf")

    code, out, _ = run_cli(capsys, "convert", str(src), str(tmp_path / "book.safetensors"))
    assert code == 0 and "(hf)" in out and "(book)" in out
    cfg_b, from_book = load_book(tmp_path / "book.safetensors", n_heads=4)
    assert cfg_b.tie_embeddings is False  # the book's model has its own head: a copy of tok_emb
    np.testing.assert_array_equal(
        from_book["out_head"]["kernel"], np.asarray(params["tok_emb"]["embedding"]).T
    )

    code, _, err = run_cli(capsys, "convert", str(tmp_path / "book.safetensors"), str(tmp_path / "back"))
    assert code == 2 and "--n-heads" in err
    code, _, _ = run_cli(
        capsys, "convert", str(tmp_path / "book.safetensors"), str(tmp_path / "back"), "--n-heads", "4"
    )
    assert code == 0
    cfg_h, back = load_pretrained(tmp_path / "back")
    assert not cfg_h.tie_embeddings
    assert_same_params(back, from_book)

    code, _, _ = run_cli(capsys, "convert", str(src), str(tmp_path / "bf16"), "--dtype", "bfloat16")
    assert code == 0
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"

    code, out, _ = run_cli(capsys, "info", str(src))
    assert code == 0
    n = count_params(params)
    assert f"parameters      {n:,}" in out and "format          hf" in out and "n_layers        2" in out
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "bf16"))
    assert f"size            {2 * n:,} bytes" in out
    code, out, _ = run_cli(capsys, "info")
    assert code == 0 and "backend" in out


def test_convert_a_training_checkpoint(capsys, tmp_path):
    from flaxgpt.io.checkpoint import save_checkpoint

    cfg = TINY.replace(scan_layers=True)
    params = jax.tree.map(jnp.asarray, random_params(cfg))
    save_checkpoint(tmp_path / "run", {"params": params}, step=3, key=jax.random.key(0), config=cfg)
    code, out, _ = run_cli(capsys, "convert", str(tmp_path / "run"), str(tmp_path / "hf"))
    assert code == 0 and "(checkpoint)" in out and "tokenizer gpt2" in out
    cfg2, got = load_pretrained(tmp_path / "hf", scan_layers=True)
    assert cfg2 == cfg
    assert_same_params(got, params)
    code, out, _ = run_cli(capsys, "info", str(tmp_path / "run"))
    assert code == 0 and "format          checkpoint" in out and "scan_layers     True" in out


def test_eos_stops_generation(gpt2_tok, capsys, tmp_path):
    """A model whose every next token is <|endoftext|>: --eos stops at once, without it EOS is printed."""
    cfg = GPTConfig(vocab_size=50257, context_length=32, emb_dim=16, n_heads=4, n_layers=1, drop_rate=0.0)
    params = random_params(cfg, scale=0.1)
    params["final_norm"] = {"scale": np.zeros(16, np.float32), "shift": np.ones(16, np.float32)}  # h = 1
    head = np.zeros((16, 50257), np.float32)
    head[:, 50256] = 1.0  # logits: 16 for EOS, 0 for every other token
    params["out_head"] = {"kernel": head}
    save_pretrained(cfg, params, tmp_path / "eos")
    argv = ["generate", "--pretrained", str(tmp_path / "eos"), "--prompt", PROMPT, "--max-new-tokens", "3"]
    assert run_cli(capsys, *argv)[1] == PROMPT + "<|endoftext|>" * 3 + "\n"
    assert run_cli(capsys, *argv, "--eos")[1] == PROMPT + "\n"


def test_non_finite_weights_are_refused_unless_allowed(capsys, tmp_path):
    params = random_params(TINY)
    params["final_norm"]["scale"][0] = np.nan
    src = save_pretrained(TINY, params, tmp_path / "nan")
    gen = ["generate", "--pretrained", str(src), "--prompt", "hi", "--max-new-tokens", "1"]
    code, _, err = run_cli(capsys, *gen)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'ln_f.weight' holds 1 non-finite value " in err and "--allow-non-finite" in err
    conv = ["convert", str(src), str(tmp_path / "out")]
    code, _, err = run_cli(capsys, *conv)
    assert code == 2 and "non-finite" in err and not (tmp_path / "out").exists()
    code, out, _ = run_cli(capsys, *conv, "--allow-non-finite")
    assert code == 0 and "converted" in out
    assert np.isnan(load_pretrained(tmp_path / "out", allow_non_finite=True)[1]["final_norm"]["scale"][0])


def test_sampling_defaults_timing_and_greedy_options(hf_gpt2_dir, capsys):
    folder, _ = hf_gpt2_dir
    base = ["generate", "--pretrained", str(folder), "--prompt", PROMPT, "--max-new-tokens", "6"]
    code, sampled, err = run_cli(capsys, *base)
    assert code == 0 and "tokens/s" in err and "temperature 0.8, top-k 40" in err  # the defaults, said
    assert run_cli(capsys, *base, "--temperature", "0.8", "--top-k", "40")[1] == sampled
    code, _, err = run_cli(capsys, *base, "--temperature", "0", "--top-k", "5")
    assert code == 2 and "do nothing" in err and len(err.strip().splitlines()) == 1


def test_weights_without_the_bpe_files_are_one_line(hf_gpt2_dir, capsys, monkeypatch):
    import tiktoken

    folder, _ = hf_gpt2_dir
    monkeypatch.delenv("FLAXGPT_GPT2_BPE_DIR", raising=False)

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    code, _, err = run_cli(capsys, "generate", "--pretrained", str(folder), "--prompt", PROMPT)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "BPE files are not available" in err and "FLAXGPT_GPT2_BPE_DIR" in err and "Traceback" not in err


def test_int8_generate_decodes_the_quantised_weights(hf_gpt2_dir, gpt2_tok, capsys):
    from flaxgpt.generation.decode import generate
    from flaxgpt.io.pretrained import load_any
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.quant import quantize_int8

    folder, _ = hf_gpt2_dir
    cfg, params, _ = load_any(str(folder))
    ids = np.asarray(gpt2_tok.encode(PROMPT), np.int32)
    want = generate(GPTModel(cfg), quantize_int8(params, cfg), ids, max_new_tokens=8)
    base = ["generate", "--pretrained", str(folder), "--prompt", PROMPT, "--max-new-tokens", "8", "--temperature", "0"]
    code, out, _ = run_cli(capsys, *base, "--int8")
    assert code == 0 and out == gpt2_tok.decode([int(i) for i in want]) + "\n"
    code, _, err = run_cli(capsys, *base, "--int8", "--dtype", "bfloat16")
    assert code == 2 and "--int8" in err and len(err.strip().splitlines()) == 1
