#!/usr/bin/env bash
# One GPU visit, in parts, most important first; each step under its own timeout, so a slow step costs only itself.
# Tables land in $OUT (default: ./out), each written as soon as it is done. A visit has 15 minutes of device time
# and one call at most 10, so run the parts as two calls (from the repository root, timeout_s 600 each):
#   bash bench/gpu_check.sh photos step kernels   # issue 12's pipeline, the DINO step, the kernel tests (~9 min)
#   bash bench/gpu_check.sh proof                 # issue 13's GPU proof: learned DINO vs labels vs random (~7 min)
#   bash bench/gpu_check.sh precision             # issue 24: bf16 vs fp16 DINO loss curves (~2-3 min, its own call)
# With no argument it runs photos, step, kernels, proof in that order. FULL=1 adds the torch.compile yardstick and
# the attention tile sweep to `kernels` (~6 min more).
# Most important first, each step under its own timeout, so that a slow step costs only itself.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/log.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/log.txt"
PARTS=${*:-photos step kernels proof}
want() { case " $PARTS " in *" $1 "*) return 0;; esac; return 1; }
if want photos; then
# 0a. Issue 12, the data pipeline on 512 ImageNet-sized photos (minivit.tools.photo_folder): the official per-image
#     Pillow yardstick, our decode per core and with 16 workers, MultiCropAugment on the GPU at batch 128, both.
timeout 180 python3 bench/bench.py --only data --out "$OUT/data.md" 2>&1 | tee -a "$OUT/log.txt" | tail -14
# 0b. Same seed, same crops on cuda as on the CPU (and the rest of the crop tests, now on the GPU too).
timeout 60 python3 -m pytest -q tests/test_augment.py -k "device or mixed or pil or whole" 2>&1 | tail -3 \
    | tee -a "$OUT/log.txt"
# 0c. train_dino.py fed by a photo folder (decode in 14 workers, crops on the GPU) against the step fed pre-made
#     tensors (1330 img/s for ViT-S/16 b128 in the DINO table): img/s from its progress lines, ViT-S/16 and S/8.
timeout 80 python3 -m minivit.tools.photo_folder /tmp/photos --images 2560 --classes 8 --processes 16 | tee -a "$OUT/log.txt"
for arch_batch in "vit_s16 128" "vit_s8 32"; do set -- $arch_batch
    timeout 90 python3 train_dino.py --arch "$1" --batch_size_per_gpu "$2" --data /tmp/photos --knn_data none \
        --epochs 1 --iters_per_epoch 20 --log_every 5 --num_workers 14 --output_dir "/tmp/dino_photos_$1" 2>&1 \
        | grep -E "img/s|error" | tail -3 | tee -a "$OUT/photos_e2e.txt"
done
fi
if want step; then
# 1. The DINO step (issue 5's table): ours vs plain PyTorch, ViT-S/16 b128 and ViT-S/8 b32, 2x224 + 8x96 crops.
timeout 170 python3 bench/bench.py --only dino --out "$OUT/dino.md" 2>&1 | tee -a "$OUT/log.txt"
fi
if want kernels; then
# 2. The same kernel tests as CI, now compiled (8 processes share the compiling; pytest-xdist is on that machine);
#    test_attention.py runs both attention backward paths (one tile per head, and blocks) on the same shapes.
timeout 180 python3 -m pytest -q -n 8 --maxfail=5 tests/test_attention.py tests/test_patch_embed.py \
    tests/test_layernorm.py tests/test_bias_gelu.py tests/test_dino_loss.py \
    tests/test_vit.py::test_triton_path_matches_reference_path 2>&1 \
    | tee "$OUT/tests.log" | tail -25
# 3. Kernels against every SDPA backend and conv2d (at N = 37 ours twice: the one-tile backward it picks, and the
# blocked one forced: bench/NOTES.md sec. 8's prediction); 3b. the fused memory-bound kernels (add + LayerNorm, bias + GELU,
# the DINO loss) against the unfused ops and torch.compile of them, GB/s vs the copy ceiling (bench/NOTES.md sec. 6).
timeout 90 python3 bench/bench_kernels.py --only attention --out "$OUT/kernels.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
timeout 30 python3 bench/bench_kernels.py --only patch_embed --out "$OUT/kernels_patch.md" 2>&1 | tee -a "$OUT/log.txt" \
    | tail -3
for k in layernorm bias_gelu dino_loss; do
    timeout 45 python3 bench/bench_kernels.py --only $k --out "$OUT/kernels_$k.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
done
if [ "${FULL:-0}" = 1 ]; then
# 5. train_dino.py --compile: both backbones under torch.compile (inductor fuses LayerNorm, GELU, residual adds).
timeout 200 python3 bench/bench.py --only dino --builds ours --compile --iters 20 --out "$OUT/dino_compile.md" \
    2>&1 | tee -a "$OUT/log.txt" | tail -12
# 6. The attention tiles, swept (how minivit/kernels/attention.py's _tiles were chosen; recorded in bench/NOTES.md sec. 5).
timeout 170 python3 bench/tune_attention.py 2>&1 | tee "$OUT/tune.md" | tail -14
fi
fi
if want proof; then
# 0. Issue 13, the GPU proof (~7 min; its own call): the offline GPU preset of train_dino.py
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
timeout 60 python3 -m minivit.tools.segmentation --arch vit_s8 --data shapes_plain --weights $W --output_dir "$R/seg" \
    2>&1 | tail -8
timeout 90 python3 -m minivit.tools.copydetect --arch vit_s8 --data shapes_plain --weights $W --output_dir "$R/copy" \
    2>&1 | tail -8
COMMON="--image_size 64 --load_size 64 --crop_scale 0.4 --hflip --batch_size 128 --num_workers 4 --warmup_epochs 1"
timeout 150 python3 -m minivit.tools.compare --data shapes_plain --epochs 3 --output_dir "$R/compare" --common_args "$COMMON" \
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
fi
if want precision; then
# 4. Issue 24, bf16 (ours) vs fp16 + GradScaler (the official default): 300 DINO steps of train_dino.py's offline GPU
#    preset (ViT-S/8, patch 8, where the official fp16 runs were unstable), three runs at once on the one GPU: bf16
#    seeds 0 and 1 (the run-to-run noise) and fp16 seed 0; the loss curves side by side and the verdict.
timeout 170 python3 bench/precision_curves.py --jobs 3 --timeout 160 --output_dir /tmp/precision_runs \
    --out "$OUT/precision.md" 2>&1 | tee -a "$OUT/log.txt" | tail -3
cat "$OUT/precision.md" 2>/dev/null
fi
cat "$OUT/data.md" "$OUT/photos_e2e.txt" "$OUT/dino.md" "$OUT"/kernels*.md 2>/dev/null
