"""DINO self-supervised training (Caron et al. 2021): a student ViT (or ResNet) learns to match an EMA teacher
across multi-crop views, with no labels. The recipe and defaults are those of the official main_dino.py, and the
file reads in its order: get_args_parser -> train_dino (data, student and teacher, loss, optimizer, schedules,
resume, the epoch loop) -> train_one_epoch (the step on one screen).

    python train_dino.py --arch vit_s8                # offline: mono shapes, the CPU (~10 min) or GPU (~5 min) preset
    python train_dino.py --arch vit_s8 --data /path/to/imagenet/train --knn_data /path/to/imagenet   # one GPU
    torchrun --nproc_per_node=8 train_dino.py --arch vit_s16 --data /path/to/imagenet/train          # 8 GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train_dino.py ...
    torchrun --nproc_per_node=8 train_dino.py --recipe boosted --data ...   # the official README's longer run
    python train_dino.py --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4 \\
        --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14 --data ...      # the official ResNet-50 run

Presets (cli.parse_with_preset: a preset's values become the defaults, flags given still win; the script prints
what it applied). Without --data an offline preset replaces the ImageNet defaults that neither a CPU nor ~5 minutes
of one GPU can afford: OFFLINE_CPU, or OFFLINE_GPU when the run is on CUDA (below). Both train on the mono shapes,
drawn once and kept in memory, and end with the teacher's k-NN accuracy next to a random-init and a raw-pixel
baseline (README, Results). With --data, `--recipe vanilla` (the default) is the official 100-epoch run and
`--recipe boosted` the official README's "boosting DINO performance" command (RECIPES below).

How to change the defaults (the official help strings' advice, here once): patch 8 gives better features and
attention maps for ~4x the compute; --no-norm_last_layer gives better features but can be unstable (the official
runs use it for ViT-S, keep the default for ViT-B); raise --momentum_teacher for small batches (0.9995 at batch 256)
and lower it for very short runs; --teacher_temp 0.04 works in most cases, 0.02 if the targets collapse to uniform,
0.07 with --warmup_teacher_temp_epochs 30 for long runs, above 0.07 is unstable; clip 0.3-1.0 helps larger ViTs;
raise --freeze_last_layer if the loss does not go down at the start; raise the hue jitter (0.5: any hue) when the
views could match on colour alone, as on the shapes.

Outputs in --output_dir: checkpoint.pth (official layout: `student` keys start with `module.` as the
official DDP-wrapped student's, `teacher` keys with `backbone.`/`head.`; plus optimizer, epoch, args, dino_loss,
fp16_scaler, and our kind/rng), teacher_backbone.pth (the teacher's backbone alone, the official "backbone only"
format, what models.load_pretrained and timm-style code load; also as teacher_backbone.safetensors), log.jsonl,
curves.png, attention/*.png and attention/ep*.pt (the maps before training and at each evaluation:
`python -m minivit.tools.dino_figure` draws them).

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
from minivit.augment import IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropAugment
from minivit.data import ShapesDataset, build_dataset, build_loader, describe
from minivit.dino import (DINOHead, DINOLoss, MultiCropWrapper, cancel_gradients_last_layer, clip_gradients,
                          koleo_loss, update_teacher)
from minivit.models import ARCHS, arch_family, build_model, patch_size
from minivit.tools.attention_maps import cls_attention_maps, mass_threshold_masks, save_attention_figure
from minivit.tools.knn import knn_eval
from minivit.tools.segmentation import jaccard

# Offline presets (no --data): ImageNet's 224/96 px crops, 65536 prototypes and 100 epochs fit neither ~10 minutes
# of a 2-core CPU nor ~5 of one GPU. Both train on the mono shapes (minivit/data.py: small light-grey shapes anywhere
# on a dark grey, drawn once and kept in memory): two views share the outline alone, and raw pixels sort them
# badly, so the k-NN measures what was learnt (docs/dino_offline_trials.md: on the plain look pixels score 38%,
# more than any ViT-S/8 trained for 10 CPU minutes, with or without labels). An "epoch" is iters_per_epoch steps.
# So short a run needs a higher lr, a faster teacher (momentum 0.99), fewer prototypes and sharper targets than the
# official defaults to move at all. The CPU preset keeps the teacher temperature at 0.015 (warmed up to 0.04 its
# targets went uniform by epoch 3) and adds DINOv2's KoLeo term (weight 0.3): without it every setting tried lost
# k-NN against its random init within 40 steps, the features bunching up before they learnt the shapes. Its 18
# epochs are what the attention needs: the k-NN is above raw pixels from epoch 5 on, but the CLS attention stays
# as flat as at init until ~epoch 10 and finds the objects by epoch 18 (Jaccard 17 -> 38; README, Results).
# fp32 on every CPU: the preset was tuned in fp32; auto would take bf16 on a CPU with AMX, where the plain-shapes
# preset ended +2.6 points above random init instead of +4.4 (Intel Xeon, issue 21): one preset, one result.
OFFLINE_CPU = dict(shapes="mono", color_jitter=(0.4, 0.4, 0.4, 0.5), color_jitter_p=1.0, out_dim=512,
                   global_crop_size=24, local_crop_size=8, local_crops_number=4, batch_size_per_gpu=32, epochs=18,
                   iters_per_epoch=20, warmup_epochs=1, lr=0.004, momentum_teacher=0.99, warmup_teacher_temp=0.015,
                   teacher_temp=0.015, warmup_teacher_temp_epochs=0, freeze_last_layer=0, koleo_weight=0.3,
                   eval_every=6, num_workers=0, baselines=True, knn_images=(1000, 500), precision="fp32")
# One modern GPU, ~5 minutes with the evaluations: 64 px global / 32 px local crops (8x8 and 4x4 patches of 8 px:
# each object spans several), 30 epochs of the 5000 images (1170 steps of 128). Counted: ~36 GFLOP an image, 12x
# fewer than the 2x224 + 8x96 step measured at 364 img/s on an H200 (docs/results.md), so ~2.5 min at 1000 img/s.
OFFLINE_GPU = dict(shapes="mono", color_jitter=(0.4, 0.4, 0.4, 0.5), color_jitter_p=1.0, out_dim=1024,
                   global_crop_size=64, local_crop_size=32, local_crops_number=6, batch_size_per_gpu=128, epochs=30,
                   iters_per_epoch=39, warmup_epochs=3, lr=0.001, momentum_teacher=0.99, drop_path_rate=0.1,
                   warmup_teacher_temp=0.02, teacher_temp=0.04, warmup_teacher_temp_epochs=10, freeze_last_layer=0,
                   koleo_weight=0.1, eval_every=10, num_workers=4, baselines=True, knn_images=(5000, 1000))
PRESETS = {"cpu": OFFLINE_CPU, "gpu": OFFLINE_GPU}
# With --data: the official README's two ViT-S/16 runs on ImageNet (8 GPUs x 64 images). vanilla = the argparse
# defaults: 100 epochs, 69.3% k-NN / ~73.8% linear in 1.75 days; boosted = its "boosting DINO performance"
# command: 300 epochs, teacher temperature 0.04 -> 0.07 over 30 epochs, no last-layer norm, 73.3% / ~76.1% in
# 2.6 days on 16 GPUs. (The released 800-epoch checkpoints, 74.5 / 77.0, list their own args in the official
# README's table; give those flags on the command line.)
RECIPES = {"vanilla": {}, "boosted": dict(epochs=300, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                                          norm_last_layer=False)}
OUTPUTS = ("checkpoint.pth", "log.jsonl", "curves.png", "teacher_backbone.pth", "teacher_backbone.safetensors",
           "attention/")  # what --output_dir gets (the module docstring says what each holds)
# the checkpoint's parameter shapes: a resumed run must pass the same
RESUME_MUST_MATCH = ("out_dim", "use_bn_in_head", "norm_last_layer", "global_crop_size")


def offline_preset(device):
    """The offline preset's name for --device: "gpu" when it resolves to CUDA (auto with CUDA present), else
    "cpu" (also for mps)."""
    cuda = device == "cuda" or device.startswith("cuda:") or (device == "auto" and torch.cuda.is_available())
    return "gpu" if cuda else "cpu"


def preset_line(args):
    """The line that says which offline preset parse_args picked and the values it applied (those equal to the
    preset's: a flag given with another value won over it and is left out)."""
    preset = PRESETS[args.preset]
    applied = ", ".join(f"{k}={getattr(args, k)}" for k in preset if getattr(args, k) == preset[k])
    return (f"offline default (no --data): the {args.preset.upper()} preset (--device {args.device}, CUDA "
            f"{'present' if torch.cuda.is_available() else 'absent'}); applied {applied}")


def get_args_parser():
    """The flags, in the official main_dino.py's groups and names. The advice on changing them is in the module
    docstring; the help's epilog lists the offline presets' values."""
    epilog = " | ".join(f"offline {name.upper()} preset: {cli.as_flags(preset)}" for name, preset in PRESETS.items())
    p = cli.ArgumentParser(description="DINO self-supervised training (Caron et al. 2021)", epilog=epilog,
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--arch", default="vit_s16", help=f"one of {', '.join(ARCHS)}")
    g.add_argument("--out_dim", type=int, default=65536, help="K, prototypes of the head's last layer")
    g.add_argument("--norm_last_layer", action=argparse.BooleanOptionalAction, default=True,
                   help="freeze the last layer's weight-norm magnitudes at 1 (off: better ViT-S features, less stable)")
    g.add_argument("--use_bn_in_head", action="store_true", help="BatchNorm in the head's hidden layers (official)")
    g.add_argument("--drop_path_rate", type=float, default=0.1, help="stochastic depth of the student ViT only")
    g = p.add_argument_group("DINO")
    g.add_argument("--momentum_teacher", type=float, default=0.996, help="teacher EMA momentum, cosine to 1")
    g.add_argument("--warmup_teacher_temp", type=float, default=0.04, help="teacher temperature at epoch 0")
    g.add_argument("--teacher_temp", type=float, default=0.04, help="teacher temperature after the warm-up")
    g.add_argument("--warmup_teacher_temp_epochs", type=int, default=0, help="epochs of its linear warm-up (0: none)")
    g.add_argument("--koleo_weight", type=float, default=0.0, help="DINOv2's KoLeo term (0: DINO as published)")
    g.add_argument("--recipe", choices=tuple(RECIPES), default="vanilla", help="with --data: an official run")
    g = p.add_argument_group("multi-crop")
    g.add_argument("--global_crop_size", type=int, default=224, help="side of the 2 global crops (and k-NN), px")
    g.add_argument("--global_crops_scale", type=float, nargs=2, default=(0.4, 1.0), help="area fraction, global")
    g.add_argument("--local_crops_number", type=int, default=8, help="local crops per image, student only")
    g.add_argument("--local_crop_size", type=int, default=96, help="side of a local crop, px")
    g.add_argument("--local_crops_scale", type=float, nargs=2, default=(0.05, 0.4), help="area fraction, local")
    g.add_argument("--color_jitter", type=float, nargs=4, default=(0.4, 0.4, 0.2, 0.1), metavar=("B", "C", "S", "H"),
                   help="brightness, contrast, saturation, hue of the colour jitter")
    g.add_argument("--color_jitter_p", type=float, default=0.8, help="probability of the jitter per view")
    g.add_argument("--seed_per_image", action="store_true", help="crops seeded per image: any process count alike")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=100, help="300-800 epochs gain a few points of k-NN")
    g.add_argument("--iters_per_epoch", type=int, default=0, help="cut each epoch to this many steps (0: all)")
    g.add_argument("--batch_size_per_gpu", type=int, default=64, help="images per process; ViT-S/8 at 32: ~17 GB")
    g.add_argument("--lr", type=float, default=0.0005, help="peak lr for a global batch of 256, scaled linearly")
    g.add_argument("--min_lr", type=float, default=1e-6, help="lr at the end of the cosine")
    g.add_argument("--warmup_epochs", type=int, default=10, help="epochs of linear lr warm-up")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="sgd (--lr 0.03) for ResNets")
    g.add_argument("--weight_decay", type=float, default=0.04, help="at the start; not on biases and norms")
    g.add_argument("--weight_decay_end", type=float, default=0.4, help="at the end of its cosine")
    g.add_argument("--clip_grad", type=float, default=3.0, help="per-tensor gradient-norm clip (0: off)")
    g.add_argument("--freeze_last_layer", type=int, default=1, help="epochs with the head's last layer frozen")
    g = p.add_argument_group("data and evaluation")
    g.add_argument("--data", default=None, help="an image folder, CIFAR, 'shapes(_plain)', 'digits' (none: offline)")
    g.add_argument("--knn_data", default=None, help="a folder with train/ and val/ for k-NN ('none': skip)")
    g.add_argument("--eval_every", type=int, default=10, help="k-NN and attention maps every N epochs (0: at the end)")
    g.add_argument("--num_workers", type=int, default=10, help="data loading processes (they only decode)")
    g = p.add_argument_group("the offline demo (no --data): what the presets set beside the flags above")
    g.add_argument("--shapes", choices=tuple(ShapesDataset.LOOKS), default="mono",
                   help="the offline data's look (data.ShapesDataset)")
    g.add_argument("--knn_images", type=int, nargs=2, default=(0, 0), metavar=("TRAIN", "TEST"),
                   help="offline k-NN on the first TRAIN/TEST images (0: all)")
    g.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=False,
                   help="k-NN of a random-init backbone and of raw pixels before training")
    g = p.add_argument_group("system")
    g.add_argument("--output_dir", default="runs/dino", help="checkpoint.pth, teacher_backbone.pth, logs, plots")
    g.add_argument("--resume", action="store_true", help="continue exactly from output_dir/checkpoint.pth")
    g.add_argument("--saveckp_freq", type=int, default=20, help="keep checkpoint{epoch:04}.pth every N epochs")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cpu or mps")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast dtype; auto: bf16 on GPUs and AMX CPUs, else fp32")
    g.add_argument("--compile", action="store_true", help="torch.compile the backbones (GPU: ~1.26x img/s)")
    g.add_argument("--seed", type=int, default=0, help="initial weights, data order, crops and drop path")
    g.add_argument("--log_every", type=int, default=10, help="print a progress line every N steps")
    return p


def choose_preset(args):
    """-> (offline preset name or None, the values that become the defaults): without --data the offline preset
    of the device, with --data the --recipe."""
    if args.data is None:
        return offline_preset(args.device), PRESETS[offline_preset(args.device)]
    return None, RECIPES[args.recipe]


def parse_args(argv=None):
    """Flags -> args: the offline preset (no --data) or the --recipe as defaults, then every number checked."""
    p = get_args_parser()
    args, preset, _ = cli.parse_with_preset(p, argv, choose_preset)
    args.preset = preset
    cli.check_args(p, args,  # every number that makes no sense stops here, in one line, before anything is written
                   positive=("out_dim", "global_crop_size", "local_crop_size", "epochs", "batch_size_per_gpu", "lr",
                             "warmup_teacher_temp", "teacher_temp", "log_every"),
                   non_negative=("warmup_teacher_temp_epochs", "koleo_weight", "local_crops_number",
                                 "iters_per_epoch", "min_lr", "warmup_epochs", "weight_decay", "weight_decay_end",
                                 "clip_grad", "freeze_last_layer", "eval_every", "saveckp_freq", "num_workers",
                                 "color_jitter"),
                   probability=("drop_path_rate", "momentum_teacher", "color_jitter_p"),
                   ordered=("global_crops_scale", "local_crops_scale"), seed=("seed",))
    return args


def step_seed(*numbers):
    """A generator seed from a few non-negative ints, e.g. (seed, epoch, step, rank): numpy's SeedSequence
    mixes them, so neighbouring tuples give unrelated streams."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


def check_flags(args):
    """What parse_args cannot check alone: crop sizes against the arch's patch, drop path < 1. ValueError."""
    patch = patch_size(args.arch)
    for name in ("global_crop_size", "local_crop_size"):
        if getattr(args, name) % patch:
            raise ValueError(f"--{name} {getattr(args, name)} is not a multiple of {args.arch}'s patch size "
                             f"{patch}; e.g. --{name} {max(patch, getattr(args, name) // patch * patch)}")
    if arch_family(args.arch) == "vit" and args.drop_path_rate >= 1:
        raise ValueError(f"--drop_path_rate {args.drop_path_rate} would drop every block: use a value below 1")


def build_data(args, augment, info):
    """Every data set of the run, built here once: the training loader (image folders: whole photos, decoded no
    smaller than the smallest crop needs; offline: the shapes, drawn once and kept in memory), the k-NN sets
    (train, test) or None, and the fixed images (+ object masks on the shapes) of the attention maps (ViT only)."""
    offline = args.data is None
    shapes = ShapesDataset.LOOKS[args.shapes]
    train_set = build_dataset(args.data or shapes, "train", min_pixels=augment.min_pixels, cache=offline)
    if args.knn_data == "none":
        knn_sets = None
    elif args.knn_data is not None:
        knn_sets = tuple(build_dataset(args.knn_data, split) for split in ("train", "test"))
    elif offline:
        knn_sets = tuple(build_dataset(shapes, split, cache=True, num_images=n)
                         for split, n in zip(("train", "test"), args.knn_images))
    else:
        try:
            knn_sets = (build_dataset(args.data, "train"), build_dataset(args.data, "test"))  # eval views
        except ValueError as e:  # e.g. imagenet/train: labelled, but no held-out split beside it
            knn_sets = None
            distributed.print0(f"note: no k-NN evaluation ({e}); pass --knn_data with train/ and val/")
    loader = build_loader(train_set, args.batch_size_per_gpu, shuffle=True, drop_last=True,
                          num_workers=args.num_workers, seed=args.seed, distributed=info.distributed)
    attention = None
    if arch_family(args.arch) == "vit":  # square evaluation views; the objects' masks give a Jaccard (shapes)
        att_set = knn_sets[1] if knn_sets else build_dataset(args.data, "train")
        patch = patch_size(args.arch)
        shapes = isinstance(att_set, ShapesDataset) and att_set.load_size % patch == 0
        n, S = (32 if shapes else 2), att_set.load_size // patch * patch
        images = EvalTransform(S)(torch.stack([att_set[i][0] for i in range(n)])).to(info.device)
        masks = torch.stack([att_set.mask(i) for i in range(n)]).to(info.device) if shapes else None
        attention = (images, masks)
    return train_set, loader, knn_sets, attention


def build_student_teacher(args, info):
    """The student and the teacher: the same backbone + DINOHead (DINO sec. 3.1), the teacher a copy of the student
    with no drop path and no gradients -> (student, teacher, student_ddp: what the step calls)."""
    torch.manual_seed(args.seed)  # the same initial weights on every process
    if arch_family(args.arch) == "vit":  # position table sized for the global crops (224: 196 + 1 at /16)
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
    student, teacher = student.to(info.device), teacher.to(info.device)
    teacher.load_state_dict(student.state_dict())  # the teacher starts as the student and gets no gradients
    teacher.requires_grad_(False)
    if args.compile:
        student.compile_backbone()
        teacher.compile_backbone()
    device = info.device
    student_ddp = (nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda"
                                                       else None) if info.distributed else student)
    return student, teacher, student_ddp


def build_loss_and_optimizer(args, student, niter, world, precision):
    """The DINO loss, the optimizer (and GradScaler) and the per-iteration schedules of lr, weight decay and teacher
    momentum -> (dino_loss, optimizer, scaler, {"lr", "wd", "momentum": (epochs * niter,) float64})."""
    device = next(student.parameters()).device
    training.check_steps(args.epochs, niter)  # --epochs 10**11: the schedules would not fit in memory
    # ============ preparing loss: 2 global + local crops, 2 * ncrops - 2 cross-entropy terms (DINO eq. 3) ============
    dino_loss = DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                         args.warmup_teacher_temp_epochs, args.epochs).to(device)
    # ============ preparing optimizer: fused AdamW, one kernel for all parameters on a GPU ============
    groups = training.param_groups(student, args.weight_decay)  # lr and wd are set at every step
    optimizer = (torch.optim.AdamW(groups, fused=device.type == "cuda") if args.optimizer == "adamw"
                 else torch.optim.SGD(groups, lr=0, momentum=0.9))
    scaler = training.make_grad_scaler(device, precision)
    # ============ init schedulers: per iteration; the linear scaling rule (Goyal et al. 2017) ============
    lr = training.cosine_schedule(args.lr * args.batch_size_per_gpu * world / 256, args.min_lr, args.epochs, niter,
                                  args.warmup_epochs)
    schedules = dict(lr=lr, wd=training.cosine_schedule(args.weight_decay, args.weight_decay_end, args.epochs, niter),
                     momentum=training.cosine_schedule(args.momentum_teacher, 1.0, args.epochs, niter))
    return dino_loss, optimizer, scaler, schedules


def restart_from_checkpoint(path, args, student, teacher, optimizer, dino_loss, scaler, world):
    """--resume: load output_dir/checkpoint.pth into every piece of the run -> (start epoch, k-NN baselines).
    A checkpoint of another kind, arch or head shape is refused in one line (ValueError)."""
    state = checkpoint.load_checkpoint(path, kind="dino", arch=args.arch)
    for key in RESUME_MUST_MATCH:  # parameter shapes
        if state["args"].get(key) != getattr(args, key):
            raise ValueError(f"{path} was trained with --{key} {state['args'].get(key)}, not "
                             f"{getattr(args, key)}; pass --{key} {state['args'].get(key)} to resume it")
    student.load_state_dict({k.removeprefix("module."): v for k, v in state["student"].items()})
    teacher.load_state_dict(state["teacher"])
    optimizer.load_state_dict(state["optimizer"])
    dino_loss.load_state_dict(state["dino_loss"])
    if state["fp16_scaler"]:
        scaler.load_state_dict(state["fp16_scaler"])
    if not checkpoint.set_rng_state(state["rng"]):
        distributed.print0(f"note: saved by {len(state['rng'])} processes, now {world}: fresh random streams")
    distributed.print0(f"resumed {path} at epoch {state['epoch']}")
    return state["epoch"], state["knn_baselines"]


def knn_top1(model, sets, args, device):
    """Weighted k-NN top-1 (k=20, T=0.07, DINO sec. 4.1) in percent of a frozen backbone on (train, test)."""
    results = knn_eval(model, *sets, device, ks=(20,), T=0.07, image_size=args.global_crop_size,
                       batch_size=max(args.batch_size_per_gpu, 64), num_workers=min(args.num_workers, 4))
    return results[20][0]


@torch.no_grad()
def attention_figures(backbone, images, gt_masks, folder, epoch):
    """Save the teacher's CLS attention maps of the first 2 images (ViT only) as PNGs, and those of the first 8 as
    ep{epoch}.pt (images (8, 3, S, S) float in [0, 1], attn (8, heads, S/p, S/p): what tools.dino_figure draws),
    and return the Jaccard index (tools.segmentation.jaccard) of the best head's 60%-mass masks against the
    objects (shapes only; else None). images: normalised (n, 3, S, S) float; gt_masks: (n, S, S) bool or None."""
    attn = cls_attention_maps(backbone.eval(), images)                        # (n, heads, S/p, S/p)
    masks = mass_threshold_masks(attn, 0.6)
    mean, std = (torch.tensor(v, device=images.device).view(3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    os.makedirs(folder, exist_ok=True)
    for i in range(min(2, len(images))):
        save_attention_figure(images[i] * std + mean, attn[i], masks[i], os.path.join(folder, f"ep{epoch:04d}_{i}.png"))
    with checkpoint.atomic_write(os.path.join(folder, f"ep{epoch:04d}.pt")) as tmp:
        torch.save(dict(images=(images[:8] * std + mean).clamp(0, 1).cpu(), attn=attn[:8].cpu()), tmp)
    if gt_masks is None:
        return None
    p = backbone.patch_size  # ground truth at the patch grid: a patch is object when most of its pixels are
    gt = nn.functional.avg_pool2d(gt_masks.float()[:, None], p)[:, 0] > 0.5  # (n, S/p, S/p)
    return 100 * jaccard(masks, gt[:, None].expand_as(masks)).mean(0).max().item()  # best head, mean over images


def evaluate_baselines(teacher, knn_sets, attention, args, info, out, logger):
    """Before training (logged as epoch 0): with --baselines, the k-NN of the random-init teacher and of raw pixels;
    for a ViT, the attention maps at init and (shapes) their Jaccard -> {"random_init": %, "raw_pixels": %,
    "random_init_jaccard": %}, the keys that were measured."""
    baselines = {}
    if args.baselines and knn_sets:
        baselines = dict(random_init=knn_top1(teacher.backbone, knn_sets, args, info.device),
                         raw_pixels=knn_top1(nn.Flatten(), knn_sets, args, info.device))
        distributed.print0(f"k-NN baselines (k=20): random-init {args.arch} {baselines['random_init']:.1f}%, "
                           f"raw pixels {baselines['raw_pixels']:.1f}%")
    if attention and info.is_main:  # the maps before training, to compare with the end
        jaccard_index = attention_figures(teacher.backbone, *attention, out / "attention", 0)
        if jaccard_index is not None:
            baselines["random_init_jaccard"] = jaccard_index
            distributed.print0(f"attention baseline: random-init {args.arch} Jaccard {jaccard_index:.1f} (best head)")
    log_names = dict(random_init="knn_top1", raw_pixels="knn_raw_pixels", random_init_jaccard="attn_jaccard")
    if baselines:  # one epoch-0 record, named as the trained teacher's records
        logger.log(epoch=0, **{log_names[k]: v for k, v in baselines.items()})
    teacher.train()
    return baselines


def evaluate(teacher, knn_sets, attention, args, info, out, epoch):
    """The teacher's k-NN top-1 and, for a ViT, its attention maps (+ their Jaccard on the shapes) after `epoch`
    -> the log record's evaluation fields."""
    record = {}
    if knn_sets:
        record["knn_top1"] = knn_top1(teacher.backbone, knn_sets, args, info.device)
    if attention and info.is_main:
        jaccard_index = attention_figures(teacher.backbone, *attention, out / "attention", epoch)
        if jaccard_index is not None:
            record["attn_jaccard"] = jaccard_index
    teacher.train()
    return record


def save_teacher_backbone(teacher, out):
    """The teacher's backbone alone, named as a plain backbone (the official "backbone only" file), and the same
    tensors as safetensors (loading it runs no code: what the Hugging Face Hub holds); each written atomically."""
    with checkpoint.atomic_write(out / "teacher_backbone.pth") as tmp:
        torch.save(teacher.backbone.state_dict(), tmp)
    with checkpoint.atomic_write(out / "teacher_backbone.safetensors") as tmp:
        save_safetensors({k: v.contiguous() for k, v in teacher.backbone.state_dict().items()}, str(tmp))


def train_dino(args, run=None):
    """The run, in the official train_dino's sections; `run` (checkpoint.stop_cleanly) is told of every checkpoint
    saved, for the line Ctrl-C or SIGTERM prints."""
    run = run or checkpoint.RunOnDisk(__file__, [])
    offline = args.data is None
    with cli.errors():  # bad flags, folders and files end here with a one-line error
        check_flags(args)
        training.keep_freed_memory()  # the CPU's eager tensor ops: no fresh pages per op (training.py)
        info = distributed.setup_distributed(args.device)
        precision = training.resolve_precision(args.precision, info.device)
        out = checkpoint.make_output_dir(args.output_dir, files=OUTPUTS)
        checkpoint.lock_output_dir(out)  # a second run on the same folder stops here
        ckpt_path = out / "checkpoint.pth"
        if ckpt_path.exists() and not args.resume:
            raise ValueError(f"{ckpt_path} exists: add --resume to continue it, or pick another --output_dir")
        # ============ preparing data ... ============
        augment = MultiCropAugment(args.global_crop_size, args.local_crop_size, args.local_crops_number,
                                   tuple(args.global_crops_scale), tuple(args.local_crops_scale), args.color_jitter,
                                   args.color_jitter_p)
        train_set, loader, knn_sets, attention = build_data(args, augment, info)
    device, world = info.device, info.world_size
    if offline:
        distributed.print0(preset_line(args))
    distributed.print0(f"{describe(train_set)}; {world} process(es) on {device}, {precision}; args: {vars(args)}")
    niter = min(len(loader), args.iters_per_epoch or len(loader))

    # ============ building student and teacher networks ... ============
    student, teacher, student_ddp = build_student_teacher(args, info)
    distributed.seed_everything(args.seed, info.rank)  # from here each process draws its own drop-path masks
    distributed.print0(f"student and teacher: {args.arch} + DINOHead(K={args.out_dim}), "
                       f"{training.count_parameters(student) / 1e6:.1f}M parameters each")
    with cli.errors():
        dino_loss, optimizer, scaler, schedules = build_loss_and_optimizer(args, student, niter, world, precision)
        # ============ optionally resume training ... ============
        start_epoch, baselines = 0, {}
        if args.resume:
            start_epoch, baselines = restart_from_checkpoint(ckpt_path, args, student, teacher, optimizer,
                                                             dino_loss, scaler, world)
            run.saved(ckpt_path, start_epoch)
            training.trim_log(out / "log.jsonl", start_epoch)  # killed after logging an epoch but before saving it

    logger = training.JsonlLogger(out / "log.jsonl")
    if start_epoch == 0:  # the numbers and maps training has to beat
        baselines = evaluate_baselines(teacher, knn_sets, attention, args, info, out, logger)

    progress = training.Progress(args.epochs, niter, args.log_every, start_epoch)
    start_time, top1 = time.time(), None
    for epoch in range(start_epoch, args.epochs):
        # ============ training one epoch of DINO ... ============
        loader.set_epoch(epoch)  # the order depends on (seed, epoch) only
        record = train_one_epoch(student, teacher, student_ddp, dino_loss, loader, optimizer, scaler, augment,
                                 schedules, epoch, niter, progress, args, info, precision, ckpt_path)
        record["time"] = time.time() - start_time
        # ============ evaluating, writing logs and the checkpoint ... ============
        if epoch + 1 == args.epochs or (args.eval_every and (epoch + 1) % args.eval_every == 0):
            record.update(evaluate(teacher, knn_sets, attention, args, info, out, epoch + 1))
            top1 = record.get("knn_top1")
        state = dict(kind="dino", epoch=epoch + 1, args=vars(args), dino_loss=dino_loss.state_dict(),
                     student={"module." + k: v for k, v in student.state_dict().items()},  # as official DDP's
                     teacher=teacher.state_dict(), optimizer=optimizer.state_dict(),
                     fp16_scaler=scaler.state_dict(), knn_baselines=baselines, rng=checkpoint.rng_state())
        run.save(ckpt_path, state)  # checkpoint.save_checkpoint, noting the epoch a Ctrl-C would resume from
        if args.saveckp_freq and epoch % args.saveckp_freq == 0:
            checkpoint.save_checkpoint(out / f"checkpoint{epoch:04}.pth", state)
        logger.log(record)
        if info.is_main:
            keys = ["train_loss", "teacher_entropy", "kl_to_uniform"] + (["knn_top1"] if knn_sets else [])
            training.plot_curves(out / "log.jsonl", out / "curves.png", keys)
        distributed.print0(f"epoch {epoch + 1}/{args.epochs}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in record.items() if k in ("train_loss", "teacher_entropy", "knn_top1",
                                                                "attn_jaccard")))
    if info.is_main:
        save_teacher_backbone(teacher, out)
    distributed.print0(f"done in {training.format_time(time.time() - start_time)}; wrote {out}/teacher_backbone.pth")
    if top1 is not None:
        distributed.print0(f"k-NN top-1 (k=20, T=0.07) on {describe(knn_sets[1])}: DINO teacher {top1:.1f}%" + (
            f" | random-init {args.arch} {baselines['random_init']:.1f}% | raw pixels {baselines['raw_pixels']:.1f}%"
            if "random_init" in baselines else ""))


def train_one_epoch(student, teacher, student_ddp, dino_loss, loader, optimizer, scaler, augment, schedules, epoch,
                    niter, progress, args, info, precision, ckpt_path):
    """One epoch of DINO steps (Algorithm 1 of the paper) -> the epoch's log record (mean loss, last schedule
    values, the teacher's collapse statistics)."""
    indices = list(loader.sampler) if args.seed_per_image else None  # this process's images, in order
    student.train(), teacher.train()  # the official teacher always runs in train mode (BN: batch statistics)
    lr, wd, momentum = schedules["lr"], schedules["wd"], schedules["momentum"]
    ln_k, losses, stats = math.log(args.out_dim), [], {}
    for it, (images, _) in enumerate(loader):
        if it == niter:
            break
        if len(images) == 0:  # every file of the batch was unreadable (data.ImageFolderDataset skips them)
            continue
        step = epoch * niter + it  # global iteration: the index of every schedule
        training.set_schedules(optimizer, float(lr[step]), float(wd[step]))
        images = images.to(info.device, non_blocking=True)
        if args.seed_per_image:
            batch = indices[it * args.batch_size_per_gpu:][:len(images)]
            views = [augment(images[k:k + 1], torch.Generator().manual_seed(step_seed(args.seed, epoch, i)))
                     for k, i in enumerate(batch)]
            crops = [torch.cat(v) for v in zip(*views)]
        else:
            crops = augment(images, torch.Generator().manual_seed(step_seed(args.seed, epoch, it, info.rank)))
        log_now = (it + 1) % args.log_every == 0 or it + 1 == niter
        with training.autocast_context(info.device, precision):
            with torch.no_grad():
                teacher_output = teacher(crops[:2])  # only the 2 global views go through the teacher
            student_output, student_features = student_ddp(crops, return_features=True)  # every view
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
        update_teacher(student, teacher, momentum[step])  # EMA (DINO sec. 3.1)

        watch = dict(entropy=stats["entropy"], kl_unif=stats["kl_to_uniform"]) if log_now else {}
        if log_now and args.koleo_weight:
            watch["koleo"] = koleo.item()
        progress.step(epoch, it, losses[-1], lr[step], args.batch_size_per_gpu * info.world_size, wd=wd[step],
                      mom=momentum[step], **watch)
        if log_now and epoch >= args.freeze_last_layer and min(losses[-1], stats["entropy"]) > 0.95 * ln_k:
            distributed.print0(f"collapse? loss {losses[-1]:.3f} and teacher entropy {stats['entropy']:.3f} are "
                               f"near ln(K) = {ln_k:.3f} (uniform); try a lower --teacher_temp")
        if log_now and stats["kl_to_uniform"] > 0.95 * ln_k:
            distributed.print0(f"collapse? KL(mean target || uniform) {stats['kl_to_uniform']:.3f} near ln(K): "
                               "one prototype wins for every image")
    return dict(epoch=epoch + 1, train_loss=float(np.mean(losses)), lr=lr[step], wd=wd[step], momentum=momentum[step],
                teacher_temp=dino_loss.teacher_temp_at(epoch), teacher_entropy=stats["entropy"],
                kl_to_uniform=stats["kl_to_uniform"])


def main(argv=None):
    with checkpoint.stop_cleanly(__file__, argv) as run:  # Ctrl-C, SIGTERM: one line, the saved epoch, the command
        train_dino(parse_args(argv), run)
    distributed.cleanup_distributed()


if __name__ == "__main__":
    main()
