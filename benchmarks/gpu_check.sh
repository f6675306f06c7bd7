#!/usr/bin/env bash
# Paper-scale check on one GPU, offline, under 8 minutes: OPT-6.7B-shaped random-init LLM in bf16
# + ViT-L-14 (QuickGELU), training step vs floor, tokens/s, peak memory, MFU, evaluation
# throughput (benchmarks/gpu_check.py), then the memory plan of the seed's command for 4 GPUs.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#
# Installs the requirements into .venv-gpu/ unless torch with CUDA is importable already.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1
if ! python -c "import torch, transformers, open_clip; assert torch.cuda.is_available()" 2>/dev/null; then
    python3 -m venv .venv-gpu && . .venv-gpu/bin/activate
    python -m pip install -q -r requirements.txt
    python -m pip install -q --no-deps -r requirements-nodeps.txt
fi
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
timeout 420 python benchmarks/gpu_check.py "$@"
python main.py --opt-version facebook/opt-6.7b --visual-model openai/clip-vit-large-patch14 \
    --batch-size 120 --precision bf16 --multiprocessing-distributed --nprocs 4 --dry-run
