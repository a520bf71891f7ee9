"""DINO self-supervised training (Caron et al. 2021): a student ViT (or ResNet) learns to match an EMA teacher
across multi-crop views, with no labels. The recipe and defaults are those of the official main_dino.py.

    python train_dino.py --arch vit_s8                # offline: plain shapes, the CPU (~10 min) or GPU (~5 min) preset
    python train_dino.py --arch vit_s8 --data /path/to/imagenet/train --knn_data /path/to/imagenet   # one GPU
    torchrun --nproc_per_node=8 train_dino.py --arch vit_s16 --data /path/to/imagenet/train          # 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train_dino.py ...
    python train_dino.py --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 \\
        --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14 --data ...      # the official ResNet-50 run

Without --data an offline preset replaces the ImageNet defaults that neither a CPU nor ~5 minutes of one GPU can
afford: OFFLINE_CPU, or OFFLINE_GPU when the run is on CUDA (below). Both train on the plain shapes, drawn once and
kept in memory; the script prints the preset and the values it applied (flags given still win), and at the end the
teacher's k-NN accuracy next to a random-init and a raw-pixel baseline (README, Results, has the measured numbers:
on a 2-core CPU the CPU preset, with DINOv2's KoLeo term, ends 3.8 points above its random init in ~6 minutes; the
GPU preset is bench/gpu_check.sh's first step).
Outputs in --output_dir: checkpoint.pth (official layout: `student` keys start with `module.` as the
official DDP-wrapped student's, `teacher` keys with `backbone.`/`head.`; plus optimizer, epoch, args, dino_loss,
fp16_scaler, and our kind/rng), teacher_backbone.pth (the teacher's backbone alone, the official "backbone only"
format, what models.load_pretrained and timm-style code load; also as teacher_backbone.safetensors), log.jsonl,
curves.png, attention/*.png and attention/ep*.pt (the maps before training and at each evaluation:
`python -m minivit.dino_figure` draws them).

Randomness: each process and step draws its crops from a generator seeded with (seed, epoch, step, rank), and the
global RNG (drop path) is saved in the checkpoint, so --resume continues exactly. With --seed_per_image the crops
of an image depend only on (seed, epoch, image index): a 2-GPU run then computes what a 1-GPU run with the same
global batch computes (tests/test_train_dino.py checks this).
"""
import argparse
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file as save_safetensors

from minivit import checkpoint, cli, distributed, training
from minivit.attention_maps import cls_attention_maps, mass_threshold_masks, save_attention_figure
from minivit.augment import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropAugment
from minivit.data import ShapesDataset, build_dataset, build_loader, describe
from minivit.dino import (DINOHead, DINOLoss, MultiCropWrapper, cancel_gradients_last_layer, clip_gradients,
                          koleo_loss, update_teacher)
from minivit.knn import knn_eval
from minivit.models import ARCHS, arch_family, build_model, patch_size

# Offline presets (no --data): ImageNet's 224/96 px crops, 65536 prototypes and 100 epochs fit neither ~10 minutes
# of a 2-core CPU nor ~5 of one GPU. Both train on the plain shapes (minivit/data.py: large objects on a flat
# colour, drawn once and kept in memory), so that what two views of an image share is the object; an "epoch" is
# iters_per_epoch steps. So short a run needs a higher lr, a faster teacher (momentum 0.99), fewer prototypes and
# sharper targets than the official defaults to move at all. The CPU preset keeps the teacher temperature at 0.015
# (warmed up to 0.04 its targets went uniform by epoch 3) and adds DINOv2's KoLeo term (weight 0.3): without it
# every setting tried lost k-NN against its random init within 40 steps, the features bunching up before they
# learnt the shapes; with it the teacher ends 3-6 points above (README, Results; docs/dino_offline_trials.md).
# fp32 on every CPU: the preset was tuned in fp32; auto would take bf16 on a CPU with AMX, where the same run
# ended +2.6 points above random init instead of +4.4 (Intel Xeon, issue 21): one preset, one kind of result.
OFFLINE_CPU = dict(shapes="plain", color_jitter=(0.4, 0.4, 0.4, 0.5), color_jitter_p=1.0, out_dim=512,
                   global_crop_size=24, local_crop_size=8, local_crops_number=4, batch_size_per_gpu=32, epochs=6,
                   iters_per_epoch=20, warmup_epochs=1, lr=0.004, momentum_teacher=0.99, warmup_teacher_temp=0.015,
                   teacher_temp=0.015, warmup_teacher_temp_epochs=0, freeze_last_layer=0, koleo_weight=0.3,
                   eval_every=2, num_workers=0, baselines=True, knn_images=(1000, 500), precision="fp32")
# One modern GPU, ~5 minutes with the evaluations: 64 px global / 32 px local crops (8x8 and 4x4 patches of 8 px:
# each object spans several), 30 epochs of the 5000 images (1170 steps of 128). Counted: ~36 GFLOP an image, 12x
# fewer than the 2x224 + 8x96 step measured at 364 img/s on an H200 (README, Kernels), so ~2.5 min at 1000 img/s.
OFFLINE_GPU = dict(shapes="plain", color_jitter=(0.4, 0.4, 0.4, 0.5), color_jitter_p=1.0, out_dim=1024,
                   global_crop_size=64, local_crop_size=32, local_crops_number=6, batch_size_per_gpu=128, epochs=30,
                   iters_per_epoch=39, warmup_epochs=3, lr=0.001, momentum_teacher=0.99, drop_path_rate=0.1,
                   warmup_teacher_temp=0.02, teacher_temp=0.04, warmup_teacher_temp_epochs=10, freeze_last_layer=0,
                   koleo_weight=0.1, eval_every=10, num_workers=4, baselines=True, knn_images=(5000, 1000))
PRESETS = {"cpu": OFFLINE_CPU, "gpu": OFFLINE_GPU}


def offline_preset(device):
    """The offline preset's name for --device: "gpu" when it resolves to CUDA (auto with CUDA present), else
    "cpu" (also for mps)."""
    cuda = device == "cuda" or device.startswith("cuda:") or (device == "auto" and torch.cuda.is_available())
    return "gpu" if cuda else "cpu"


def preset_note(key):
    """'offline CPU x, GPU y': a help string's note of the presets' values."""
    return f"offline CPU {OFFLINE_CPU[key]}, GPU {OFFLINE_GPU[key]}"


def preset_line(args):
    """The line that says which offline preset parse_args picked and the values it applied (those equal to the
    preset's: a flag given with another value won over it and is left out)."""
    preset = PRESETS[args.preset]
    applied = ", ".join(f"{k}={getattr(args, k)}" for k in preset if getattr(args, k) == preset[k])
    return (f"offline default (no --data): the {args.preset.upper()} preset (--device {args.device}, CUDA "
            f"{'present' if torch.cuda.is_available() else 'absent'}); applied {applied}")


def parse_args(argv=None):
    p = cli.ArgumentParser(description="DINO self-supervised training (Caron et al. 2021)",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_s16", help=f"one of {', '.join(ARCHS)}. Patch 8 gives better features "
                   "and attention maps for ~4x the compute (ViT-S/8 k-NN 78.3 vs 74.5 for /16 on ImageNet)")
    g.add_argument("--out_dim", type=int, default=65536, help="K, prototypes of the head's last layer ("
                   f"{preset_note('out_dim')}). Large values (65536) suit large, varied data sets")
    g.add_argument("--norm_last_layer", action=argparse.BooleanOptionalAction, default=True, help="freeze the "
                   "last layer's weight-norm magnitudes at 1. --no-norm_last_layer gives better features but can "
                   "be unstable: the official runs use it for ViT-S, keep the default for ViT-B")
    g.add_argument("--use_bn_in_head", action="store_true", help="BatchNorm after each hidden layer of the head "
                   "(an official option, off by default)")
    g.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth of the student ViT (the "
                   "teacher has none); ignored for ResNets")
    g = p.add_argument_group("DINO")
    g.add_argument("--momentum_teacher", type=float, default=0.996, help="EMA momentum at the start, raised to 1 by "
                   f"a cosine ({preset_note('momentum_teacher')}). Raise it for small batches "
                   "(official: 0.9995 at batch 256); lower it for very short runs, or the teacher stays at its init")
    g.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="teacher temperature at epoch 0 "
                   f"({preset_note('warmup_teacher_temp')}); lower it if the loss does not go down")
    g.add_argument("--teacher_temp", type=float, default=0.04, help="teacher temperature after the warm-up "
                   f"({preset_note('teacher_temp')}). 0.04 works in most cases; 0.02 if the targets collapse to "
                   "uniform; 0.07 (with --warmup_teacher_temp_epochs 30) is better for long runs; above 0.07 is "
                   "unstable")
    g.add_argument("--warmup_teacher_temp_epochs", type=int, default=0, help="epochs of linear warm-up from "
                   "--warmup_teacher_temp to --teacher_temp (0: none; 30 with --teacher_temp 0.07)")
    g.add_argument("--koleo_weight", type=float, default=0.0, help="weight of DINOv2's KoLeo regulariser on the "
                   "student's features of the 2 global views (minivit/dino.py koleo_loss; 0: off, DINO as published; "
                   f"DINOv2 uses 0.1; {preset_note('koleo_weight')}). It keeps a short run's features from bunching "
                   "up: on the CPU preset it is what lets the k-NN accuracy beat random init (README)")
    g = p.add_argument_group("multi-crop")
    g.add_argument("--global_crop_size", type=int, default=224, help=f"side of the 2 global crops, px ("
                   f"{preset_note('global_crop_size')}); also the ViT's img_size and the k-NN evaluation size")
    g.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0), help="area fraction of the "
                   "image a global crop covers; use 0.14 1 with --local_crops_number 0")
    g.add_argument("--local_crops_number", type=int, default=8, help="small local crops per image ("
                   f"{preset_note('local_crops_number')}): the student sees them, the teacher does not. 0 disables "
                   "multi-crop; more crops help but cost compute")
    g.add_argument("--local_crop_size", type=int, default=96, help=f"side of a local crop, px ("
                   f"{preset_note('local_crop_size')})")
    g.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4), help="area fraction of a "
                   "local crop")
    g.add_argument("--color_jitter", type=float, nargs=4, default=(0.4, 0.4, 0.2, 0.1),
                   metavar=("B", "C", "S", "H"), help="brightness, contrast, saturation and hue of each view's "
                   f"colour jitter (DINO's; {preset_note('color_jitter')}). Raise the hue (0.5: any hue) when the "
                   "views could match on colour alone, as on the shapes, whose colours belong to no class")
    g.add_argument("--color_jitter_p", type=float, default=0.8, help="probability of the colour jitter per view "
                   f"({preset_note('color_jitter_p')})")
    g.add_argument("--seed_per_image", action="store_true", help="seed each image's crops with (seed, epoch, "
                   "image index) instead of one generator per process and step: results no longer depend on the "
                   "number of processes, at ~10 ms of extra Python per image (for checking a multi-GPU run)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help=f"({preset_note('epochs')}) 300 or 800 epochs "
                   "give a few points more k-NN accuracy than 100")
    g.add_argument("--iters_per_epoch", type=int, default=0, help="cut each epoch to this many steps (0: the whole "
                   f"data set; {preset_note('iters_per_epoch')}); every schedule counts these steps")
    g.add_argument("--batch_size_per_gpu", type=int, default=64, help=f"images per process ("
                   f"{preset_note('batch_size_per_gpu')}); ViT-S/8 needs ~17 GB at 32, use 16-32 on smaller GPUs")
    g.add_argument("--lr", type=float, default=0.0005, help="peak learning rate for a global batch of 256, scaled "
                   f"linearly: lr * batch_size_per_gpu * processes / 256 ({preset_note('lr')})")
    g.add_argument("--min_lr", type=float, default=1e-6, help="learning rate at the end of the cosine decay")
    g.add_argument("--warmup_epochs", type=int, default=10, help="epochs of linear lr warm-up from 0 ("
                   f"{preset_note('warmup_epochs')})")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="adamw for ViTs; sgd (momentum "
                   "0.9) with --lr 0.03 for ResNets, as the official ResNet-50 run")
    g.add_argument("--weight_decay", type=float, default=0.04, help="weight decay at the start, cosine to "
                   "--weight_decay_end; not on biases and norms. A small start value works well for ViTs")
    g.add_argument("--weight_decay_end", type=float, default=0.4, help="final weight decay; a larger decay by the "
                   "end improves ViTs")
    g.add_argument("--clip_grad", type=float, default=3.0, help="clip each parameter's gradient norm to this, "
                   "separately per tensor as the official code (not one global norm); 0.3-1.0 helps larger ViTs; "
                   "0 disables")
    g.add_argument("--freeze_last_layer", type=int, default=1, help="epochs during which the head's last layer "
                   f"does not learn ({preset_note('freeze_last_layer')}); raise it if the loss does not go down "
                   "at the start")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data", default=None, help="an ImageNet-style folder (<class>/<image>), a CIFAR python folder,"
                   " 'shapes', 'shapes_plain' or 'digits'. Absent: the offline default, the plain shapes (see "
                   "--shapes) with the OFFLINE_CPU or OFFLINE_GPU settings")
    g.add_argument("--shapes", choices=("plain", "clutter"), default="plain", help="the offline data (no --data): "
                   "plain shapes (the object is what two views share) or shapes on clutter (views match on the "
                   "background instead)")
    g.add_argument("--knn_images", type=int, nargs=2, default=(0, 0), metavar=("TRAIN", "TEST"), help="k-NN on the "
                   f"first TRAIN/TEST images of each split (0: all; {preset_note('knn_images')}; CPU: ~30 s on 2 "
                   "cores); offline only")
    g.add_argument("--knn_data", default=None, help="a folder with train/ and val/ (labelled) for the k-NN "
                   "evaluation; 'none' skips it. Default: --data's own train/test splits when it has them")
    g.add_argument("--eval_every", type=int, default=10, help="weighted k-NN (k=20, T=0.07) and attention maps "
                   f"every this many epochs and at the end ({preset_note('eval_every')}; 0: at the end only)")
    g.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=False, help="also k-NN a random-"
                   "init backbone and raw pixels before training (on for the offline default; raw pixels of "
                   "large images need N x 3HW floats of memory)")
    g.add_argument("--num_workers", type=int, default=10, help=f"data loading processes ("
                   f"{preset_note('num_workers')}); the crops are made on the training device, loading only decodes")
    g = p.add_argument_group("system")
    g.add_argument("--output_dir", default="runs/dino", help="checkpoint.pth, teacher_backbone.pth, logs, plots")
    g.add_argument("--resume", action="store_true", help="continue exactly from output_dir/checkpoint.pth")
    g.add_argument("--saveckp_freq", type=int, default=20, help="also keep checkpoint{epoch:04}.pth every this "
                   "many epochs (0: never)")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cpu or mps")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"), help="autocast dtype;"
                   " auto: bf16 on GPUs that have it, else fp32. Patch-8 models were unstable in fp16 (the official"
                   " ones were trained in fp32); bf16 keeps fp32's range. bf16 also speeds up CPUs with AMX")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbones for the training step "
                   "(GPU: ViT-S/16 1.26x more img/s after about a minute of compiling; README, Kernels and "
                   "performance). Off by default: on a CPU the compiling takes longer than the offline run")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, crops and drop path")
    g.add_argument("--log_every", type=int, default=10, help="print a progress line every this many steps")
    args = p.parse_known_args(argv)[0]
    preset = offline_preset(args.device) if args.data is None else None
    if preset:  # offline: the preset's values become the defaults; flags given still win
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    args.preset = preset
    cli.check_args(p, args,  # every number that makes no sense stops here, in one line, before anything is written
                   positive=("out_dim", "global_crop_size", "local_crop_size", "epochs", "batch_size_per_gpu", "lr",
                             "warmup_teacher_temp", "teacher_temp", "log_every"),
                   non_negative=("warmup_teacher_temp_epochs", "koleo_weight", "local_crops_number",
                                 "iters_per_epoch", "min_lr",
                                 "warmup_epochs", "weight_decay", "weight_decay_end", "clip_grad", "freeze_last_layer",
                                 "eval_every", "saveckp_freq", "num_workers", "color_jitter"),
                   probability=("drop_path_rate", "momentum_teacher", "color_jitter_p"),
                   ordered=("global_crops_scale", "local_crops_scale"))
    return args


def step_seed(*numbers):
    """A generator seed from a few non-negative ints, e.g. (seed, epoch, step, rank): numpy's SeedSequence
    mixes them, so neighbouring tuples give unrelated streams."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


def knn_top1(model, sets, args, device):
    """Weighted k-NN top-1 (k=20, T=0.07, DINO sec. 4.1) in percent of a frozen backbone on (train, test)."""
    results = knn_eval(model, *sets, device, ks=(20,), T=0.07, image_size=args.global_crop_size,
                       batch_size=max(args.batch_size_per_gpu, 64), num_workers=min(args.num_workers, 4))
    return results[20][0]


@torch.no_grad()
def attention_figures(backbone, images, gt_masks, folder, epoch):
    """Save the teacher's CLS attention maps of the first 2 images (ViT only) as PNGs, and those of the first 8 as
    ep{epoch}.pt (images (8, 3, S, S) float in [0, 1], attn (8, heads, S/p, S/p): what minivit.dino_figure draws),
    and return the Jaccard index of the best head's 60%-mass masks against the ground-truth object masks (shapes
    only; else None). images: normalised (n, 3, S, S) float; gt_masks: (n, S, S) bool or None."""
    attn = cls_attention_maps(backbone.eval(), images)                        # (n, heads, S/p, S/p)
    masks = mass_threshold_masks(attn, 0.6)
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    os.makedirs(folder, exist_ok=True)
    for i in range(min(2, len(images))):
        save_attention_figure(images[i] * std + mean, attn[i], masks[i], os.path.join(folder, f"ep{epoch:04d}_{i}.png"))
    torch.save(dict(images=(images[:8] * std + mean).clamp(0, 1).cpu(), attn=attn[:8].cpu()),
               os.path.join(folder, f"ep{epoch:04d}.pt"))
    if gt_masks is None:
        return None
    p = backbone.patch_size  # ground truth at the patch grid: a patch is object when most of its pixels are
    gt = nn.functional.avg_pool2d(gt_masks.float()[:, None], p)[:, 0] > 0.5  # (n, S/p, S/p)
    inter = (masks & gt[:, None]).flatten(2).sum(-1).float()                 # (n, heads)
    union = (masks | gt[:, None]).flatten(2).sum(-1).clamp_min(1).float()
    return 100 * (inter / union).mean(0).max().item()                        # best head, mean over images


def main(argv=None):
    args = parse_args(argv)
    offline = args.data is None
    try:
        family = arch_family(args.arch)
        patch = patch_size(args.arch)
        for name in ("global_crop_size", "local_crop_size"):
            if getattr(args, name) % patch:
                raise ValueError(f"--{name} {getattr(args, name)} is not a multiple of {args.arch}'s patch size "
                                 f"{patch}; e.g. --{name} {max(patch, getattr(args, name) // patch * patch)}")
        if family == "vit" and args.drop_path_rate >= 1:
            raise ValueError(f"--drop_path_rate {args.drop_path_rate} would drop every block: use a value below 1")
        training.keep_freed_memory()  # the CPU's eager tensor ops: no fresh pages per op (training.py)
        info = distributed.setup_distributed(args.device)
        augment = MultiCropAugment(args.global_crop_size, args.local_crop_size, args.local_crops_number,
                                   tuple(args.global_crops_scale), tuple(args.local_crops_scale), args.color_jitter,
                                   args.color_jitter_p)
        # image folders: whole photos, decoded no smaller than the smallest crop needs (data.load_photo);
        # offline: the shapes, drawn once and kept in memory
        shapes = "shapes" if args.shapes == "clutter" else "shapes_plain"
        train_set = build_dataset(args.data or shapes, "train", min_pixels=augment.min_pixels, cache=offline)
        if args.knn_data == "none":
            knn_sets = None
        elif args.knn_data is not None:
            knn_sets = tuple(build_dataset(args.knn_data, split) for split in ("train", "test"))
        elif offline:
            knn_sets = tuple(ShapesDataset(split, 64, num_images=n, clutter=args.shapes == "clutter", cache=True)
                             for split, n in zip(("train", "test"), args.knn_images))
        else:
            try:
                knn_sets = (build_dataset(args.data, "train"), build_dataset(args.data, "test"))  # eval views
            except ValueError as e:  # e.g. imagenet/train: labelled, but no held-out split beside it
                knn_sets = None
                distributed.print0(f"note: no k-NN evaluation ({e}); pass --knn_data with train/ and val/")
        precision = training.resolve_precision(args.precision, info.device)
        out = checkpoint.make_output_dir(args.output_dir)
        checkpoint.lock_output_dir(out)  # a second run on the same folder stops here
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    device, rank, world = info.device, info.rank, info.world_size
    ckpt_path, state = out / "checkpoint.pth", None
    if ckpt_path.exists() and not args.resume:
        raise SystemExit(f"error: {ckpt_path} exists: add --resume to continue it, or pick another --output_dir")
    if args.resume:  # checked now, before building anything; loaded into the models below
        try:
            state = checkpoint.load_checkpoint(ckpt_path, kind="dino", arch=args.arch)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"error: {e}")
        for key in ("out_dim", "use_bn_in_head", "norm_last_layer", "global_crop_size"):  # parameter shapes
            if state["args"].get(key) != getattr(args, key):
                raise SystemExit(f"error: {ckpt_path} was trained with --{key} {state['args'].get(key)}, not "
                                 f"{getattr(args, key)}; pass --{key} {state['args'].get(key)} to resume it")
    if offline:
        distributed.print0(preset_line(args))
    distributed.print0(f"{describe(train_set)}; {world} process(es) on {device}, {precision}; args: {vars(args)}")

    # ------------------------------------------------------------------------------------------ data and models
    try:
        loader = build_loader(train_set, args.batch_size_per_gpu, shuffle=True, drop_last=True,
                              num_workers=args.num_workers, seed=args.seed, distributed=info.distributed)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    niter = min(len(loader), args.iters_per_epoch or len(loader))
    torch.manual_seed(args.seed)  # the same initial weights on every process
    if family == "vit":  # position table sized for the global crops (224: 196 + 1 at /16); drop path: student only
        student = build_model(args.arch, img_size=args.global_crop_size, drop_path_rate=args.drop_path_rate)
        teacher = build_model(args.arch, img_size=args.global_crop_size)
    else:
        student, teacher = build_model(args.arch), build_model(args.arch)
    embed_dim = student.num_features
    student = MultiCropWrapper(student, DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head,
                                                      norm_last_layer=args.norm_last_layer))
    teacher = MultiCropWrapper(teacher, DINOHead(embed_dim, args.out_dim, use_bn=args.use_bn_in_head))
    # any BatchNorm (a ResNet's, the head's with --use_bn_in_head): statistics over the global batch, as official
    student, teacher = distributed.sync_batchnorm(student, info), distributed.sync_batchnorm(teacher, info)
    student, teacher = student.to(device), teacher.to(device)
    teacher.load_state_dict(student.state_dict())  # the teacher starts as the student and gets no gradients
    teacher.requires_grad_(False)
    if args.compile:
        student.compile_backbone()
        teacher.compile_backbone()
    student_ddp = (nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                       else None) if info.distributed else student)
    distributed.seed_everything(args.seed, rank)  # from here each process draws its own drop-path masks
    distributed.print0(f"student and teacher: {args.arch} + DINOHead(K={args.out_dim}), "
                    f"{training.count_parameters(student) / 1e6:.1f}M parameters each")

    try:  # 2 global + local crops: 2 * ncrops - 2 cross-entropy terms (DINO eq. 3)
        dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                             args.warmup_teacher_temp_epochs, args.epochs).to(device)
        global_batch = args.batch_size_per_gpu * world
        lr_schedule = training.cosine_schedule(args.lr * global_batch / 256, args.min_lr, args.epochs, niter,
                                               args.warmup_epochs)  # linear scaling rule (Goyal et al. 2017)
        wd_schedule = training.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, niter)
        momentum_schedule = training.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, niter)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    groups = training.param_groups(student, args.weight_decay)  # lr and wd are set at every step
    if args.optimizer == "adamw":  # fused: one kernel for all parameters on a GPU (foreach on a CPU)
        optimizer = torch.optim.AdamW(groups, fused=device.type == "cuda")
    else:
        optimizer = torch.optim.SGD(groups, lr=0, momentum=0.9)
    scaler = training.make_grad_scaler(device, precision)
    autocast = lambda: training.autocast_context(device, precision)  # noqa: E731

    start_epoch, baselines = 0, {}
    if state is not None:
        student.load_state_dict({k.removeprefix("module."): v for k, v in state["student"].items()})
        teacher.load_state_dict(state["teacher"])
        optimizer.load_state_dict(state["optimizer"])
        dino_loss.load_state_dict(state["dino_loss"])
        if state["fp16_scaler"]:
            scaler.load_state_dict(state["fp16_scaler"])
        start_epoch, baselines = state["epoch"], state["knn_baselines"]
        if not checkpoint.set_rng_state(state["rng"]):
            distributed.print0(f"note: saved by {len(state['rng'])} processes, now {world}: fresh random streams")
        distributed.print0(f"resumed {ckpt_path} at epoch {start_epoch}")
        training.trim_log(out / "log.jsonl", start_epoch)  # killed after logging an epoch but before saving it

    if family == "vit":  # fixed images for the attention maps, and the objects' masks for a Jaccard index (shapes)
        att_set = knn_sets[1] if knn_sets else build_dataset(args.data, "train")  # square evaluation views
        shapes = isinstance(att_set, ShapesDataset) and att_set.load_size % patch == 0
        att_n, S = (32 if shapes else 2), att_set.load_size // patch * patch
        att_images = EvalTransform(S)(torch.stack([att_set[i][0] for i in range(att_n)])).to(device)
        att_masks = torch.stack([att_set.mask(i) for i in range(att_n)]).to(device) if shapes else None
    logger = training.JsonlLogger(out / "log.jsonl")
    if start_epoch == 0 and args.baselines and knn_sets:  # the two numbers training has to beat
        baselines = dict(random_init=knn_top1(teacher.backbone, knn_sets, args, device),
                         raw_pixels=knn_top1(nn.Flatten(), knn_sets, args, device))
        teacher.train()
        logger.log(epoch=0, knn_top1=baselines["random_init"], knn_raw_pixels=baselines["raw_pixels"])
        distributed.print0(f"k-NN baselines (k=20): random-init {args.arch} {baselines['random_init']:.1f}%, "
                        f"raw pixels {baselines['raw_pixels']:.1f}%")
    if start_epoch == 0 and family == "vit" and info.is_main:  # the maps before training, to compare with the end
        attention_figures(teacher.backbone, att_images, att_masks, out / "attention", 0)
        teacher.train()

    # ------------------------------------------------------------------------------------------------ training
    progress = training.Progress(args.epochs, niter, args.log_every, start_epoch)
    ln_k, start_time, top1 = math.log(args.out_dim), time.time(), None
    for epoch in range(start_epoch, args.epochs):
        loader.set_epoch(epoch)  # the order depends on (seed, epoch) only
        indices = list(loader.sampler) if args.seed_per_image else None  # this process's images, in order
        student.train(), teacher.train()  # the official teacher always runs in train mode (BN: batch statistics)
        losses, stats = [], {}
        for it, (images, _) in enumerate(loader):
            if it == niter:
                break
            step = epoch * niter + it  # global iteration: the index of every schedule
            training.set_schedules(optimizer, float(lr_schedule[step]), float(wd_schedule[step]))
            images = images.to(device, non_blocking=True)
            if args.seed_per_image:
                batch = indices[it * args.batch_size_per_gpu:][:len(images)]
                views = [augment(images[k:k + 1], torch.Generator().manual_seed(step_seed(args.seed, epoch, i)))
                         for k, i in enumerate(batch)]
                crops = [torch.cat(v) for v in zip(*views)]
            else:
                crops = augment(images, torch.Generator().manual_seed(step_seed(args.seed, epoch, it, rank)))
            log_now = (it + 1) % args.log_every == 0 or it + 1 == niter
            with autocast():
                with torch.no_grad():
                    teacher_output = teacher(crops[:2])  # only the 2 global views go through the teacher
                # every view goes through the student
                student_output, student_features = student_ddp(crops, return_features=True)
                if log_now:  # with the centre this loss uses: the call below moves it
                    stats = {k: distributed.all_reduce_mean(v).item()
                             for k, v in dino_loss.collapse_stats(teacher_output, epoch).items()}
                loss = total = dino_loss(student_output, teacher_output, epoch)
                if args.koleo_weight:  # DINOv2's regulariser, per global view (its features come first)
                    koleo = sum(koleo_loss(f) for f in student_features[:len(teacher_output)].chunk(2))
                    total = loss + args.koleo_weight * koleo
            losses.append(training.check_finite(loss, epoch, it, ckpt_path))  # NaN: stop, keep the last checkpoint

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if args.clip_grad:
                scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless fp16)
                clip_gradients(student, args.clip_grad)
            cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
            scaler.step(optimizer)
            scaler.update()
            update_teacher(student, teacher, momentum_schedule[step])  # EMA (DINO sec. 3.1)

            progress.step(epoch, it, losses[-1], lr_schedule[step], global_batch, wd=wd_schedule[step],
                          mom=momentum_schedule[step], **({} if not log_now else dict(
                              entropy=stats["entropy"], kl_unif=stats["kl_to_uniform"])),
                          **({"koleo": koleo.item()} if log_now and args.koleo_weight else {}))
            if log_now and epoch >= args.freeze_last_layer and min(losses[-1], stats["entropy"]) > 0.95 * ln_k:
                distributed.print0(f"collapse? loss {losses[-1]:.3f} and teacher entropy {stats['entropy']:.3f} are "
                                f"near ln(K) = {ln_k:.3f} (uniform); try a lower --teacher_temp")
            if log_now and stats["kl_to_uniform"] > 0.95 * ln_k:
                distributed.print0(f"collapse? KL(mean target || uniform) {stats['kl_to_uniform']:.3f} near ln(K): "
                                "one prototype wins for every image")

        # ------------------------------------------------------------------ evaluate, checkpoint, log, plot
        record = dict(epoch=epoch + 1, train_loss=float(np.mean(losses)), lr=lr_schedule[step], wd=wd_schedule[step],
                      momentum=momentum_schedule[step], teacher_temp=dino_loss.teacher_temp_at(epoch),
                      teacher_entropy=stats["entropy"], kl_to_uniform=stats["kl_to_uniform"],
                      time=time.time() - start_time)
        last = epoch + 1 == args.epochs
        if last or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            if knn_sets:
                record["knn_top1"] = top1 = knn_top1(teacher.backbone, knn_sets, args, device)
            if family == "vit" and info.is_main:
                jaccard = attention_figures(teacher.backbone, att_images, att_masks, out / "attention", epoch + 1)
                if jaccard is not None:
                    record["attn_jaccard"] = jaccard
            teacher.train()
        state = dict(kind="dino", epoch=epoch + 1, args=vars(args), dino_loss=dino_loss.state_dict(),
                     student={"module." + k: v for k, v in student.state_dict().items()},  # as official DDP's
                     teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                     fp16_scaler=scaler.state_dict(), knn_baselines=baselines, rng=checkpoint.rng_state())
        checkpoint.save_checkpoint(ckpt_path, state)
        if args.saveckp_freq and epoch % args.saveckp_freq == 0:
            checkpoint.save_checkpoint(out / f"checkpoint{epoch:04}.pth", state)
        logger.log(record)
        if info.is_main:
            keys = ["train_loss", "teacher_entropy", "kl_to_uniform"] + (["knn_top1"] if knn_sets else [])
            training.plot_curves(out / "log.jsonl", out / "curves.png", keys)
        distributed.print0(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k in ("train_loss", "teacher_entropy", "knn_top1",
                                                                "attn_jaccard")))

    if info.is_main:  # the teacher's backbone alone, named as a plain backbone: the official "backbone only" file
        tmp = out / ".teacher_backbone.pth.tmp"
        torch.save(teacher.backbone.state_dict(), tmp)
        os.replace(tmp, out / "teacher_backbone.pth")
        # the same tensors as safetensors: loading it runs no code (minivit/hf.py), what the Hugging Face Hub holds
        save_safetensors({k: v.contiguous() for k, v in teacher.backbone.state_dict().items()}, tmp)
        os.replace(tmp, out / "teacher_backbone.safetensors")
    distributed.print0(f"done in {training.format_time(time.time() - start_time)}; wrote {out}/teacher_backbone.pth")
    if top1 is not None:
        line = f"k-NN top-1 (k=20, T=0.07) on {describe(knn_sets[1])}: DINO teacher {top1:.1f}%"
        if baselines:
            line += (f" | random-init {args.arch} {baselines['random_init']:.1f}% | raw pixels "
                     f"{baselines['raw_pixels']:.1f}%")
        distributed.print0(line)
    distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
