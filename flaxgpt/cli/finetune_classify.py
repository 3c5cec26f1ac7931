"""``flaxgpt finetune classify`` (book chapter 6): the data, the classifier head and the accuracy report; the
options and the shared steps are in flaxgpt/cli/finetune.py and finetune_job.py."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from flaxgpt.cli import CLIError, write_errors
from flaxgpt.cli import finetune_job as job
from flaxgpt.cli.finetune import DEFAULTS, SMS_LABELS

__all__ = ["run_classify"]


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


def run_classify(args: argparse.Namespace) -> int:
    """``flaxgpt finetune classify`` (book chapter 6) after the processes have joined.

    Args:
      args: the parsed arguments (with ``args.multi``).

    Returns:
      The exit status (0; 1 after a non-finite loss; 130/143 after SIGINT/SIGTERM).
    """
    import jax

    from flaxgpt.distributed import is_primary
    from flaxgpt.files import write_json
    from flaxgpt.finetune.classify import ClassificationTask, to_classifier
    from flaxgpt.training.evaluation import evaluate_metrics
    from flaxgpt.training.run_dir import RunDir

    s = job.settings(args, DEFAULTS)
    out = Path(args.out or "runs/classify")
    ckpt = job.resume_from(args, out, s)
    cfg, params, tok_name = job.base_model(args, s["drop_rate"], out)
    tok = job.run_tokenizer(tok_name, args, out)
    data = _classify_data(s, tok, cfg.context_length)
    head_key, key = jax.random.split(jax.random.key(s["seed"]))
    cfg, params = to_classifier(cfg, params, data["num_classes"], head_key)
    task = ClassificationTask(s["pool"])
    loaders = data["loaders"]
    job.setup(args, out, loaders)
    cfg, labels, state, key, start, place = job.train_state(s, cfg, params, key, ckpt, task, args.multi)
    sizes = job.sizes(state, labels)
    classifier = {"max_length": data["max_length"], "pool": s["pool"], "pad_token_id": int(tok.eot_token),
                  "labels": list(SMS_LABELS) if s["data"] == "sms-spam" else None}
    extra = {"classifier": classifier, **job.lora_extra(s, state, job.source_name(args))}
    job.write_config(out, cfg, s, tok_name, extra)
    print(f"classifier: {job.describe(sizes, s)}; "
          f"{len(loaders['train'])} / {len(loaders['validation'])} / {len(loaders['test'])} batches of "
          f"{s['batch_size']} (width {data['max_length']}); out {out}")
    t0 = time.perf_counter()
    result = job.fit_run(s, state, loaders, key, start, out, tok_name, task, extra, (args, place))
    if result is None:
        return 1
    accuracies = {name: evaluate_metrics(result.state, loader, task, None, place.get("shard_batch"))["accuracy"]
                  for name, loader in loaders.items()}
    with write_errors(out):
        run_dir = RunDir(out)
        run_dir.plot(seen="Examples seen")
        run_dir.plot(metric="accuracy", seen="Examples seen")
        if is_primary():
            write_json(out / "results.json", {"accuracy": accuracies, "updates": result.updates,
                                              "stopped": result.stopped, "time_s": round(time.perf_counter() - t0, 1),
                                              **sizes})
    adapters = job.save_adapters(out, s, result.state, extra)
    print(f"{result.stopped} after {result.updates} updates in {time.perf_counter() - t0:.1f}s: accuracy "
          + ", ".join(f"{k} {100 * v:.2f}%" for k, v in accuracies.items()))
    print(f'wrote {out}/metrics.jsonl, loss.png, accuracy.png, results.json{adapters}; classify with: flaxgpt classify '
          f'--checkpoint {out} "..."')
    return job.exit_status(result)
