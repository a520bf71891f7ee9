#!/usr/bin/env bash
# One GPU visit: issue 12's photo pipeline first (data bench, device tests, train_dino.py on a photo folder against
# the same step fed pre-made tensors), then the DINO step benchmark, the kernel tests compiled and the kernel
# benchmarks (the fused add + LayerNorm, bias + GELU and DINO loss each with its own table). Tables land in $OUT
# (default: ./out), each written as soon as it is done.
# Usage (on the GPU machine, from the repository root):  bash bench/gpu_check.sh   (~9 min: run with timeout_s 600)
# FULL=1 bash bench/gpu_check.sh adds the torch.compile yardstick and the attention tile sweep (~6 min more).
# Most important first, each step under its own timeout, so that a slow step costs only itself.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/log.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/log.txt"
# 0a. Issue 12, the data pipeline on 512 ImageNet-sized photos (minivit.photo_folder): the official per-image
#     Pillow yardstick, our decode per core and with 16 workers, MultiCropAugment on the GPU at batch 128, both.
timeout 150 python3 -m minivit.bench --only data --out "$OUT/data.md" 2>&1 | tee -a "$OUT/log.txt" | tail -14
# 0b. Same seed, same crops on cuda as on the CPU (and the rest of the crop tests, now on the GPU too).
timeout 60 python3 -m pytest -q tests/test_augment.py -k "device or mixed or pil or whole" 2>&1 | tail -3 \
    | tee -a "$OUT/log.txt"
# 0c. train_dino.py fed by a photo folder (decode in 14 workers, crops on the GPU) against the step fed pre-made
#     tensors (1330 img/s for ViT-S/16 b128 in the DINO table): img/s from its progress lines, ViT-S/16 and S/8.
timeout 80 python3 -m minivit.photo_folder /tmp/photos --images 2560 --classes 8 --processes 16 | tee -a "$OUT/log.txt"
for arch_batch in "vit_s16 128" "vit_s8 32"; do set -- $arch_batch
    timeout 90 python3 train_dino.py --arch "$1" --batch_size_per_gpu "$2" --data /tmp/photos --knn_data none \
        --epochs 1 --iters_per_epoch 20 --log_every 5 --num_workers 14 --output_dir "/tmp/dino_photos_$1" 2>&1 \
        | grep -E "img/s|error" | tail -3 | tee -a "$OUT/photos_e2e.txt"
done
# 1. The DINO step (issue 5's table): ours vs plain PyTorch, ViT-S/16 b128 and ViT-S/8 b32, 2x224 + 8x96 crops.
timeout 170 python3 -m minivit.bench --only dino --out "$OUT/dino.md" 2>&1 | tee -a "$OUT/log.txt"
# 2. The same kernel tests as CI, now compiled (8 processes share the compiling; pytest-xdist is on that machine).
timeout 150 python3 -m pytest -q -n 8 --maxfail=5 tests/test_attention.py tests/test_patch_embed.py \
    tests/test_layernorm.py tests/test_bias_gelu.py tests/test_dino_loss.py \
    tests/test_vit.py::test_triton_path_matches_reference_path 2>&1 \
    | tee "$OUT/tests.log" | tail -25
# 3. Kernels against every SDPA backend and conv2d; 3b. the fused memory-bound kernels (add + LayerNorm, bias + GELU,
# the DINO loss) against the unfused ops and torch.compile of them, GB/s vs the copy ceiling (bench/NOTES.md sec. 6).
timeout 70 python3 -m kernels.bench --only attention --out "$OUT/kernels.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
timeout 30 python3 -m kernels.bench --only patch_embed --out "$OUT/kernels_patch.md" 2>&1 | tee -a "$OUT/log.txt" \
    | tail -3
for k in layernorm bias_gelu dino_loss; do
    timeout 45 python3 -m kernels.bench --only $k --out "$OUT/kernels_$k.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
done
if [ "${FULL:-0}" = 1 ]; then
# 5. train_dino.py --compile: both backbones under torch.compile (inductor fuses LayerNorm, GELU, residual adds).
timeout 200 python3 -m minivit.bench --only dino --builds ours --compile --iters 20 --out "$OUT/dino_compile.md" \
    2>&1 | tee -a "$OUT/log.txt" | tail -12
# 6. The attention tiles, swept (how kernels/attention.py's _tiles were chosen; recorded in bench/NOTES.md sec. 5).
timeout 170 python3 bench/tune_attention.py 2>&1 | tee "$OUT/tune.md" | tail -14
fi
cat "$OUT/data.md" "$OUT/photos_e2e.txt" "$OUT/dino.md" "$OUT"/kernels*.md 2>/dev/null
