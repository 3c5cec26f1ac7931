"""``flaxgpt finetune classify``: book chapter 6, a pretrained GPT fine-tuned as a text classifier.

Starts from GPT-2 weights (``--pretrained gpt2`` or a local folder), a ``flaxgpt train`` run
(``--checkpoint RUN``) or, for experiments, a fresh model (``--from-scratch``); swaps the head for a
``num_classes`` linear layer; trains the chosen parameters (``--trainable``) through the same training loop as
``flaxgpt train`` (checkpoints, exact ``--resume``, SIGINT/SIGTERM, NaN stop). Writes ``OUT/metrics.jsonl``
(loss and accuracy per evaluation), ``OUT/loss.png`` and ``OUT/accuracy.png`` (the book's figures 6.16 and
6.17), ``OUT/checkpoints/`` and ``OUT/results.json`` (final train / validation / test accuracy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from flaxgpt.cli import CLIError

__all__ = ["add_parser", "run"]

DEFAULTS: dict[str, Any] = {
    "data": "sms-spam",
    "num_classes": 2,
    "trainable": "last_block",
    "pool": "last",
    "epochs": 5,
    "max_steps": 0,
    "batch_size": 8,
    "lr": 5e-5,
    "weight_decay": 0.1,
    "eval_freq": 50,
    "eval_iter": 5,
    "checkpoint_every": 200,
    "keep_checkpoints": 3,
    "drop_rate": 0.0,
    "seed": 123,
}
SMS_LABELS = ("not spam", "spam")  # the book's classify_review answers


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("finetune", help="fine-tune a GPT (book chapter 6: classification)",
                       description="Fine-tune a pretrained GPT through flaxgpt's one training loop.")
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    c = tasks.add_parser("classify", help="a text classifier (book chapter 6)", description=__doc__,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DEFAULTS
    base = c.add_mutually_exclusive_group(required=True)
    base.add_argument("--pretrained", metavar="NAME|DIR", help="GPT-2 weights: gpt2, gpt2-medium, ... or a folder")
    base.add_argument("--checkpoint", metavar="RUN", help="a flaxgpt train run (or one of its checkpoints)")
    base.add_argument("--from-scratch", action="store_true",
                      help="a fresh model of flaxgpt train's default size (no pretraining: a baseline)")
    c.add_argument("--data", metavar="sms-spam|FILE",
                   help="'sms-spam' (the book's data, split 70/10/20 as the book) or a CSV/TSV with text and "
                   f"label columns, split the same way (default {d['data']})")
    c.add_argument("--num-classes", type=int, help=f"classes of a --data file (default {d['num_classes']})")
    c.add_argument("--trainable", help="'last_block' (the book: last block, final norm, head), 'head', 'all', or "
                   f"comma-separated path patterns such as 'trf_blocks_11/,out_head/' (default {d['trainable']})")
    c.add_argument("--pool", choices=("last", "last_nonpad"),
                   help="classify from the last position (the book) or each text's last real token")
    c.add_argument("--out", metavar="DIR", help="run directory (default runs/classify)")
    c.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    for flag, kind in (("epochs", int), ("max-steps", int), ("batch-size", int), ("lr", float),
                       ("weight-decay", float), ("eval-freq", int), ("eval-iter", int), ("checkpoint-every", int),
                       ("keep-checkpoints", int), ("drop-rate", float), ("seed", int)):
        c.add_argument(f"--{flag}", type=kind, help=f"default {d[flag.replace('-', '_')]}")
    c.set_defaults(func=run)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    s = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in DEFAULTS.items()}
    if "," in s["trainable"] or "/" in s["trainable"]:  # path patterns
        s["trainable"] = [p for p in s["trainable"].split(",") if p]
    for name in ("epochs", "batch_size", "eval_freq", "eval_iter", "keep_checkpoints"):
        if s[name] < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {s[name]}")
    return s


def _base_model(args: argparse.Namespace, drop_rate: float) -> tuple[Any, Any, str]:
    """(config, params, tokenizer name) of the model to fine-tune."""
    import jax

    from flaxgpt.cli.train import DEFAULT_MODEL, _tokenizer
    from flaxgpt.config import GPTConfig
    from flaxgpt.io.checkpoint import resolve_checkpoint
    from flaxgpt.io.pretrained import load_any
    from flaxgpt.nn.params import init_params

    if args.from_scratch:
        _, name = _tokenizer("auto")
        vocab = 50257 if name == "gpt2" else 257
        cfg = GPTConfig(vocab_size=vocab, **{**DEFAULT_MODEL, "drop_rate": drop_rate})
        return cfg, init_params(cfg, jax.random.key(0)), name
    source = args.checkpoint or args.pretrained
    cfg, params, fmt = load_any(source)
    name = resolve_checkpoint(source)[1].get("tokenizer", "gpt2") if fmt == "checkpoint" else "gpt2"
    if cfg.num_classes is not None:
        raise CLIError(f"{source} is already a classifier; start from a language model")
    return cfg.replace(drop_rate=drop_rate), params, name


def _data(s: dict[str, Any], tok: Any, context_length: int) -> dict[str, Any]:
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


def _state(s: dict[str, Any], cfg: Any, params: Any, tx_args: dict[str, Any], ckpt: Path | None) -> tuple:
    import jax

    from flaxgpt.finetune.classify import to_classifier
    from flaxgpt.finetune.trainable import label_params, partition_optimizer, trainable_patterns
    from flaxgpt.io.checkpoint import restore_checkpoint
    from flaxgpt.nn.model import GPTModel
    from flaxgpt.nn.params import convert_layout
    from flaxgpt.training.optim import make_optimizer
    from flaxgpt.training.run_dir import Position
    from flaxgpt.training.state import create_train_state

    head_key, key = jax.random.split(jax.random.key(s["seed"]))
    cfg, params = to_classifier(cfg, params, tx_args.pop("num_classes"), head_key)
    if cfg.scan_layers and s["trainable"] == "last_block":  # a label tree cannot split the layer axis
        cfg = cfg.replace(scan_layers=False)
        params = convert_layout(params, cfg)
    try:
        labels = label_params(params, trainable_patterns(s["trainable"], cfg.n_layers, cfg.scan_layers))
    except ValueError as e:
        raise CLIError(str(e)) from e
    tx = partition_optimizer(make_optimizer(s["lr"], weight_decay=s["weight_decay"]), labels)
    state = create_train_state(GPTModel(cfg), params, tx)
    if ckpt is None:
        return cfg, labels, state, key, None
    state, meta = restore_checkpoint(ckpt, state)
    print(f"resuming {meta['path']} (step {meta['step']}, epoch {meta['epoch'] + 1})")
    return cfg, labels, state, meta["key"], Position(meta["epoch"], meta["batch_index"], meta["tokens_seen"])


def _final_accuracies(state: Any, loaders: dict[str, Any], task: Any) -> dict[str, float]:
    from flaxgpt.training.evaluation import evaluate_metrics

    return {name: evaluate_metrics(state, loader, task, None, None)["accuracy"] for name, loader in loaders.items()}


def run(args: argparse.Namespace) -> int:
    from flaxgpt.cli.train import _write_errors
    from flaxgpt.files import write_json
    from flaxgpt.finetune.classify import ClassificationTask
    from flaxgpt.finetune.trainable import count_by_label
    from flaxgpt.io.checkpoint import latest_checkpoint
    from flaxgpt.text.tokenizers import get_tokenizer
    from flaxgpt.training.loop import NonFiniteLossError, fit
    from flaxgpt.training.progress import ProgressBar
    from flaxgpt.training.run_dir import RunDir

    s = _settings(args)
    out = Path(args.out or "runs/classify")
    ckpt = latest_checkpoint(out) if args.resume else None
    if args.resume and ckpt is None:
        raise CLIError(f"--resume: no checkpoint in {out}")
    cfg, params, tok_name = _base_model(args, s["drop_rate"])
    tok = get_tokenizer(tok_name)
    data = _data(s, tok, cfg.context_length)
    cfg, labels, state, key, start = _state(s, cfg, params, {"num_classes": data["num_classes"]}, ckpt)
    counts = count_by_label(state.params, labels)
    task = ClassificationTask(s["pool"])
    loaders = data["loaders"]
    classifier = {"max_length": data["max_length"], "pool": s["pool"], "pad_token_id": int(tok.eot_token),
                  "labels": list(SMS_LABELS) if s["data"] == "sms-spam" else None}
    with _write_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", {"model": cfg.to_dict(), "finetune": {**s, "trainable": s["trainable"]},
                                         "tokenizer": tok_name, "classifier": classifier})
    print(f"classifier: {counts['trainable']:,} trainable / {counts['frozen']:,} frozen params; "
          f"{len(loaders['train'])} / {len(loaders['validation'])} / {len(loaders['test'])} batches of "
          f"{s['batch_size']} (width {data['max_length']}); out {out}")
    total = s["epochs"] * len(loaders["train"]) if not s["max_steps"] else s["max_steps"]
    t0 = time.perf_counter()
    try:
        with ProgressBar(total, int(state.step), 1, start.tokens_seen if start else 0) as bar, _write_errors(out):
            result = fit(state, loaders["train"], loaders["validation"], key=key, num_epochs=s["epochs"],
                         eval_freq=s["eval_freq"], eval_iter=s["eval_iter"], max_steps=s["max_steps"] or None,
                         run_dir=out, checkpoint_every=s["checkpoint_every"], keep_checkpoints=s["keep_checkpoints"],
                         start=start, tokenizer_name=tok_name, task=task, callback=bar, sample_tokens=0,
                         checkpoint_extra={"classifier": classifier})
    except NonFiniteLossError as e:
        print(f"flaxgpt finetune: error: {e}", file=sys.stderr)
        return 1
    accuracies = _final_accuracies(result.state, loaders, task)
    with _write_errors(out):
        run_dir = RunDir(out)
        run_dir.plot(seen="Examples seen")
        run_dir.plot(metric="accuracy", seen="Examples seen")
        write_json(out / "results.json", {"accuracy": accuracies, "updates": result.updates,
                                          "stopped": result.stopped, "time_s": round(time.perf_counter() - t0, 1)})
    print(f"{result.stopped} after {result.updates} updates in {time.perf_counter() - t0:.1f}s: accuracy "
          + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracies.items()))
    print(f'wrote {out}/metrics.jsonl, loss.png, accuracy.png, results.json; classify with: flaxgpt classify '
          f'--checkpoint {out} "..."')
    return 130 if result.stopped == "SIGINT" else 143 if result.stopped == "SIGTERM" else 0
