#!/usr/bin/env bash
# ft-prog vs transformers + PEFT on one GPU, Llama 3.2 1B shape (random weights), bf16, LoRA r=8 on q/v (also compiled),
# batch 4 x 2048 tokens (packed rows), plus full fine-tuning, checkpointing, QLoRA, the realistic SFT
# workload (seq 2048, packing), generation, and (last) ft-prog at the Llama 3.2 3B LoRA setting whose peak memory
# torchtune publishes (8.5 GiB). Finishes in under 10 minutes on an H100/H200-class GPU:
# a 500 s budget skips (and reports) the cases that would end later. Results: benchmarks/results/gpu-<time>/.
#
#   bash benchmarks/gpu.sh                 # extra options go to `python -m benchmarks`, e.g. --rounds 2
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
exec timeout 595 "$PYTHON" -m benchmarks --preset gpu --name "gpu-$(date +%Y%m%d-%H%M%S)" --budget 500 \
    --timeout 300 "$@"
