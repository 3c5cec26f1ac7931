"""``flaxgpt finetune instruct`` (book chapter 7): the instruction data, the initial and final losses and the
per-epoch sample; the options and the shared steps are in flaxgpt/cli/finetune.py and finetune_job.py."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from flaxgpt.cli import CLIError, write_errors
from flaxgpt.cli import finetune_job as job
from flaxgpt.cli.finetune import INSTRUCT_DEFAULTS

__all__ = ["run_instruct"]


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


def run_instruct(args: argparse.Namespace) -> int:
    """``flaxgpt finetune instruct`` (book chapter 7) after the processes have joined.

    Args:
      args: the parsed arguments (with ``args.multi``).

    Returns:
      The exit status (0; 1 after a non-finite loss; 130/143 after SIGINT/SIGTERM).
    """
    import jax

    from flaxgpt.data.instructions import format_input
    from flaxgpt.distributed import is_primary
    from flaxgpt.files import write_json
    from flaxgpt.finetune.instruct import INSTRUCT, instruct_metadata
    from flaxgpt.training.evaluation import evaluate_metrics
    from flaxgpt.training.run_dir import RunDir

    s = {**job.settings(args, INSTRUCT_DEFAULTS), "mask_instruction": bool(args.mask_instruction)}
    out = Path(args.out or "runs/instruct")
    ckpt = job.resume_from(args, out, s)
    cfg, params, tok_name = job.base_model(args, s["drop_rate"], out)
    tok = job.run_tokenizer(tok_name, args, out)
    data = _instruct_data(s, tok, cfg.context_length)
    loaders = data["loaders"]
    job.setup(args, out, loaders)
    cfg, labels, state, key, start, place = job.train_state(s, cfg, params, jax.random.key(s["seed"]), ckpt, INSTRUCT,
                                                         args.multi)
    sizes = job.sizes(state, labels)
    extra = {**instruct_metadata(s["mask_instruction"], int(tok.eot_token), data=s["data"]),
             **job.lora_extra(s, state, job.source_name(args))}
    job.write_config(out, cfg, s, tok_name, extra)
    print(f"instruct: {job.describe(sizes, s)}; "
          + " / ".join(f"{len(split)}" for split in data["splits"].values()) + " train / validation / test "
          f"records in {len(loaders['train'])} / {len(loaders['validation'])} / {len(loaders['test'])} batches of "
          f"{s['batch_size']}; out {out}")
    initial = None
    if ckpt is None:  # the book prints both losses of the pretrained model over 5 batches first
        initial = {n: evaluate_metrics(state, loaders[n], INSTRUCT, s["eval_iter"], place.get("shard_batch"))["loss"]
                   for n in ("train", "validation")}
        print(f"initial: train loss {initial['train']:.3f}, validation loss {initial['validation']:.3f}")
    t0 = time.perf_counter()
    result = job.fit_run(s, state, loaders, key, start, out, tok_name, INSTRUCT, extra, (args, place), tokenizer=tok,
                  sample_tokens=s["sample_tokens"], start_context=format_input(data["splits"]["validation"][0]))
    if result is None:
        return 1
    final = {n: evaluate_metrics(result.state, loaders[n], INSTRUCT, s["eval_iter"], place.get("shard_batch"))["loss"]
             for n in ("train", "validation", "test")}
    with write_errors(out):
        RunDir(out).plot()
        if is_primary():
            write_json(out / "results.json", {"initial_loss": initial, "loss": final, "updates": result.updates,
                                              "stopped": result.stopped, "time_s": round(time.perf_counter() - t0, 1),
                                              **sizes})
    adapters = job.save_adapters(out, s, result.state, extra)
    print(f"{result.stopped} after {result.updates} updates in {time.perf_counter() - t0:.1f}s: loss "
          + ", ".join(f"{k} {v:.3f}" for k, v in final.items()) + f" (over {s['eval_iter']} batches)")
    print(f"wrote {out}/metrics.jsonl, loss.png, results.json{adapters}; responses with: flaxgpt respond --checkpoint {out} "
          "--data test")
    return job.exit_status(result)
