#!/usr/bin/env bash
# ResNet18 training throughput on one CUDA GPU: model-bound (synthetic batch on the GPU) and end to end
# (JPEGs through the loader and `python train.py trainer=gpu`), for fp32, bf16-mixed and
# channels_last + bf16 + compile, printed as one markdown table. Paste it into the README's Performance section.
#
#   bash bench/gpu.sh              # full size: batch 256, 224 px (a few minutes, most of it compiling)
#   bash bench/gpu.sh --quick      # toy sizes: checks that everything runs
#   bash bench/gpu.sh --skip-e2e   # model-bound figures only
#
# PYTHON overrides the interpreter (default: .venv/bin/python, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu.sh: no CUDA GPU visible to $PYTHON (torch.cuda.is_available() is False)." >&2
    echo "Run it on a machine with an NVIDIA GPU and a CUDA build of torch; for CPU figures run 'make bench'." >&2
    exit 2
fi
"$PYTHON" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB")'
exec "$PYTHON" bench/_gpu.py "$@"
