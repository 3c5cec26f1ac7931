"""``flaxgpt train``: pretrain a GPT on a text (book chapter 5), with checkpoints and exact resume.

Writes ``OUT/config.json``, ``OUT/metrics.jsonl`` (one line per evaluation), ``OUT/loss.png`` and
``OUT/checkpoints/step_*/``. Exit status: 0 when done, 130 after SIGINT and 143 after SIGTERM (a
checkpoint is saved first; ``--resume`` continues), 1 when the loss becomes NaN/inf, 2 on bad input.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any

from flaxgpt.cli import CLIError, plain, train_data, write_errors

__all__ = ["add_parser", "run"]

# Defaults of every training option. Options default to None on the command line so that, with
# --resume, values not given again come from the run's saved config.json.
DEFAULTS: dict[str, Any] = dict(
    text="pydoc", tokenizer="auto", preset=None, epochs=10, max_steps=500, batch_size=8,
    stride=None,  # = context length, as the book
    val_ratio=0.1, lr=1e-3, weight_decay=0.1, warmup_steps=0,
    min_lr=None,  # None: constant lr after warmup (the book); a number: cosine decay to it
    grad_clip=None, accumulate_steps=1, eval_freq=50, eval_iter=5, checkpoint_every=200, keep_checkpoints=3,
    seed=123,
    start_context=None,  # BOOK_PROMPT, or PYDOC_PROMPT for the pydoc corpus
)
# The model `flaxgpt train` builds without --preset: small enough for a few minutes on 2 CPU cores.
DEFAULT_MODEL: dict[str, Any] = dict(context_length=64, emb_dim=128, n_layers=4, n_heads=4, drop_rate=0.1, qkv_bias=False)
MODEL_FLAGS = ("emb_dim", "n_layers", "n_heads", "context_length", "drop_rate")
# Options that fix the data order: a resumed run must use the saved values.
DATA_OPTIONS = ("text", "tokenizer", "batch_size", "stride", "val_ratio", "seed", "accumulate_steps")
CONFIG_FILE = "config.json"
LOSS_PLOT = "loss.png"  # as flaxgpt.training.run_dir.LOSS_PLOT (not imported here: keeps --help fast)
BOOK_PROMPT = "Every effort moves you"
PYDOC_PROMPT = "The for statement is used to"
SAMPLE_TEMPERATURE, SAMPLE_TOP_K = 0.8, 40


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a GPT on a text (book chapter 5)",
        description=plain(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = DEFAULTS
    io = p.add_argument_group("data and output")
    io.add_argument("--text", metavar="PATH|verdict|pydoc",
                    help=f"a UTF-8 text file, 'verdict' (the book's story) or 'pydoc' (the Python "
                    f"reference manual that ships with Python; offline). Default: {d['text']}")
    io.add_argument("--tokenizer", choices=("auto", "gpt2", "learned", "bytes"),
                    help="'gpt2' (GPT-2's BPE, tiktoken), 'learned' (a 4,096-token byte-level BPE learned from the "
                    "training text at the start of the run, saved as OUT/tokenizer.json), 'bytes' (UTF-8 bytes) or "
                    "'auto': GPT-2's when its files can be found or downloaded, else learned (default: auto)")
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
    m.add_argument("--layers", choices=("scan", "unrolled"),
                   help="scan: one compiled block looped over the layers (default: 3-5x faster to compile, "
                        "as fast or faster per step); unrolled: every layer its own code")
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
                   "(default: one device; on several processes data=<every device>)")
    from flaxgpt.cli.processes import add_process_args

    add_process_args(p)
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- settings


def _text_name(text: str) -> str:
    return text if text in ("pydoc", "verdict") else Path(text).stem or "text"


def _resolve(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Path | None, Any, str | None]:
    """Merges explicit options, the resumed run's saved options, and the defaults."""
    from flaxgpt.io.checkpoint import resolve_checkpoint
    from flaxgpt.io.runs import run_of_checkpoint

    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    saved_model = saved_sha = ckpt = None
    if args.resume is not None:
        if args.resume == "latest" and args.out is None:
            raise CLIError("--resume needs --out DIR (the run to continue) or a checkpoint path")
        ckpt, meta = resolve_checkpoint(Path(args.out if args.resume == "latest" else args.resume))
        saved = dict(meta.get("extra", {}).get("train_args", {}))
        chosen = str(saved.get("tokenizer", ""))
        if given.get("tokenizer") == "auto" or (given.get("tokenizer") == "learned" and chosen.startswith("bpe-")):
            given.pop("tokenizer")  # the same choice, as the run resolved it: the run's tokenizer
        for k in DATA_OPTIONS:
            if k in given and k in saved and given[k] != saved[k]:
                raise CLIError(
                    f"--{k.replace('_', '-')} {given[k]} differs from the checkpoint's {saved[k]}; exact "
                    "resume needs the same data settings"
                )
        settings = {**DEFAULTS, **{k: v for k, v in saved.items() if k in DEFAULTS}, **given}
        saved_model = meta["config"]
        saved_sha = meta.get("extra", {}).get("text_sha256")
        out = Path(args.out) if args.out else run_of_checkpoint(ckpt)
    else:
        settings = {**DEFAULTS, **given}
        out = Path(args.out) if args.out else Path("runs") / _text_name(settings["text"])
    return settings, out, ckpt, saved_model, saved_sha


def _model_config(args: argparse.Namespace, settings: dict[str, Any], saved: dict[str, Any] | None) -> Any:
    from flaxgpt.config import GPTConfig

    overrides = {k: getattr(args, k) for k in MODEL_FLAGS if getattr(args, k) is not None}
    layers = getattr(args, "layers", None)
    if saved is not None:
        cfg = GPTConfig.from_dict(saved)
        for k, v in overrides.items():
            if getattr(cfg, k) != v:
                raise CLIError(f"--{k.replace('_', '-')} {v} differs from the checkpoint's {getattr(cfg, k)}")
        if layers is not None and (layers == "scan") != cfg.scan_layers:
            have = "scan" if cfg.scan_layers else "unrolled"
            raise CLIError(f"--layers {layers} differs from the checkpoint's layout ({have}); resume without it")
        return cfg
    overrides["scan_layers"] = (layers or "scan") == "scan"
    if settings["preset"] is not None:
        return GPTConfig.preset(settings["preset"], **overrides)
    return GPTConfig(**{**DEFAULT_MODEL, **overrides})


def _check_settings(s: dict[str, Any]) -> None:
    low = dict.fromkeys(("epochs", "batch_size", "eval_freq", "eval_iter", "accumulate_steps", "keep_checkpoints",
                         "stride"), 1)
    low.update(dict.fromkeys(("warmup_steps", "checkpoint_every", "seed", "max_steps"), 0))
    for name, bound in low.items():
        if s[name] is not None and s[name] < bound:
            note = " (0: no limit)" if name == "max_steps" else ""
            raise CLIError(f"--{name.replace('_', '-')} must be >= {bound}{note}, got {s[name]}")
    if not 0.0 < s["val_ratio"] < 1.0:
        raise CLIError(f"--val-ratio must be in (0, 1), got {s['val_ratio']}")


# --------------------------------------------------------------------------- run pieces


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


# --------------------------------------------------------------------------- run


def _optimizer(s: dict[str, Any], n_batches: int) -> tuple[Any, int, int | None]:
    """The optimizer, the updates the run makes in total and ``max_steps`` (None: no limit)."""
    from flaxgpt.training.optim import make_optimizer

    updates_per_epoch = n_batches // s["accumulate_steps"]
    if updates_per_epoch == 0:
        raise CLIError(f"one epoch has {n_batches} batches, fewer than --accumulate-steps {s['accumulate_steps']}")
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
    return tx, total, max_steps


def _initial_state(cfg: Any, tx: Any, seed: int) -> tuple[Any, Any]:
    """(fresh state, run key) from the seed."""
    import jax

    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import init_params
    from flaxgpt.training.state import create_train_state

    init_key, key = jax.random.split(jax.random.key(seed))
    return create_train_state(GPTModel(cfg), init_params(cfg, init_key), tx), key


def _restore(state: Any, ckpt: Path) -> tuple[Any, Any, Any]:
    """(state, key, start position) restored from ``ckpt`` onto ``state``'s placement (any format; an orbax
    checkpoint is resharded onto the state's mesh, whatever mesh wrote it)."""
    from flaxgpt.io.checkpoint import restore_checkpoint
    from flaxgpt.training.run_dir import Position

    state, meta = restore_checkpoint(ckpt, state)
    print(f"resuming {meta['path']} (step {meta['step']}, epoch {meta['epoch'] + 1})")
    return state, meta["key"], Position(meta["epoch"], meta["batch_index"], meta["tokens_seen"])


def _report(result: Any, run: Any, wall: float, tok: Any, s: dict[str, Any]) -> int:
    """Prints the outcome (and the final sample) and returns the exit status."""
    from flaxgpt.training.metrics import read_metrics

    last, ckpts, out = (read_metrics(run.metrics_path) or [None])[-1], run.checkpoints(), run.path
    losses = f"train loss {last['train_loss']:.3f}, val loss {last['val_loss']:.3f}" if last else "no evaluation"
    print(f"step {result.updates} ({result.stopped}) in {wall:.1f}s: {losses}; "
          f"checkpoint {ckpts[-1] if ckpts else None}; tokenizer {train_data.tokenizer_words(s['tokenizer'])}")
    if result.stopped in ("SIGINT", "SIGTERM"):
        print(f"interrupted by {result.stopped}; continue with: flaxgpt train --out {out} --resume")
        return 128 + int(getattr(signal, result.stopped))
    print(f"sample (temperature {SAMPLE_TEMPERATURE}, top-k {SAMPLE_TOP_K}): "
          f"{_final_sample(result.state, tok, s['start_context'], s['seed'])}")
    print(f"wrote {run.metrics_path}, {out / LOSS_PLOT}; generate with: "
          f"flaxgpt generate --checkpoint {out} --prompt \"...\"")
    return 0


def _setup(args: argparse.Namespace) -> tuple[dict[str, Any], Path, Path | None, Any, Any, train_data.TrainData]:
    """Settings, run folder, checkpoint to resume, model config, tokenizer and data; all checked."""
    s, out, ckpt, saved_model, saved_sha = _resolve(args)
    _check_settings(s)
    if s["start_context"] is None:
        s["start_context"] = PYDOC_PROMPT if s["text"] in ("pydoc", "python-docs") else BOOK_PROMPT
    if args.mesh is not None:
        from flaxgpt.training.placement import check_mesh

        check_mesh(args.mesh, s["batch_size"])  # fail on a bad --mesh before any work
    from flaxgpt.io.runs import has_checkpoints

    if ckpt is None and has_checkpoints(out):
        raise CLIError(f"{out} already holds checkpoints: pass --resume to continue it, or another --out")
    text, text_sha = train_data.read_text(s, saved_sha)  # a missing text fails before any tokenizer work
    from flaxgpt.data.windows import train_val_split

    train_text = train_val_split(text, 1.0 - s["val_ratio"])[0]
    tok, s["tokenizer"] = train_data.training_tokenizer(s["tokenizer"], train_text, out)
    cfg = _model_config(args, s, saved_model)
    if saved_model is None and s["tokenizer"] != "gpt2":
        cfg = cfg.replace(vocab_size=tok.n_vocab)  # no 50,257-way head for a 257- or 4,097-token vocabulary
    data = train_data.load_data(s, cfg, tok, text, text_sha)
    return s, out, ckpt, cfg, tok, data


def run(args: argparse.Namespace) -> int:
    from flaxgpt.cli.processes import start_processes

    multi = start_processes(args)  # before any other JAX call
    if multi and args.mesh is None:
        import jax

        args.mesh = f"data={jax.device_count()}"
    return _run(args, multi)


def _run(args: argparse.Namespace, multi: bool) -> int:
    import jax

    from flaxgpt.cli.processes import step_watchdog
    from flaxgpt.files import write_json
    from flaxgpt.io.runs import run_checkpoint_format
    from flaxgpt.nn.params import count_params
    from flaxgpt.training.loop import NonFiniteLossError, fit
    from flaxgpt.training.progress import ProgressBar
    from flaxgpt.training.run_dir import RunDir

    s, out, ckpt, cfg, tok, data = _setup(args)
    if multi:  # each process loads its share of every global batch
        for loader in (data.train_loader, data.val_loader):
            loader.for_process(jax.process_index(), jax.process_count())
    fmt = run_checkpoint_format(out, getattr(args, "checkpoint_format", None) or "auto")
    tx, total, max_steps = _optimizer(s, len(data.train_loader))
    state, key = _initial_state(cfg, tx, s["seed"])
    start = shard_batch = step_fn = None
    if args.mesh is not None:  # state, batches and step sharded over the mesh
        from flaxgpt.training.placement import fit_placement

        state, shard_batch, step_fn = fit_placement(state, args.mesh, s["batch_size"])
    if ckpt is not None:
        state, key, start = _restore(state, ckpt)
    train_args = {k: s[k] for k in DEFAULTS}
    config = {"model": cfg.to_dict(), "train": train_args, "tokenizer": s["tokenizer"], "text_sha256": data.text_sha}
    with write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        if jax.process_index() == 0:
            write_json(out / CONFIG_FILE, config)
    procs = f"; {jax.process_count()} processes, mesh {args.mesh}" if multi else ""
    print(
        f"model: {count_params(state.params) / 1e6:.1f}M params (emb {cfg.emb_dim}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads, context {cfg.context_length}); "
        f"tokenizer {train_data.tokenizer_words(s['tokenizer'])}; "
        f"text {s['text']}: {data.train_tokens:,} train / "
        f"{data.val_tokens:,} val tokens, {len(data.train_loader)} batches of {s['batch_size']} per epoch; "
        f"out {out}{procs}"
    )
    done = int(state.step) // s["accumulate_steps"]
    t0 = time.perf_counter()
    try:
        with ProgressBar(total, done, s["accumulate_steps"], start.tokens_seen if start else 0) as bar, \
                step_watchdog(args, multi) as beat, write_errors(out):
            result = fit(
                state, data.train_loader, data.val_loader, key=key, num_epochs=s["epochs"],
                eval_freq=s["eval_freq"], eval_iter=s["eval_iter"], max_steps=max_steps, tokenizer=tok,
                start_context=s["start_context"], run_dir=out, checkpoint_every=s["checkpoint_every"],
                keep_checkpoints=s["keep_checkpoints"], start=start, accumulate_steps=s["accumulate_steps"],
                tokenizer_name=s["tokenizer"], checkpoint_extra={"train_args": train_args, "text_sha256": data.text_sha},
                callback=lambda event, info: (bar(event, info), beat()), shard_batch=shard_batch, step_fn=step_fn,
                checkpoint_format=fmt, async_checkpoints=bool(getattr(args, "async_checkpoints", False)),
            )
    except NonFiniteLossError as e:
        print(f"flaxgpt train: error: {e}", file=sys.stderr)
        return 1
    with write_errors(out):
        RunDir(out, checkpoint_format=fmt).plot()
    return _report(result, RunDir(out, checkpoint_format=fmt), time.perf_counter() - t0, tok, s)
