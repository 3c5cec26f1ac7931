#!/usr/bin/env bash
# flaxgpt on one GPU in under 5 minutes: 124M bf16 train step at T=1024 with flash attention (tokens/s, MFU),
# the 1.5B step if it fits, batch-1 decode; one table (see benchmarks/gpu_check.py for the details).
#
#   pip install "jax[cuda12]" -e .   # the only set-up
#   bash benchmarks/gpu_check.sh [--batch 16] [--skip-xl]
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 290 python benchmarks/gpu_check.py "$@"
