#!/usr/bin/env bash
# ft-prog vs transformers + PEFT on one GPU, Llama 3.2 1B shape (random weights), bf16, LoRA r=8 on q/v (also compiled),
# batch 4 x 2048 tokens (packed rows), plus full fine-tuning, checkpointing, QLoRA, issue 20's techniques (full
# fine-tuning with fused projections and with the optimizer in the backward on int8 moments, LoRA with activation
# offloading under checkpointing; each against transformers' case without it), the realistic SFT workload (seq
# 2048, packing: flex_attention over a block mask), generation, and (last) ft-prog at the Llama 3.2 3B LoRA
# setting whose peak memory torchtune publishes (8.5 GiB). Finishes in under 10 minutes on an H100/H200-class
# GPU: a 480 s budget skips (and reports) the cases that would end later. Results: benchmarks/results/gpu-<time>/.
#
#   bash benchmarks/gpu.sh                 # extra options go to `python -m benchmarks`, e.g. --rounds 2
#
# On a machine without network (the project's lent GPU machine), wheels of the missing packages in .whl/
# (benchmarks/README.md, "GPU machine") are installed to /tmp/site first, and ft-prog itself is installed
# editable without fetching anything when it does not import yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$PYTHON" -c "import ftprog.core" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e .
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# versions, or why a package does not import (QLoRA then fails alone; the rest runs)
"$PYTHON" - <<'PY' || true
import importlib
for name in ("torch", "transformers", "peft", "torchao", "orjson", "ftprog.core"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "ok"))
    except Exception as e:
        print(name, "does not import:", type(e).__name__, e)
PY
exec timeout 570 "$PYTHON" -m benchmarks --preset gpu --name "gpu-$(date +%Y%m%d-%H%M%S)" --budget 480 \
    --timeout 300 "$@"
