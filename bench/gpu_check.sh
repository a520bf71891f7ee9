#!/usr/bin/env bash
# One GPU visit: the kernel tests compiled, then every benchmark; tables land in $OUT (default: ./out).
# Usage (on the GPU machine, from the repository root):  bash bench/gpu_check.sh   (~9 min: run with timeout_s 600)
# DINO first: the issue-6 table is written before the others, and a timeout keeps every finished table.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
# Same tests as CI, now compiled on the GPU (kernels first: they matter most here).
timeout 180 python3 -m pytest -x -q tests/test_attention.py tests/test_patch_embed.py 2>&1 | tee "$OUT/tests.log"
timeout 120 python3 -m kernels.bench --out "$OUT/kernels.md" 2>&1 | tee "$OUT/kernels.log"
timeout 240 python3 -m minivit.bench --only dino,vit,resnet,loader --out "$OUT/models.md" 2>&1 | tee "$OUT/models.log"
cat "$OUT/kernels.md" "$OUT/models.md" 2>/dev/null
