#!/usr/bin/env bash
# One GPU visit: the DINO step benchmark, the kernel tests compiled, the kernel and loader benchmarks (the fused
# add + LayerNorm, bias + GELU and DINO loss each with its own table), then the torch.compile yardstick. Tables land
# in $OUT (default: ./out), each written as soon as it is done.
# Usage (on the GPU machine, from the repository root):  bash bench/gpu_check.sh   (~9 min: run with timeout_s 600)
# Most important first, each step under its own timeout, so that a slow step costs only itself.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/log.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/log.txt"
# 1. The DINO step (issue 5's table): ours vs plain PyTorch, ViT-S/16 b128 and ViT-S/8 b32, 2x224 + 8x96 crops.
timeout 170 python3 -m minivit.bench --only dino --out "$OUT/dino.md" 2>&1 | tee -a "$OUT/log.txt"
# 2. The same kernel tests as CI, now compiled (8 processes share the compiling; pytest-xdist is on that machine).
timeout 150 python3 -m pytest -q -n 8 --maxfail=5 tests/test_attention.py tests/test_patch_embed.py \
    tests/test_layernorm.py tests/test_bias_gelu.py tests/test_dino_loss.py \
    tests/test_vit.py::test_triton_path_matches_reference_path 2>&1 \
    | tee "$OUT/tests.log" | tail -25
# 3. Kernels against every SDPA backend and conv2d; 3b. the fused memory-bound kernels (add + LayerNorm, bias + GELU,
# the DINO loss) against the unfused ops and torch.compile of them, GB/s vs the copy ceiling (bench/NOTES.md sec. 6);
# 4. the input pipeline (decode + multi-crop on the GPU).
timeout 70 python3 -m kernels.bench --only attention --out "$OUT/kernels.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
timeout 30 python3 -m kernels.bench --only patch_embed --out "$OUT/kernels_patch.md" 2>&1 | tee -a "$OUT/log.txt" \
    | tail -3
for k in layernorm bias_gelu dino_loss; do
    timeout 45 python3 -m kernels.bench --only $k --out "$OUT/kernels_$k.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
done
timeout 60 python3 -m minivit.bench --only loader --out "$OUT/loader.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
# 5. train_dino.py --compile: both backbones under torch.compile (inductor fuses LayerNorm, GELU, residual adds).
timeout 200 python3 -m minivit.bench --only dino --builds ours --compile --iters 20 --out "$OUT/dino_compile.md" \
    2>&1 | tee -a "$OUT/log.txt" | tail -12
# (The attention tile sweep, python3 bench/tune_attention.py, ~170 s, is out of this visit: its result is recorded in
# bench/NOTES.md section 5 and kernels/attention.py's _tiles; run it again when the attention kernels change.)
cat "$OUT/dino.md" "$OUT"/kernels*.md "$OUT/loader.md" 2>/dev/null
