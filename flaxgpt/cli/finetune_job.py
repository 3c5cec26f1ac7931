"""The pieces both ``flaxgpt finetune`` tasks share (flaxgpt/cli/finetune.py): settings and ``--resume``, the
base model and its tokenizer, the train state (``--trainable`` or LoRA, placed over every process's devices),
the one training loop with a progress bar and the step watchdog, and what a run writes (config.json,
adapters)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flaxgpt.cli import CLIError, write_errors

__all__ = ["base_model", "describe", "exit_status", "fit_run", "lora_extra", "resume_from", "run_tokenizer",
           "save_adapters", "settings", "setup", "sizes", "source_name", "train_state", "write_config"]

# Options that fix the data, its order, the objective or the optimizer state: a resumed run keeps the saved
# values (an option not given again is taken from the run; one given with another value is an error).
_DATA_OPTIONS = ("data", "num_classes", "batch_size", "seed", "bucket", "max_length", "mask_instruction",
                 "pool", "trainable", "lr", "weight_decay", "drop_rate", "lora_rank", "lora_alpha", "lora_targets",
                 "lora_dropout")


def settings(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
    """The task's settings: each option given, else its default; checked (one-line CLIError).

    Args:
      args: the parsed arguments.
      defaults: the task's defaults (finetune.DEFAULTS or INSTRUCT_DEFAULTS).

    Returns:
      The settings by option name (``trainable`` "lora" with ``--lora-rank``, a pattern list for patterns).
    """
    s = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in defaults.items()}
    if s["lora_rank"] < 0:
        raise CLIError(f"--lora-rank must be >= 0, got {s['lora_rank']}")
    if s["lora_rank"]:
        if getattr(args, "trainable", None) is not None:
            raise CLIError("--trainable and --lora-rank exclude each other: LoRA trains the adapters only")
        s["trainable"] = "lora"
    if "," in s["trainable"] or "/" in s["trainable"]:  # path patterns
        s["trainable"] = [p for p in s["trainable"].split(",") if p]
    for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "keep_checkpoints"):
        if s[name] < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    for name in ("max_steps", "checkpoint_every", "bucket", "max_length", "sample_tokens"):
        if name in s and s[name] < 0:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 0, got {s[name]}")
    return s


def resume_from(args: argparse.Namespace, out: Path, s: dict[str, Any]) -> Path | None:
    """The checkpoint ``--resume`` continues from (None without it); the options that fix the data and its order
    must be the saved run's."""
    from flaxgpt.files import read_json
    from flaxgpt.io.checkpoint import CheckpointError, resolve_checkpoint
    from flaxgpt.io.runs import has_checkpoints

    ckpt = None
    if args.resume and has_checkpoints(out):
        try:
            ckpt = resolve_checkpoint(out)[0]
        except CheckpointError as e:
            raise CLIError(f"--resume: {e}") from e
    if args.resume and ckpt is None:
        raise CLIError(f"--resume: no checkpoint in {out}")
    saved = read_json(out / "config.json").get("finetune", {}) if ckpt and (out / "config.json").is_file() else {}
    for key in _DATA_OPTIONS:
        if key not in saved or key not in s:
            continue
        given = getattr(args, key, None)
        if given is None or given is False:  # not given again: the run's value
            s[key] = saved[key]
        elif saved[key] != s[key]:
            raise CLIError(f"--resume: --{key.replace('_', '-')} {s[key]} differs from the run's {saved[key]}")
    return ckpt


def base_model(args: argparse.Namespace, drop_rate: float, out: Path) -> tuple[Any, Any, str]:
    """(config, params, tokenizer name) of the language model to fine-tune."""
    import jax

    from flaxgpt.cli.train import DEFAULT_MODEL
    from flaxgpt.cli.train_data import training_tokenizer
    from flaxgpt.config import GPTConfig
    from flaxgpt.io.checkpoint import resolve_checkpoint
    from flaxgpt.io.pretrained import load_any
    from flaxgpt.nn.params import init_params

    if args.from_scratch:  # GPT-2's tokenizer when its files are there, else bytes (no corpus to learn from)
        from flaxgpt.files import read_json

        saved = out / "config.json"
        if args.resume and saved.is_file():  # a resumed run keeps the tokenizer it started with
            name = str(read_json(saved).get("tokenizer", "gpt2"))
        else:
            try:
                _, name = training_tokenizer("gpt2")
            except CLIError:
                name = "bytes"
        vocab = 50257 if name == "gpt2" else 257
        cfg = GPTConfig(vocab_size=vocab, **{**DEFAULT_MODEL, "drop_rate": drop_rate})
        return cfg, init_params(cfg, jax.random.key(0)), name
    source = args.checkpoint or args.pretrained
    cfg, params, fmt = load_any(source)
    name = resolve_checkpoint(source)[1].get("tokenizer", "gpt2") if fmt == "checkpoint" else "gpt2"
    if cfg.num_classes is not None:
        raise CLIError(f"{source} is already a classifier; start from a language model")
    return cfg.replace(drop_rate=drop_rate), params, name


def run_tokenizer(name: str, args: argparse.Namespace, out: Path) -> Any:
    """The base model's tokenizer; a learned one's file is copied into ``out`` so that the run stands alone."""
    import shutil

    from flaxgpt.text.learned_bpe import TOKENIZER_FILE
    from flaxgpt.text.tokenizers import find_learned_file, get_tokenizer

    source = args.checkpoint or args.pretrained
    try:
        tok = get_tokenizer(name, near=source or out)
    except (RuntimeError, ValueError) as e:
        raise CLIError(str(e).strip().splitlines()[0]) from e
    found = find_learned_file(name, source) if name.startswith("bpe-") else None
    if found is not None:
        out.mkdir(parents=True, exist_ok=True)
        if found.resolve() != (out / TOKENIZER_FILE).resolve():
            shutil.copyfile(found, out / TOKENIZER_FILE)
    return tok


def train_state(s: dict[str, Any], cfg: Any, params: Any, key: Any, ckpt: Path | None, task: Any,
                 multi: bool) -> tuple:
    """(config, labels, state, key, start, placement): AdamW on the ``--trainable`` parameters, on a mesh of
    every device on several processes (placement: fit's ``shard_batch`` and ``step_fn``), restored from
    ``ckpt``."""
    from flaxgpt.finetune.trainable import label_params, partition_optimizer, trainable_patterns
    from flaxgpt.io.checkpoint import restore_checkpoint
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import convert_layout
    from flaxgpt.training.optim import make_optimizer
    from flaxgpt.training.run_dir import Position
    from flaxgpt.training.state import create_train_state

    if cfg.scan_layers and s["trainable"] == "last_block":  # a label tree cannot split the layer axis
        cfg = cfg.replace(scan_layers=False)
        params = convert_layout(params, cfg)
    adam = make_optimizer(s["lr"], weight_decay=s["weight_decay"])
    if s["lora_rank"]:
        state, labels = _lora_state(s, cfg, params, key, adam)
    else:
        try:
            labels = label_params(params, trainable_patterns(s["trainable"], cfg.n_layers, cfg.scan_layers))
        except ValueError as e:
            raise CLIError(str(e)) from e
        state = create_train_state(GPTModel(cfg), params, partition_optimizer(adam, labels))
    place: dict[str, Any] = {}
    if multi:  # data parallel over every process's devices
        import jax

        from flaxgpt.training.placement import fit_placement

        state, place["shard_batch"], place["step_fn"] = fit_placement(
            state, f"data={jax.device_count()}", s["batch_size"], task)
    if ckpt is None:
        return cfg, labels, state, key, None, place
    state, meta = restore_checkpoint(ckpt, state)
    print(f"resuming {meta['path']} (step {meta['step']}, epoch {meta['epoch'] + 1})")
    start = Position(meta["epoch"], meta["batch_index"], meta["tokens_seen"])
    return cfg, labels, state, meta["key"], start, place


def _lora_state(s: dict[str, Any], cfg: Any, params: Any, key: Any, tx: Any) -> tuple[Any, Any]:
    """A LoRA train state (adapters from ``fold_in(key, 13)``) and its labels."""
    import jax

    from flaxgpt.finetune.lora_train import lora_train_state
    from flaxgpt.nn.lora import init_lora
    from flaxgpt.nn.model import GPTModel

    try:
        lora = init_lora(params, jax.random.fold_in(key, 13), rank=s["lora_rank"], alpha=s["lora_alpha"],
                         targets=s["lora_targets"], dropout=s["lora_dropout"])
    except ValueError as e:
        raise CLIError(f"--lora-*: {e}") from e
    return lora_train_state(GPTModel(cfg), params, lora, tx)


def lora_extra(s: dict[str, Any], state: Any, source: str) -> dict[str, Any]:
    """``{"lora": settings}`` for a LoRA run's checkpoints and config.json (empty without LoRA)."""
    from flaxgpt.finetune.lora_train import lora_metadata

    if not s["lora_rank"]:
        return {}
    return {"lora": {**lora_metadata(state.params["lora"], s["lora_targets"]), "base": source}}


def source_name(args: argparse.Namespace) -> str:
    """The base model as config.json records it ("from-scratch", a run or GPT-2 weights)."""
    return "from-scratch" if args.from_scratch else str(args.checkpoint or args.pretrained)


def sizes(state: Any, labels: Any) -> dict[str, int]:
    """Trainable and frozen parameter counts and the optimizer state's bytes."""
    from flaxgpt.finetune.trainable import count_by_label
    from flaxgpt.nn.params import param_bytes

    counts = count_by_label(state.params, labels)
    return {"trainable_params": counts["trainable"], "frozen_params": counts["frozen"],
            "optimizer_state_bytes": param_bytes(state.opt_state)}


def describe(sizes: dict[str, int], s: dict[str, Any]) -> str:
    """One line on the trainable and frozen counts and the optimizer state (for the start-up line)."""
    lora = f" (LoRA rank {s['lora_rank']}, alpha {s['lora_alpha']:g})" if s["lora_rank"] else ""
    return (f"{sizes['trainable_params']:,} trainable{lora} / {sizes['frozen_params']:,} frozen params, optimizer "
            f"state {sizes['optimizer_state_bytes'] / 2**20:.1f} MiB")


def save_adapters(out: Path, s: dict[str, Any], state: Any, extra: dict[str, Any]) -> str:
    """Writes a LoRA run's adapters alone to ``OUT/adapters`` (nothing without LoRA); the note to print."""
    import jax

    from flaxgpt.io.adapters import save_lora

    if not s["lora_rank"]:
        return ""
    lora = state.params["lora"]
    if jax.process_count() > 1:  # the adapters are sharded over the processes: every process gathers them
        from jax.experimental import multihost_utils

        lora = multihost_utils.process_allgather(lora, tiled=True)
        if jax.process_index():
            return ""
    with write_errors(out):
        save_lora(out / "adapters", lora, targets=s["lora_targets"],
                  base={"config": state.model.cfg.to_dict(), "source": extra["lora"]["base"]})
    return ", adapters/"


def fit_run(s: dict[str, Any], state: Any, loaders: dict[str, Any], key: Any, start: Any, out: Path,
         tok_name: str, task: Any, extra: dict[str, Any], job: tuple[argparse.Namespace, dict[str, Any]],
         **sample: Any) -> Any:
    """fit with a progress bar and the run's settings; None after a non-finite loss (reported). ``job`` is the
    options and the placement of :func:`train_state`."""
    from flaxgpt.cli.processes import step_watchdog
    from flaxgpt.training.loop import NonFiniteLossError, fit
    from flaxgpt.training.progress import ProgressBar

    total = s["epochs"] * len(loaders["train"]) if not s["max_steps"] else s["max_steps"]
    sample = sample or {"sample_tokens": 0}
    args, place = job
    with ProgressBar(total, int(state.step), 1, start.tokens_seen if start else 0) as bar, \
            step_watchdog(args, bool(place)) as beat, write_errors(out):
        try:
            return fit(state, loaders["train"], loaders["validation"], key=key, num_epochs=s["epochs"],
                       eval_freq=s["eval_freq"], eval_iter=s["eval_iter"], max_steps=s["max_steps"] or None,
                       run_dir=out, checkpoint_every=s["checkpoint_every"], keep_checkpoints=s["keep_checkpoints"],
                       start=start, tokenizer_name=tok_name, task=task, callback=lambda e, i: (bar(e, i), beat()),
                       checkpoint_extra=extra, checkpoint_format=args.fmt,
                       async_checkpoints=bool(getattr(args, "async_checkpoints", False)), **place, **sample)
        except NonFiniteLossError as e:
            print(f"flaxgpt finetune: error: {e}", file=sys.stderr)
            return None


def write_config(out: Path, cfg: Any, s: dict[str, Any], tok_name: str, extra: dict[str, Any]) -> None:
    """Writes ``OUT/config.json`` (process 0): the model, the settings, the tokenizer and ``extra``."""
    from flaxgpt.distributed import is_primary
    from flaxgpt.files import write_json

    with write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        if is_primary():
            write_json(out / "config.json", {"model": cfg.to_dict(), "finetune": s, "tokenizer": tok_name, **extra})


def exit_status(result: Any) -> int:
    """130 after SIGINT, 143 after SIGTERM, else 0."""
    return 130 if result.stopped == "SIGINT" else 143 if result.stopped == "SIGTERM" else 0


def setup(args: argparse.Namespace, out: Path, loaders: dict[str, Any]) -> None:
    """On several processes each loader yields this process's share; the run's checkpoint format."""
    import jax

    from flaxgpt.io.runs import run_checkpoint_format

    if args.multi:
        for loader in loaders.values():
            loader.for_process(jax.process_index(), jax.process_count())
    try:
        args.fmt = run_checkpoint_format(out, getattr(args, "checkpoint_format", None) or "auto")
    except ValueError as e:
        raise CLIError(str(e)) from e
