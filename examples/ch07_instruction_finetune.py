"""Chapter 7, "Fine-tuning to follow instructions": GPT-2 medium fine-tuned on 1,100 instruction/response pairs,
end to end.

The book's pipeline: instruction-data.json split 85/10/5 (935 train / 110 test / 55 validation), each record
formatted with the Alpaca prompt, batched by ``custom_collate_fn`` (end-of-text padding, targets shifted by one,
padding targets after the first set to -100) in batches of 8; GPT-2 medium (355M) trained in full with
AdamW(lr=5e-5, weight_decay=0.1) for 2 epochs, evaluating 5 batches every 5 steps; then greedy responses to
the test set (EOS 50256, at most 256 new tokens) written to instruction-data-with-response.json, and scored
0-100 by Llama 3 through Ollama. The book reports initial losses 3.826 / 3.762 (train / validation), final
0.297 / 0.659 after 2 epochs, and an average score of 50.32.

    python examples/ch07_instruction_finetune.py --pretrained gpt2-medium       # online, or a local HF folder
    python examples/ch07_instruction_finetune.py --checkpoint runs/pydoc-bpe    # offline: a flaxgpt train run
    python examples/ch07_instruction_finetune.py --pretrained gpt2-medium --score http://localhost:11434/api/chat

flaxgpt pads each batch's width up to a multiple of 16 (``--bucket``; 0 gives the book's exact widths) with
ignored targets: the loss is the same, and the 232 training steps compile 3 programs instead of one per width.
The same run from the command line: ``flaxgpt finetune instruct --pretrained gpt2-medium --out runs/sft``, then
``flaxgpt respond --checkpoint runs/sft --data test`` and ``flaxgpt score``. A model whose context is shorter
than a prompt (the prompt preamble alone is ~40 GPT-2 tokens, ~110 bytes) cannot answer it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import jax

from flaxgpt.data.instructions import book_split, format_input, instruction_loaders, load_instruction_data
from flaxgpt.finetune.instruct import INSTRUCT, instruct_metadata
from flaxgpt.finetune.respond import generate_responses, write_responses
from flaxgpt.io.checkpoint import resolve_checkpoint
from flaxgpt.io.pretrained import load_any
from flaxgpt.nn.model import GPTModel
from flaxgpt.text.tokenizers import get_tokenizer
from flaxgpt.training.evaluation import evaluate_metrics
from flaxgpt.training.loop import fit
from flaxgpt.training.optim import make_optimizer
from flaxgpt.training.plotting import plot_metrics
from flaxgpt.training.state import create_train_state

BOOK_LOSSES = {"initial": (3.826, 3.762), "final": (0.297, 0.659)}  # (train, validation), GPT-2 medium
BOOK_SCORE = 50.32


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    base = parser.add_mutually_exclusive_group(required=True)
    base.add_argument("--pretrained", help="gpt2-medium (downloads once) or a Hugging Face folder")
    base.add_argument("--checkpoint", help="a flaxgpt train run")
    parser.add_argument("--data", help="a JSON/JSONL file of instruction records (default: the book's)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many updates (a quick look)")
    parser.add_argument("--bucket", type=int, default=16, help="batch-width multiple; 0: the book's exact widths")
    parser.add_argument("--mask-instruction", action="store_true", help="the book's exercise 7.2")
    parser.add_argument("--responses", type=int, default=None, help="answer only the first N test records")
    parser.add_argument("--score", metavar="URL", help="an Ollama /api/chat URL: score the responses with llama3")
    parser.add_argument("--out", default="runs/ch07-sft", help="run folder (metrics, checkpoints, figure, responses)")
    return parser.parse_args()


def _model_and_tokenizer(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    source = args.pretrained or args.checkpoint
    cfg, params, fmt = load_any(source)
    tok = get_tokenizer(resolve_checkpoint(source)[1].get("tokenizer", "gpt2") if fmt == "checkpoint" else "gpt2")
    return cfg.replace(drop_rate=0.0), params, tok  # the book fine-tunes with drop_rate 0.0


def _respond(args: argparse.Namespace, state: Any, test_data: list[dict], tok: Any, out: Path) -> list[dict]:
    """The book's section 7.7: greedy responses (EOS = end-of-text), printed for three records and saved."""
    entries = test_data[: args.responses] if args.responses else test_data
    t0 = time.perf_counter()
    responses = generate_responses(state.model, state.params, entries, tok, max_new_tokens=256, batch_size=8)
    print(f"{len(entries)} responses in {time.perf_counter() - t0:.1f}s")
    for entry, response in list(zip(entries, responses))[:3]:
        print(format_input(entry))
        print(f"\nCorrect response:\n>> {entry['output']}")
        print(f"\nModel response:\n>> {response.strip()}")
        print("-------------------------------------")
    path = write_responses(entries, responses, out / "instruction-data-with-response.json")
    print(f"wrote {path}")
    return [{**e, "model_response": r} for e, r in zip(entries, responses)]


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    cfg, params, tok = _model_and_tokenizer(args)
    data = load_instruction_data(args.data)
    splits = book_split(data)  # 935 / 55 / 110 for the book's 1,100 records
    print({k: len(v) for k, v in splits.items()}, "records; example prompt:\n" + format_input(data[50]))
    loaders = instruction_loaders(splits, tok, batch_size=8, seed=123, pad_token_id=tok.eot_token,
                                  allowed_max_length=cfg.context_length, bucket=args.bucket or None,
                                  mask_instruction=args.mask_instruction)
    state = create_train_state(GPTModel(cfg), params, make_optimizer(5e-5, weight_decay=0.1))
    initial = [evaluate_metrics(state, loaders[n], INSTRUCT, 5)["loss"] for n in ("train", "validation")]
    print(f"Training loss: {initial[0]:.3f}  Validation loss: {initial[1]:.3f}   (book, GPT-2 medium: "
          f"{BOOK_LOSSES['initial'][0]} / {BOOK_LOSSES['initial'][1]})")

    t0 = time.perf_counter()
    result = fit(state, loaders["train"], loaders["validation"], key=jax.random.key(123), num_epochs=args.epochs,
                 max_steps=args.max_steps, eval_freq=5, eval_iter=5, task=INSTRUCT, run_dir=out,
                 tokenizer=tok, start_context=format_input(splits["validation"][0]), sample_tokens=50,
                 checkpoint_extra=instruct_metadata(args.mask_instruction, int(tok.eot_token)))
    last = result.history[-1]
    print(f"Training completed in {(time.perf_counter() - t0) / 60:.2f} minutes: train loss {last['train_loss']:.3f}, "
          f"val loss {last['val_loss']:.3f}   (book: {BOOK_LOSSES['final'][0]} / {BOOK_LOSSES['final'][1]})")
    plot_metrics(result.history, out / "loss.png", "loss")  # the book's figure 7.17

    scored = _respond(args, result.state, splits["test"], tok, out)
    if args.score:
        from flaxgpt.finetune.score import score_responses

        scores = score_responses(scored, url=args.score, progress=True)
        print(f"Number of scores: {len(scores.scores)} of {len(scored)}")
        print(f"Average score: {scores.average:.2f}   (book: {BOOK_SCORE})")
    else:
        print(f"score with a local Ollama server (llama3): flaxgpt score {out / 'instruction-data-with-response.json'}")


if __name__ == "__main__":
    main()
