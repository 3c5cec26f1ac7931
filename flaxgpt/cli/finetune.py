"""``flaxgpt finetune classify|instruct``: book chapters 6 and 7, a pretrained GPT fine-tuned as a text
classifier or on instruction/response pairs.

Both start from GPT-2 weights (``--pretrained gpt2-medium`` or a local folder), a ``flaxgpt train`` run
(``--checkpoint RUN``) or, for experiments, a fresh model (``--from-scratch``), and train the chosen parameters
(``--trainable``) through the same training loop as ``flaxgpt train`` (checkpoints, exact ``--resume``,
SIGINT/SIGTERM, NaN stop). Each writes ``OUT/metrics.jsonl``, ``OUT/loss.png``, ``OUT/checkpoints/``,
``OUT/config.json`` and ``OUT/results.json`` (with the trainable count and the optimizer state's bytes).

LoRA (book appendix E): ``--lora-rank R`` trains only rank-R adapters on the ``--lora-targets`` layers (default
every linear layer, the book's), scaled by ``--lora-alpha`` / R, the base frozen bit for bit; the adapters alone
are also written to ``OUT/adapters/``, and ``flaxgpt convert OUT DIR --to peft`` exports them for Hugging Face
PEFT. Every command that loads the run gets the adapters merged into the weights.

classify: swaps the head for a ``num_classes`` linear layer; also writes ``OUT/accuracy.png`` (the book's
figures 6.16 and 6.17); results are the final train / validation / test accuracy.

instruct: the book's instruction-data.json (or ``--data FILE``, a JSON list or JSONL of
instruction/input/output records) split 85/10/5, batched as the book's ``custom_collate_fn`` with widths padded
up to multiples of ``--bucket`` (one compiled program per bucket, not per width), the masked cross-entropy
(``--mask-instruction``: the prompt's tokens are not trained on, the book's exercise 7.2), the book's greedy
sample of the first validation prompt after each epoch; results are the initial and final losses.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from flaxgpt.cli import CLIError, plain

__all__ = ["add_parser", "run"]

_COMMON: dict[str, Any] = {"max_steps": 0, "batch_size": 8, "lr": 5e-5, "weight_decay": 0.1, "eval_iter": 5,
                           "keep_checkpoints": 3, "drop_rate": 0.0, "seed": 123,
                           "lora_rank": 0, "lora_alpha": 16.0, "lora_targets": "all", "lora_dropout": 0.0}
DEFAULTS: dict[str, Any] = {  # classify (book chapter 6)
    "data": "sms-spam", "num_classes": 2, "trainable": "last_block", "pool": "last", "epochs": 5,
    "eval_freq": 50, "checkpoint_every": 200, **_COMMON,
}
INSTRUCT_DEFAULTS: dict[str, Any] = {  # instruct (book chapter 7)
    "data": "book", "trainable": "all", "epochs": 2, "eval_freq": 5, "checkpoint_every": 100, "bucket": 16,
    "max_length": 0, "sample_tokens": 50, **_COMMON,
}
SMS_LABELS = ("not spam", "spam")  # the book's classify_review answers
_NUMBERS = (("epochs", int), ("max-steps", int), ("batch-size", int), ("lr", float), ("weight-decay", float),
            ("eval-freq", int), ("eval-iter", int), ("checkpoint-every", int), ("keep-checkpoints", int),
            ("drop-rate", float), ("seed", int), ("lora-rank", int), ("lora-alpha", float), ("lora-dropout", float))
# Options that fix the data, its order, the objective or the optimizer state: a resumed run keeps the saved
# values (an option not given again is taken from the run; one given with another value is an error).
_DATA_OPTIONS = ("data", "num_classes", "batch_size", "seed", "bucket", "max_length", "mask_instruction",
                 "pool", "trainable", "lr", "weight_decay", "drop_rate", "lora_rank", "lora_alpha", "lora_targets",
                 "lora_dropout")


# --------------------------------------------------------------------------- parsers


def _add_common(c: argparse.ArgumentParser, d: dict[str, Any], out: str) -> None:
    """The options both tasks share: the base model, output, resume, trainable set and training numbers."""
    base = c.add_mutually_exclusive_group(required=True)
    base.add_argument("--pretrained", metavar="NAME|DIR", help="GPT-2 weights: gpt2, gpt2-medium, ... or a folder")
    base.add_argument("--checkpoint", metavar="RUN", help="a flaxgpt train run (or one of its checkpoints)")
    base.add_argument("--from-scratch", action="store_true",
                      help="a fresh model of flaxgpt train's default size (no pretraining: a baseline)")
    c.add_argument("--trainable", help="'last_block' (last block, final norm, head), 'head', 'all', or "
                   f"comma-separated path patterns such as 'trf_blocks_11/,out_head/' (default {d['trainable']})")
    c.add_argument("--lora-targets", metavar="all|attention|feed_forward|PATTERNS",
                   help="with --lora-rank: the linear layers that get adapters, a preset or comma-separated path "
                   "patterns searched in each layer's path such as 'W_query,W_value' (default all: the book's)")
    c.add_argument("--out", metavar="DIR", help=f"run directory (default {out})")
    c.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    helps = {"lora-rank": "LoRA (book appendix E): adapters of this rank on the --lora-targets, the rest frozen; "
             "0 = no LoRA (default 0)", "lora-alpha": "LoRA alpha; the adapters are scaled by alpha / rank (default 16)",
             "lora-dropout": "dropout on the adapters' input (default 0, the book)"}
    for flag, kind in _NUMBERS:
        c.add_argument(f"--{flag}", type=kind, help=helps.get(flag, f"default {d[flag.replace('-', '_')]}"))
    from flaxgpt.cli.processes import add_process_args

    add_process_args(c)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a GPT (book chapters 6 and 7: classification, instructions)",
                       description="Fine-tune a pretrained GPT through flaxgpt's one training loop.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    fmt = argparse.RawDescriptionHelpFormatter
    c = tasks.add_parser("classify", help="a text classifier (book chapter 6)", description=plain(__doc__),
                         formatter_class=fmt)
    d = DEFAULTS
    c.add_argument("--data", metavar="sms-spam|FILE",
                   help="'sms-spam' (the book's data, split 70/10/20 as the book) or a CSV/TSV with text and "
                   f"label columns, split the same way (default {d['data']})")
    c.add_argument("--num-classes", type=int, help=f"classes of a --data file (default {d['num_classes']})")
    c.add_argument("--pool", choices=("last", "last_nonpad"),
                   help="classify from the last position (the book) or each text's last real token")
    _add_common(c, d, "runs/classify")
    c.set_defaults(func=run)
    i = tasks.add_parser("instruct", help="instruction following (book chapter 7)", description=plain(__doc__),
                         formatter_class=fmt)
    d = INSTRUCT_DEFAULTS
    i.add_argument("--data", metavar="book|FILE",
                   help="'book' (instruction-data.json, 1,100 records) or a JSON list / JSONL file of instruction, "
                   "input and output records; split 85/10/5 train/test/validation as the book (default book)")
    i.add_argument("--mask-instruction", action="store_true",
                   help="ignore the prompt's target tokens too (the book's exercise 7.2)")
    i.add_argument("--bucket", type=int, help="pad batch widths up to multiples of this, 0 = the book's exact "
                   f"widths (one compile per width) (default {d['bucket']})")
    i.add_argument("--max-length", type=int,
                   help="cut batches to this many tokens (the book's allowed_max_length), 0 = the context length")
    i.add_argument("--sample-tokens", type=int,
                   help=f"tokens of the greedy per-epoch sample, 0 = none (default {d['sample_tokens']})")
    _add_common(i, d, "runs/instruct")
    i.set_defaults(func=run)


# --------------------------------------------------------------------------- shared pieces


def _settings(args: argparse.Namespace, defaults: dict[str, Any]) -> dict[str, Any]:
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


def _resume_from(args: argparse.Namespace, out: Path, s: dict[str, Any]) -> Path | None:
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


def _base_model(args: argparse.Namespace, drop_rate: float, out: Path) -> tuple[Any, Any, str]:
    """(config, params, tokenizer name) of the language model to fine-tune."""
    import jax

    from flaxgpt.cli.train import DEFAULT_MODEL, _tokenizer
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
                _, name = _tokenizer("gpt2")
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


def _run_tokenizer(name: str, args: argparse.Namespace, out: Path) -> Any:
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


def _train_state(s: dict[str, Any], cfg: Any, params: Any, key: Any, ckpt: Path | None, task: Any,
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


def _lora_extra(s: dict[str, Any], state: Any, source: str) -> dict[str, Any]:
    """``{"lora": settings}`` for a LoRA run's checkpoints and config.json (empty without LoRA)."""
    from flaxgpt.finetune.lora_train import lora_metadata

    if not s["lora_rank"]:
        return {}
    return {"lora": {**lora_metadata(state.params["lora"], s["lora_targets"]), "base": source}}


def _source(args: argparse.Namespace) -> str:
    return "from-scratch" if args.from_scratch else str(args.checkpoint or args.pretrained)


def _sizes(state: Any, labels: Any) -> dict[str, int]:
    """Trainable and frozen parameter counts and the optimizer state's bytes."""
    from flaxgpt.finetune.trainable import count_by_label
    from flaxgpt.nn.params import param_bytes

    counts = count_by_label(state.params, labels)
    return {"trainable_params": counts["trainable"], "frozen_params": counts["frozen"],
            "optimizer_state_bytes": param_bytes(state.opt_state)}


def _describe(sizes: dict[str, int], s: dict[str, Any]) -> str:
    lora = f" (LoRA rank {s['lora_rank']}, alpha {s['lora_alpha']:g})" if s["lora_rank"] else ""
    return (f"{sizes['trainable_params']:,} trainable{lora} / {sizes['frozen_params']:,} frozen params, optimizer "
            f"state {sizes['optimizer_state_bytes'] / 2**20:.1f} MiB")


def _save_adapters(out: Path, s: dict[str, Any], state: Any, extra: dict[str, Any]) -> str:
    """Writes a LoRA run's adapters alone to ``OUT/adapters`` (nothing without LoRA); the note to print."""
    import jax

    from flaxgpt.cli.train import _write_errors
    from flaxgpt.io.adapters import save_lora

    if not s["lora_rank"]:
        return ""
    lora = state.params["lora"]
    if jax.process_count() > 1:  # the adapters are sharded over the processes: every process gathers them
        from jax.experimental import multihost_utils

        lora = multihost_utils.process_allgather(lora, tiled=True)
        if jax.process_index():
            return ""
    with _write_errors(out):
        save_lora(out / "adapters", lora, targets=s["lora_targets"],
                  base={"config": state.model.cfg.to_dict(), "source": extra["lora"]["base"]})
    return ", adapters/"


def _fit(s: dict[str, Any], state: Any, loaders: dict[str, Any], key: Any, start: Any, out: Path,
         tok_name: str, task: Any, extra: dict[str, Any], job: tuple[argparse.Namespace, dict[str, Any]],
         **sample: Any) -> Any:
    """fit with a progress bar and the run's settings; None after a non-finite loss (reported). ``job`` is the
    options and the placement of :func:`_train_state`."""
    from flaxgpt.cli.processes import step_watchdog
    from flaxgpt.cli.train import _write_errors
    from flaxgpt.training.loop import NonFiniteLossError, fit
    from flaxgpt.training.progress import ProgressBar

    total = s["epochs"] * len(loaders["train"]) if not s["max_steps"] else s["max_steps"]
    sample = sample or {"sample_tokens": 0}
    args, place = job
    with ProgressBar(total, int(state.step), 1, start.tokens_seen if start else 0) as bar, \
            step_watchdog(args, bool(place)) as beat, _write_errors(out):
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


def _write_config(out: Path, cfg: Any, s: dict[str, Any], tok_name: str, extra: dict[str, Any]) -> None:
    from flaxgpt.cli.train import _write_errors
    from flaxgpt.distributed import is_primary
    from flaxgpt.files import write_json

    with _write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        if is_primary():
            write_json(out / "config.json", {"model": cfg.to_dict(), "finetune": s, "tokenizer": tok_name, **extra})


def _exit_status(result: Any) -> int:
    return 130 if result.stopped == "SIGINT" else 143 if result.stopped == "SIGTERM" else 0


def run(args: argparse.Namespace) -> int:
    """Runs ``flaxgpt finetune classify`` or ``flaxgpt finetune instruct``.

    Args:
      args: the parsed arguments.

    Returns:
      The exit status (0; 1 after a non-finite loss; 130/143 after SIGINT/SIGTERM).
    """
    from flaxgpt.cli.processes import start_processes

    args.multi = start_processes(args)  # before any other JAX call
    return _run_instruct(args) if getattr(args, "task", "classify") == "instruct" else _run_classify(args)


def _job_setup(args: argparse.Namespace, out: Path, loaders: dict[str, Any]) -> None:
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


# --------------------------------------------------------------------------- classify


def _classify_data(s: dict[str, Any], tok: Any, context_length: int) -> dict[str, Any]:
    from flaxgpt.data.classification import classification_loaders, read_labeled_file
    from flaxgpt.data.sms_spam import load_sms_spam, random_split

    if s["data"] == "sms-spam":
        splits, num_classes = load_sms_spam(seed=s["seed"]), 2
    else:  # the book's random_split of the file's rows (no balancing: the classes are the file's)
        num_classes = s["num_classes"]
        splits = random_split(read_labeled_file(s["data"], num_classes=num_classes), seed=s["seed"])
        if not len(splits["train"]) or not len(splits["validation"]):
            raise CLIError(f"{s['data']} has too few rows for a 70/10/20 split")
    longest = max(len(tok.encode(t)) for t in splits["train"].texts)
    loaders = classification_loaders(splits, tok, s["batch_size"], s["seed"], min(longest, context_length),
                                     num_classes, pad_token_id=int(tok.eot_token))
    return {"loaders": loaders, "num_classes": num_classes, "max_length": loaders["train"].dataset.max_length}


def _run_classify(args: argparse.Namespace) -> int:
    import jax

    from flaxgpt.cli.train import _write_errors
    from flaxgpt.distributed import is_primary
    from flaxgpt.files import write_json
    from flaxgpt.finetune.classify import ClassificationTask, to_classifier
    from flaxgpt.training.evaluation import evaluate_metrics
    from flaxgpt.training.run_dir import RunDir

    s = _settings(args, DEFAULTS)
    out = Path(args.out or "runs/classify")
    ckpt = _resume_from(args, out, s)
    cfg, params, tok_name = _base_model(args, s["drop_rate"], out)
    tok = _run_tokenizer(tok_name, args, out)
    data = _classify_data(s, tok, cfg.context_length)
    head_key, key = jax.random.split(jax.random.key(s["seed"]))
    cfg, params = to_classifier(cfg, params, data["num_classes"], head_key)
    task = ClassificationTask(s["pool"])
    loaders = data["loaders"]
    _job_setup(args, out, loaders)
    cfg, labels, state, key, start, place = _train_state(s, cfg, params, key, ckpt, task, args.multi)
    sizes = _sizes(state, labels)
    classifier = {"max_length": data["max_length"], "pool": s["pool"], "pad_token_id": int(tok.eot_token),
                  "labels": list(SMS_LABELS) if s["data"] == "sms-spam" else None}
    extra = {"classifier": classifier, **_lora_extra(s, state, _source(args))}
    _write_config(out, cfg, s, tok_name, extra)
    print(f"classifier: {_describe(sizes, s)}; "
          f"{len(loaders['train'])} / {len(loaders['validation'])} / {len(loaders['test'])} batches of "
          f"{s['batch_size']} (width {data['max_length']}); out {out}")
    t0 = time.perf_counter()
    result = _fit(s, state, loaders, key, start, out, tok_name, task, extra, (args, place))
    if result is None:
        return 1
    accuracies = {name: evaluate_metrics(result.state, loader, task, None, place.get("shard_batch"))["accuracy"]
                  for name, loader in loaders.items()}
    with _write_errors(out):
        run_dir = RunDir(out)
        run_dir.plot(seen="Examples seen")
        run_dir.plot(metric="accuracy", seen="Examples seen")
        if is_primary():
            write_json(out / "results.json", {"accuracy": accuracies, "updates": result.updates,
                                              "stopped": result.stopped, "time_s": round(time.perf_counter() - t0, 1),
                                              **sizes})
    adapters = _save_adapters(out, s, result.state, extra)
    print(f"{result.stopped} after {result.updates} updates in {time.perf_counter() - t0:.1f}s: accuracy "
          + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracies.items()))
    print(f'wrote {out}/metrics.jsonl, loss.png, accuracy.png, results.json{adapters}; classify with: flaxgpt classify '
          f'--checkpoint {out} "..."')
    return _exit_status(result)


# --------------------------------------------------------------------------- instruct


def _instruct_data(s: dict[str, Any], tok: Any, context_length: int) -> dict[str, Any]:
    """The book's splits and loaders (one-line errors for missing data, bad records, too few records)."""
    from flaxgpt.data.instructions import book_split, instruction_loaders, load_instruction_data

    try:
        records = load_instruction_data(None if s["data"] == "book" else s["data"])
    except ConnectionError as e:
        raise CLIError("; ".join(line.strip() for line in str(e).splitlines() if line.strip())) from e
    splits = book_split(records)
    if len(splits["train"]) < s["batch_size"] or not splits["validation"]:
        raise CLIError(f"{s['data']} has {len(records)} records: the 85/10/5 split needs at least --batch-size "
                       f"{s['batch_size']} training and 1 validation record")
    if s["max_length"] > context_length:
        raise CLIError(f"--max-length {s['max_length']} exceeds the model's context length {context_length}")
    loaders = instruction_loaders(splits, tok, s["batch_size"], s["seed"], pad_token_id=int(tok.eot_token),
                                  allowed_max_length=s["max_length"] or context_length, bucket=s["bucket"] or None,
                                  mask_instruction=s["mask_instruction"])
    train = loaders["train"].dataset
    if s["mask_instruction"] and all(n - 1 >= train.allowed_max_length for n in train.prompt_lengths):
        raise CLIError(f"every training target is masked: with --mask-instruction no prompt is shorter than the "
                       f"{train.allowed_max_length}-token batches (a longer --max-length or context is needed)")
    return {"loaders": loaders, "splits": splits}


def _run_instruct(args: argparse.Namespace) -> int:
    import jax

    from flaxgpt.cli.train import _write_errors
    from flaxgpt.data.instructions import format_input
    from flaxgpt.distributed import is_primary
    from flaxgpt.files import write_json
    from flaxgpt.finetune.instruct import INSTRUCT, instruct_metadata
    from flaxgpt.training.evaluation import evaluate_metrics
    from flaxgpt.training.run_dir import RunDir

    s = {**_settings(args, INSTRUCT_DEFAULTS), "mask_instruction": bool(args.mask_instruction)}
    out = Path(args.out or "runs/instruct")
    ckpt = _resume_from(args, out, s)
    cfg, params, tok_name = _base_model(args, s["drop_rate"], out)
    tok = _run_tokenizer(tok_name, args, out)
    data = _instruct_data(s, tok, cfg.context_length)
    loaders = data["loaders"]
    _job_setup(args, out, loaders)
    cfg, labels, state, key, start, place = _train_state(s, cfg, params, jax.random.key(s["seed"]), ckpt, INSTRUCT,
                                                         args.multi)
    sizes = _sizes(state, labels)
    extra = {**instruct_metadata(s["mask_instruction"], int(tok.eot_token), data=s["data"]),
             **_lora_extra(s, state, _source(args))}
    _write_config(out, cfg, s, tok_name, extra)
    print(f"instruct: {_describe(sizes, s)}; "
          + " / ".join(f"{len(split)}" for split in data["splits"].values()) + " train / validation / test "
          f"records in {len(loaders['train'])} / {len(loaders['validation'])} / {len(loaders['test'])} batches of "
          f"{s['batch_size']}; out {out}")
    initial = None
    if ckpt is None:  # the book prints both losses of the pretrained model over 5 batches first
        initial = {n: evaluate_metrics(state, loaders[n], INSTRUCT, s["eval_iter"], place.get("shard_batch"))["loss"]
                   for n in ("train", "validation")}
        print(f"initial: train loss {initial['train']:.3f}, validation loss {initial['validation']:.3f}")
    t0 = time.perf_counter()
    result = _fit(s, state, loaders, key, start, out, tok_name, INSTRUCT, extra, (args, place), tokenizer=tok,
                  sample_tokens=s["sample_tokens"], start_context=format_input(data["splits"]["validation"][0]))
    if result is None:
        return 1
    final = {n: evaluate_metrics(result.state, loaders[n], INSTRUCT, s["eval_iter"], place.get("shard_batch"))["loss"]
             for n in ("train", "validation", "test")}
    with _write_errors(out):
        RunDir(out).plot()
        if is_primary():
            write_json(out / "results.json", {"initial_loss": initial, "loss": final, "updates": result.updates,
                                              "stopped": result.stopped, "time_s": round(time.perf_counter() - t0, 1),
                                              **sizes})
    adapters = _save_adapters(out, s, result.state, extra)
    print(f"{result.stopped} after {result.updates} updates in {time.perf_counter() - t0:.1f}s: loss "
          + ", ".join(f"{k} {v:.3f}" for k, v in final.items()) + f" (over {s['eval_iter']} batches)")
    print(f"wrote {out}/metrics.jsonl, loss.png, results.json{adapters}; responses with: flaxgpt respond --checkpoint {out} "
          "--data test")
    return _exit_status(result)
