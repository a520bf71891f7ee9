#!/usr/bin/env bash
# One GPU visit: the DINO step benchmark, the kernel tests compiled, the kernel and loader benchmarks, then the
# torch.compile yardstick. Tables land in $OUT (default: ./out), each written as soon as it is done.
# Usage (on the GPU machine, from the repository root):  bash bench/gpu_check.sh   (step 0 alone ~7 min; the
# rest ~9 min more: run it with timeout_s 600 and expect step 0 first)
# Most important first, each step under its own timeout, so that a slow step costs only itself.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/log.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/log.txt"
# 0. Issue 13, the GPU proof (~7 min, first because it is owed first): the offline GPU preset of train_dino.py
#    (DINO ViT-S/8 on the plain shapes, ~3-5 min with its k-NN and both baselines), a ViT-S/8 trained with labels
#    for the same wall time, then the attention masks' Jaccard (DINO Table 4), copy detection and ViT-vs-ResNet with
#    the learned weights next to random init. Prints the README table; everything lands in $OUT/issue13.
R="$OUT/issue13"; mkdir -p "$R"
timeout 330 python3 train_dino.py --arch vit_s8 --num_workers 4 --output_dir "$R/dino" 2>&1 | tee "$R/dino.log" \
    | grep -v "^ep "
DINO_S=$(python3 -c "import json; print(int(json.loads(open('$R/dino/log.jsonl').readlines()[-1])['time']))")
SUP="--data shapes_plain --arch vit_s8 --patch_size 8 --image_size 64 --load_size 64 --crop_scale 0.4 --hflip \
     --batch_size 128 --num_workers 4"
timeout 60 python3 train_vit.py $SUP --epochs 1 --warmup_epochs 0 --output_dir "$R/sup_probe" > "$R/sup_probe.log" 2>&1
SUP_EPOCHS=$(python3 -c "import json; r = json.load(open('$R/sup_probe/results.json'));
print(max(2, round($DINO_S * r['train_images_per_s'] / r['train_images'])))")  # the same wall time as DINO's
echo "supervised: $SUP_EPOCHS epochs for DINO's $DINO_S s" | tee -a "$R/dino.log"
timeout 360 python3 train_vit.py $SUP --epochs "$SUP_EPOCHS" --warmup_epochs 1 --eval_every "$SUP_EPOCHS" \
    --output_dir "$R/sup" 2>&1 | tee "$R/sup.log" | tail -3
W="dino=$R/dino/teacher_backbone.pth supervised=$R/sup/checkpoint.pt random=none"
timeout 60 python3 -m minivit.segmentation --arch vit_s8 --data shapes_plain --weights $W --output_dir "$R/seg" \
    2>&1 | tail -8
timeout 90 python3 -m minivit.copydetect --arch vit_s8 --data shapes_plain --weights $W --output_dir "$R/copy" \
    2>&1 | tail -8
COMMON="--image_size 64 --load_size 64 --crop_scale 0.4 --hflip --batch_size 128 --num_workers 4 --warmup_epochs 1"
timeout 150 python3 -m minivit.compare --data shapes_plain --epochs 3 --output_dir "$R/compare" --common_args "$COMMON" \
    --vit_args "--arch vit_s8 --patch_size 8 --pretrained $R/dino/teacher_backbone.pth" \
    --resnet_args "--arch resnet18 --small_stem" 2>&1 | tail -8
python3 - "$R" <<'PY'
import json, sys
R = sys.argv[1]
log = [json.loads(line) for line in open(f"{R}/dino/log.jsonl")]
sup = json.load(open(f"{R}/sup/results.json"))
print("| ViT-S/8 on shapes_plain (one GPU) | k-NN top-1 (k=20) | test top-1 | wall time |\n|---|---:|---:|---:|")
print(f"| DINO teacher, train_dino.py GPU preset | {log[-1]['knn_top1']:.1f}% | | {log[-1]['time'] / 60:.1f} min |")
print(f"| random init | {log[0]['knn_top1']:.1f}% | | |\n| raw pixels | {log[0]['knn_raw_pixels']:.1f}% | | |")
print(f"| supervised (labels), train_vit.py | | {sup['test_top1']:.1f}% | {sup['train_seconds'] / 60:.1f} min |")
PY
cat "$R/seg/report.md" "$R/copy/report.md" "$R/compare/report.md" 2>/dev/null
# 1. The DINO step (issue 5's table): ours vs plain PyTorch, ViT-S/16 b128 and ViT-S/8 b32, 2x224 + 8x96 crops.
timeout 170 python3 -m minivit.bench --only dino --out "$OUT/dino.md" 2>&1 | tee -a "$OUT/log.txt"
# 2. The same kernel tests as CI, now compiled (8 processes share the compiling; pytest-xdist is on that machine).
timeout 150 python3 -m pytest -q -n 8 --maxfail=5 tests/test_attention.py tests/test_patch_embed.py 2>&1 \
    | tee "$OUT/tests.log" | tail -25
# 3. Kernels against every SDPA backend and conv2d; 4. the input pipeline (decode + multi-crop on the GPU).
timeout 70 python3 -m kernels.bench --out "$OUT/kernels.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
timeout 60 python3 -m minivit.bench --only loader --out "$OUT/loader.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
# 5. train_dino.py --compile: both backbones under torch.compile (inductor fuses LayerNorm, GELU, residual adds).
timeout 200 python3 -m minivit.bench --only dino --builds ours --compile --iters 20 --out "$OUT/dino_compile.md" \
    2>&1 | tee -a "$OUT/log.txt" | tail -12
# 6. The attention tiles, swept (how kernels/attention.py's _tiles were chosen).
timeout 170 python3 bench/tune_attention.py 2>&1 | tee "$OUT/tune.md" | tail -14
cat "$OUT/dino.md" "$OUT/kernels.md" "$OUT/loader.md" 2>/dev/null
