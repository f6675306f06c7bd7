#!/usr/bin/env bash
# The real path on one GPU, offline, under 8 minutes on an H100: main.py itself, launched by
# torchrun (NCCL, DDP over one process), loading a local folder of a random-init OPT-6.7B-shaped
# LLM through from_pretrained(device_map=...) as a hub snapshot would load, building the CLIP
# ViT-L/14 feature cache (bf16 autocast) of a synthetic CC3M-format set, then a few hundred
# training steps; then the step-vs-floor, MFU and memory figures (benchmarks/gpu_check.py) and
# the seed command's --dry-run plan for this GPU.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#
# Needs the project installed (pip install -r requirements.txt; torch for your GPU: README);
# installs nothing and reaches no hub. Work files (~14 GB: the LLM folder) go to $GPU_CHECK_DIR
# (default /tmp/unimur-gpu-check) and are reused by later runs.
# Smoke run of the script itself on a CPU (tiny shapes, gloo): GPU_CHECK_SMOKE=1 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
SMOKE=${GPU_CHECK_SMOKE:-0}
WORK=${GPU_CHECK_DIR:-/tmp/unimur-gpu-check$([ "$SMOKE" = 1 ] && echo -smoke)}
if [ "$SMOKE" = 1 ]; then
    LLM=tiny-opt CLIP=ViT-B-32-quickgelu ROWS=48 VAL_ROWS=16 STEPS=${STEPS:-6} BATCH=8 WORKERS=0
    CHECK=(--device cpu --llm tiny-opt --visual-model tiny-clip --batch-size 8 --repeats 2 --eval-queries 4)
else
    LLM=facebook/opt-6.7b CLIP=ViT-L-14-quickgelu ROWS=3000 VAL_ROWS=120 STEPS=${STEPS:-300} BATCH=30 WORKERS=8
    CHECK=(--repeats 10)
    if ! "$PY" -c "import torch, transformers, open_clip, accelerate; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "error: gpu_check.sh needs a CUDA GPU and the project's requirements (torch with CUDA, transformers," \
             "open_clip_torch, accelerate): pip install -r requirements.txt, torch for your GPU as the README says" >&2
        exit 1
    fi
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv || true
fi
start=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - start ))s] $*"; }

say "inputs in $WORK (LLM $LLM, CLIP $CLIP, $ROWS rows)"
timeout 240 "$PY" benchmarks/gpu_check_setup.py --out "$WORK" --llm "$LLM" --clip "$CLIP" --rows "$ROWS" --val-rows "$VAL_ROWS"

say "main.py under torchrun: $STEPS steps of batch $BATCH, bf16, NCCL"
rm -rf "$WORK/runs/check" "$WORK/syn/dataset/.feature_cache"  # the cache build is part of the check
timeout 300 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 main.py \
    --dist-backend nccl --opt-version "$WORK/llm" --visual-model "$CLIP:$WORK/clip.pt" \
    --dataset_dir "$WORK/syn/dataset" --image-dir "$WORK/syn/images" \
    --log-base-dir "$WORK/runs" --exp_name check --batch-size "$BATCH" --val-batch-size "$BATCH" \
    --epochs 1 --steps-per-epoch "$STEPS" --val-steps-per-epoch 2 --precision bf16 --print-freq 50 \
    -j "$WORKERS" 2>&1 | grep -v "it/s\]" | tail -n 25
"$PY" - "$WORK/runs/check" <<'PYEOF'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if r["split"] == "train"]
cache = json.loads((run.parents[1] / "syn/dataset/.feature_cache/cc3m_train.json").read_text())
print(f"main.py: {train[-1]['step']} steps, loss {train[0]['loss']:.3f} -> {train[-1]['loss']:.3f}, "
      f"{train[-1]['samples_per_s']:.1f} samples/s (the epoch so far); "
      f"feature cache: {cache['num_rows']} rows in {cache['build_seconds']} s "
      f"({cache['num_rows'] / max(cache['build_seconds'], 1e-9):.0f} images/s, decoding included)")
PYEOF

say "step vs floor, MFU, peak memory (benchmarks/gpu_check.py)"
timeout 200 "$PY" benchmarks/gpu_check.py "${CHECK[@]}"

say "the seed command's plan on 4 GPUs like this one"
"$PY" main.py --opt-version facebook/opt-6.7b --visual-model openai/clip-vit-large-patch14 \
    --batch-size 120 --precision bf16 --multiprocessing-distributed --nprocs 4 --dry-run || true
say "done"
