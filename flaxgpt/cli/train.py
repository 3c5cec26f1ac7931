"""``flaxgpt train``: pretrain a GPT on a text (book chapter 5), with checkpoints and exact resume.

Writes ``OUT/config.json``, ``OUT/metrics.jsonl`` (one line per evaluation), ``OUT/loss.png`` and
``OUT/checkpoints/step_*/``. Exit status: 0 when done, 130 after SIGINT and 143 after SIGTERM (a
checkpoint is saved first; ``--resume`` continues), 1 when the loss becomes NaN/inf, 2 on bad input.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flaxgpt.cli import CLIError

# Defaults of every training option. Options default to None on the command line so that, with
# --resume, values not given again come from the run's saved config.json.
DEFAULTS: dict[str, Any] = {
    "text": "pydoc",
    "tokenizer": "auto",
    "preset": None,
    "epochs": 10,
    "max_steps": 500,
    "batch_size": 8,
    "stride": None,  # = context length, as the book
    "val_ratio": 0.1,
    "lr": 1e-3,
    "weight_decay": 0.1,
    "warmup_steps": 0,
    "min_lr": None,  # None: constant lr after warmup (the book); a number: cosine decay to it
    "grad_clip": None,
    "accumulate_steps": 1,
    "eval_freq": 50,
    "eval_iter": 5,
    "checkpoint_every": 200,
    "keep_checkpoints": 3,
    "seed": 123,
    "start_context": None,  # BOOK_PROMPT, or PYDOC_PROMPT for the pydoc corpus
}
# The model `flaxgpt train` builds without --preset: small enough for a few minutes on 2 CPU cores.
DEFAULT_MODEL: dict[str, Any] = dict(
    context_length=64, emb_dim=128, n_layers=4, n_heads=4, drop_rate=0.1, qkv_bias=False
)
MODEL_FLAGS = ("emb_dim", "n_layers", "n_heads", "context_length", "drop_rate")
# Options that fix the data order: a resumed run must use the saved values.
DATA_OPTIONS = ("text", "tokenizer", "batch_size", "stride", "val_ratio", "seed", "accumulate_steps")
CONFIG_FILE = "config.json"
BOOK_PROMPT = "Every effort moves you"
PYDOC_PROMPT = "The for statement is used to"
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 40


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a GPT on a text (book chapter 5)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DEFAULTS
    io = p.add_argument_group("data and output")
    io.add_argument("--text", metavar="PATH|verdict|pydoc",
                    help=f"a UTF-8 text file, 'verdict' (the book's story) or 'pydoc' (the Python "
                    f"reference manual that ships with Python; offline). Default: {d['text']}")
    io.add_argument("--tokenizer", choices=("auto", "gpt2", "bytes"),
                    help="'gpt2' (BPE, tiktoken), 'bytes' (UTF-8 bytes, needs no files) or 'auto': GPT-2 "
                    "when its files can be found or downloaded, else bytes (default: auto)")
    io.add_argument("--out", metavar="DIR", help="run directory (default: runs/<text name>)")
    io.add_argument("--val-ratio", type=float, help=f"validation fraction (default {d['val_ratio']})")
    io.add_argument("--stride", type=int, help="window stride (default: the context length)")
    io.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                    help="continue the run in --out from its newest valid checkpoint (or from CKPT)")
    model_defaults = ", ".join(f"{k}={v}" for k, v in DEFAULT_MODEL.items())
    m = p.add_argument_group(f"model (default: {model_defaults})")
    m.add_argument("--preset", help="gpt2-small, gpt2-medium, gpt2-large or gpt2-xl")
    m.add_argument("--emb-dim", type=int)
    m.add_argument("--n-layers", type=int)
    m.add_argument("--n-heads", type=int)
    m.add_argument("--context-length", type=int)
    m.add_argument("--drop-rate", type=float)
    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, help=f"epochs in total (default {d['epochs']})")
    t.add_argument("--max-steps", type=int,
                   help=f"stop after this many optimizer updates in total, 0 = no limit (default {d['max_steps']})")
    t.add_argument("--batch-size", type=int, help=f"default {d['batch_size']}")
    t.add_argument("--accumulate-steps", type=int, help="micro-batches per update (default 1)")
    t.add_argument("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    t.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d['weight_decay']})")
    t.add_argument("--warmup-steps", type=int, help="linear warmup updates (default 0)")
    t.add_argument("--min-lr", type=float, help="cosine-decay the lr to this (default: constant lr)")
    t.add_argument("--grad-clip", type=float, help="clip gradients to this global norm (default: off)")
    t.add_argument("--eval-freq", type=int, help=f"updates between evaluations (default {d['eval_freq']})")
    t.add_argument("--eval-iter", type=int, help=f"batches per evaluation (default {d['eval_iter']})")
    t.add_argument("--checkpoint-every", type=int,
                   help=f"updates between checkpoints, 0 = only at the end (default {d['checkpoint_every']})")
    t.add_argument("--keep-checkpoints", type=int, help=f"default {d['keep_checkpoints']}")
    t.add_argument("--seed", type=int, help=f"seeds init, dropout and shuffling (default {d['seed']})")
    t.add_argument("--start-context",
                   help="prompt of the per-epoch sample (default: 'Every effort moves you', the book's; "
                   f"{PYDOC_PROMPT!r} for pydoc)")
    t.add_argument("--mesh", metavar="SPEC",
                   help="train on several devices with JAX sharding: 'data=8' (data parallel), "
                   "'data=2,fsdp=4' (+ fully sharded params); sizes multiply to the device count "
                   "(default: one device)")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- settings


def _text_name(text: str) -> str:
    return text if text in ("pydoc", "verdict") else Path(text).stem or "text"


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Path | None, Any, str | None]:
    """Merges explicit options, the resumed run's saved options, and the defaults."""
    from flaxgpt.io.checkpoint import resolve_checkpoint

    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    saved_model = saved_sha = ckpt = None
    if args.resume is not None:
        if args.resume == "latest":
            if args.out is None:
                raise CLIError("--resume needs --out DIR (the run to continue) or a checkpoint path")
            source = Path(args.out)
        else:
            source = Path(args.resume)
        ckpt, meta = resolve_checkpoint(source)
        saved = dict(meta.get("extra", {}).get("train_args", {}))
        for k in DATA_OPTIONS:
            if k in given and k in saved and given[k] != saved[k]:
                raise CLIError(
                    f"--{k.replace('_', '-')} {given[k]} differs from the checkpoint's {saved[k]}; exact "
                    "resume needs the same data settings"
                )
        settings = {**DEFAULTS, **{k: v for k, v in saved.items() if k in DEFAULTS}, **given}
        saved_model = meta["config"]
        saved_sha = meta.get("extra", {}).get("text_sha256")
        out = Path(args.out) if args.out else ckpt.parent.parent
    else:
        settings = {**DEFAULTS, **given}
        out = Path(args.out) if args.out else Path("runs") / _text_name(settings["text"])
    return settings, out, ckpt, saved_model, saved_sha


def _model_config(args: argparse.Namespace, settings: dict[str, Any], saved: dict[str, Any] | None) -> Any:
    from flaxgpt.config import GPTConfig

    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    if saved is not None:
        cfg = GPTConfig.from_dict(saved)
        for k, v in overrides.items():
            if getattr(cfg, k) != v:
                raise CLIError(f"--{k.replace('_', '-')} {v} differs from the checkpoint's {getattr(cfg, k)}")
        return cfg
    if settings["preset"] is not None:
        return GPTConfig.preset(settings["preset"], **overrides)
    return GPTConfig(**{**DEFAULT_MODEL, **overrides})


def _tokenizer(name: str) -> tuple[Any, str]:
    """The training tokenizer and its name; "auto" takes GPT-2's BPE when it can be loaded (local files
    or tiktoken's cache/download), else UTF-8 bytes, so that the default run works offline."""
    from flaxgpt.text.tokenizers import ByteTokenizer, get_tokenizer

    if name != "auto":
        try:
            return get_tokenizer(name), name
        except RuntimeError as e:
            raise CLIError(str(e).splitlines()[0] + " (or use --tokenizer bytes)") from e
    try:
        return get_tokenizer("gpt2"), "gpt2"
    except RuntimeError as e:
        logging.getLogger(__name__).info(
            "GPT-2 BPE files not available (%s); training with the byte-level tokenizer "
            "(set FLAXGPT_GPT2_BPE_DIR or go online for GPT-2's)", str(e).splitlines()[0]
        )
        return ByteTokenizer(), "bytes"


def _check_settings(s: dict[str, Any]) -> None:
    for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "accumulate_steps", "keep_checkpoints"):
        if s[name] < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    if s["max_steps"] is not None and s["max_steps"] < 0:
        raise CLIError(f"--max-steps must be >= 0 (0: no limit), got {s['max_steps']}")
    for name in ("stride",):
        if s[name] is not None and s[name] < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    for name in ("warmup_steps", "checkpoint_every", "seed"):
        if s[name] < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {s[name]}")
    if not 0.0 < s["val_ratio"] < 1.0:
        raise CLIError(f"--val-ratio must be in (0, 1), got {s['val_ratio']}")


# --------------------------------------------------------------------------- progress


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


@contextlib.contextmanager
def _log_through_tqdm() -> Iterator[None]:
    root = logging.getLogger()
    old = root.handlers[:]
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root.handlers = [handler]
    try:
        yield
    finally:
        root.handlers = old


def _final_sample(state: Any, tok: Any, prompt: str, seed: int) -> str:
    """A top-k sample of the prompt (the per-epoch samples that fit logs are the book's greedy ones)."""
    import jax

    from flaxgpt.generation.decode import generate
    from flaxgpt.text.tokenizers import text_to_token_ids, token_ids_to_text

    ids = text_to_token_ids(prompt, tok)[0][-(state.model.cfg.context_length - 1):]  # (T,)
    n_new = min(50, state.model.cfg.context_length - ids.size)
    out = generate(state.model, state.params, ids, max_new_tokens=n_new, temperature=SAMPLE_TEMPERATURE,
                   top_k=SAMPLE_TOP_K, key=jax.random.key(seed))
    return token_ids_to_text(out, tok)


def _placement(state: Any, mesh: str | None, batch_size: int) -> tuple[Any, Any, Any]:
    """Where batches and state live. Single device: as they are. With ``--mesh``: (sharded state,
    ``shard_batch``, sharded step) from ``flaxgpt.sharding``."""
    if mesh is None:
        return state, None, None
    from flaxgpt.sharding import fit_placement

    return fit_placement(state, mesh, batch_size)


# --------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    import jax
    from tqdm.auto import tqdm

    from flaxgpt.data.windows import DataLoader, train_val_split
    from flaxgpt.io.checkpoint import list_checkpoints, restore_checkpoint
    from flaxgpt.io.files import write_json as write_json_atomic
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import count_params, init_params
    from flaxgpt.text.corpora import load_text
    from flaxgpt.text.tokenizers import text_to_token_ids
    from flaxgpt.training.loop import NonFiniteLossError, Position, fit
    from flaxgpt.training.metrics import METRICS_FILE, read_metrics
    from flaxgpt.training.optim import make_optimizer
    from flaxgpt.training.plotting import plot_metrics
    from flaxgpt.training.state import create_train_state

    s, out, ckpt, saved_model, saved_sha = _resolve(args)
    _check_settings(s)
    if s["start_context"] is None:
        s["start_context"] = PYDOC_PROMPT if s["text"] in ("pydoc", "python-docs") else BOOK_PROMPT
    if args.mesh is not None:
        from flaxgpt.sharding import check_mesh

        check_mesh(args.mesh, s["batch_size"])  # fail on a bad --mesh before any work
    if ckpt is None and any((out / "checkpoints").glob("step_*")):
        raise CLIError(f"{out} already holds checkpoints: pass --resume to continue it, or another --out")
    tok, s["tokenizer"] = _tokenizer(s["tokenizer"])
    cfg = _model_config(args, s, saved_model)
    if saved_model is None and s["tokenizer"] == "bytes":
        cfg = cfg.replace(vocab_size=tok.n_vocab)  # no 50,257-way head for a 257-token vocabulary
    stride = s["stride"] or cfg.context_length
    try:
        text = load_text(s["text"])
    except ConnectionError as e:
        raise CLIError(str(e).splitlines()[0]) from e
    if cfg.vocab_size < tok.n_vocab:
        raise CLIError(f"vocab_size {cfg.vocab_size} is smaller than the tokenizer's {tok.n_vocab} tokens")
    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    if ckpt is not None and saved_sha not in (None, text_sha):
        raise CLIError(f"the text {s['text']!r} differs from the one the checkpoint was trained on")
    train_text, val_text = train_val_split(text, 1.0 - s["val_ratio"])
    train_ids = text_to_token_ids(train_text, tok)[0]  # (N,)
    val_ids = text_to_token_ids(val_text, tok)[0]  # (M,)
    need = cfg.context_length + 1
    for name, ids in (("training", train_ids), ("validation", val_ids)):
        if ids.size < need:
            raise CLIError(
                f"the {name} split has {ids.size} tokens; one window needs context length + 1 = {need} "
                "(use more text, a shorter --context-length or another --val-ratio)"
            )
    windows = len(range(0, train_ids.size - cfg.context_length, stride))
    if windows < s["batch_size"]:
        raise CLIError(
            f"the training split gives {windows} windows of {cfg.context_length} tokens, fewer than "
            f"--batch-size {s['batch_size']} (use more text, or a smaller --batch-size, --stride or "
            "--context-length)"
        )
    train_loader = DataLoader.from_token_ids(
        train_ids, s["batch_size"], cfg.context_length, stride, shuffle=True, drop_last=True, seed=s["seed"]
    )
    val_loader = DataLoader.from_token_ids(
        val_ids, s["batch_size"], cfg.context_length, stride, shuffle=False, drop_last=False
    )

    updates_per_epoch = len(train_loader) // s["accumulate_steps"]
    if updates_per_epoch == 0:
        raise CLIError(
            f"one epoch has {len(train_loader)} batches, fewer than --accumulate-steps {s['accumulate_steps']}"
        )
    max_steps = s["max_steps"] or None  # 0: no limit
    total = s["epochs"] * updates_per_epoch
    if max_steps is not None:
        total = min(total, max_steps)
    tx = make_optimizer(
        s["lr"],
        weight_decay=s["weight_decay"],
        warmup_steps=s["warmup_steps"],
        total_steps=None if s["min_lr"] is None else max(total, s["warmup_steps"] + 1),
        min_lr=s["min_lr"] or 0.0,
        grad_clip=s["grad_clip"],
        accumulate_steps=s["accumulate_steps"],
    )
    init_key, key = jax.random.split(jax.random.key(s["seed"]))
    model = GPTModel(cfg)
    state = create_train_state(model, init_params(cfg, init_key), tx)
    start = None
    if ckpt is not None:
        state, meta = restore_checkpoint(ckpt, state)
        key = meta["key"]
        start = Position(meta["epoch"], meta["batch_index"], meta["tokens_seen"])
        print(f"resuming {meta['path']} (step {meta['step']}, epoch {meta['epoch'] + 1})")
    state, shard_batch, step_fn = _placement(state, args.mesh, s["batch_size"])

    out.mkdir(parents=True, exist_ok=True)
    train_args = {k: s[k] for k in DEFAULTS}
    write_json_atomic(
        out / CONFIG_FILE,
        {"model": cfg.to_dict(), "train": train_args, "tokenizer": s["tokenizer"], "text_sha256": text_sha},
    )
    print(
        f"model: {count_params(state.params) / 1e6:.1f}M params (emb {cfg.emb_dim}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads, context {cfg.context_length}); text {s['text']}: {train_ids.size:,} train / "
        f"{val_ids.size:,} val tokens, {len(train_loader)} batches of {s['batch_size']} per epoch; out {out}"
    )

    done = int(state.step) // s["accumulate_steps"]
    bar = tqdm(total=total, initial=min(done, total), unit="step", dynamic_ncols=True, file=sys.stderr)
    speed = {"tokens": start.tokens_seen if start else 0, "time": time.perf_counter()}

    def callback(event: str, info: dict[str, Any]) -> None:
        if event == "step":
            now = time.perf_counter()
            if info["micro_step"] % s["accumulate_steps"] == 0:
                bar.update(1)
            tps = (info["tokens_seen"] - speed["tokens"]) / max(now - speed["time"], 1e-9)
            speed.update(tokens=info["tokens_seen"], time=now)
            bar.set_postfix(loss=f"{info['loss']:.3f}", tok_s=f"{tps:,.0f}", refresh=False)

    t0 = time.perf_counter()
    try:
        with _log_through_tqdm():
            result = fit(
                state, train_loader, val_loader, key=key, num_epochs=s["epochs"], eval_freq=s["eval_freq"],
                eval_iter=s["eval_iter"], max_steps=max_steps, tokenizer=tok,
                start_context=s["start_context"], run_dir=out, checkpoint_every=s["checkpoint_every"],
                keep_checkpoints=s["keep_checkpoints"], start=start, accumulate_steps=s["accumulate_steps"],
                tokenizer_name=s["tokenizer"], checkpoint_extra={"train_args": train_args, "text_sha256": text_sha},
                callback=callback, shard_batch=shard_batch, step_fn=step_fn,
            )
    except NonFiniteLossError as e:
        bar.close()
        print(f"flaxgpt train: error: {e}", file=sys.stderr)
        return 1
    bar.close()
    wall = time.perf_counter() - t0

    records = read_metrics(out / METRICS_FILE)
    if records:
        plot_metrics(records, out / "loss.png")
    last = records[-1] if records else None
    losses = f"train loss {last['train_loss']:.3f}, val loss {last['val_loss']:.3f}" if last else "no evaluation"
    ckpts = list_checkpoints(out)
    print(f"step {result.updates} ({result.stopped}) in {wall:.1f}s: {losses}; "
          f"checkpoint {ckpts[-1] if ckpts else None}")
    if result.stopped in ("SIGINT", "SIGTERM"):
        print(f"interrupted by {result.stopped}; continue with: flaxgpt train --out {out} --resume")
        return 128 + int(getattr(signal, result.stopped))


    print(f"sample (temperature {SAMPLE_TEMPERATURE}, top-k {SAMPLE_TOP_K}): "
          f"{_final_sample(result.state, tok, s['start_context'], s['seed'])}")
    print(f"wrote {out / METRICS_FILE}, {out / 'loss.png'}; generate with: "
          f"flaxgpt generate --checkpoint {out} --prompt \"...\"")
    return 0
