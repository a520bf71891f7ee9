"""Supervised training of a Vision Transformer (Dosovitskiy et al. 2020) with the DeiT recipe (Touvron et al. 2021).

    python train_vit.py                                        # CPU, offline: digits, ViT-Ti/4, 3 min, 96.9%
    python train_vit.py --data /data/imagenet                  # one GPU: ViT-S/16, DeiT recipe, 300 epochs
    torchrun --nproc_per_node=8 train_vit.py --data /data/imagenet --batch_size 128     # 8 GPUs, 1024 images a step
    python train_vit.py --data /data/imagenet --pretrained dino_deitsmall16_pretrain.pth --epochs 100   # fine-tune DINO
    python train_vit.py --data /data/imagenet --resume         # continue output_dir/checkpoint.pt after a stop

--data is an ImageNet-style folder (train/<class>/*.JPEG and val/<class>/*.JPEG) or a CIFAR python folder (then pass
--image_size 32 --patch_size 4); without it the script trains on scikit-learn's digits, which needs no download.
Written to --output_dir: checkpoint.pt (every epoch), log.jsonl (one line an epoch), curves.png, results.json.
"""
import argparse

import numpy as np
import torch

from minivit import checkpoint, cli, distributed, supervised, training
from minivit.models import build_model, load_pretrained
from minivit.supervised import check_flags

KIND = "vit"  # the checkpoint's kind: the other script refuses to resume it
# the recipe for ImageNet folders: DeiT (Touvron et al. 2021) without RandAugment and random erasing
IMAGENET = dict(arch="vit_s16", image_size=224, crop_scale=0.08, hflip=True, epochs=300,
                warmup_epochs=5, batch_size=64, lr=5e-4, drop_path=0.1, num_workers=8)
# without --data (or with --data digits): ViT-Ti on the 8x8 digits, 96.9% test top-1 in 2m57s on 2 CPU cores
# (Xeon, torch 2.13; chosen by measuring: the same at batch 64 and lr 1e-3 reached 96.1%)
OFFLINE = dict(data="digits", arch="vit_ti16", patch_size=4, image_size=16, load_size=16, crop_scale=0.8,
               hflip=False, epochs=20, warmup_epochs=2, batch_size=32, lr=8e-3, drop_path=0.0, num_workers=0)
# flags that shape the model: a resumed run must pass the same
RESUME_MUST_MATCH = ("patch_size", "image_size", "data")


def get_args_parser():
    """The flags, in groups; those left at None are filled by the recipe (OFFLINE or IMAGENET above)."""
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default=None, help="a ViT of minivit.models.ARCHS; default vit_s16 (DeiT-S, 22M), "
                   "vit_ti16 offline. vit_b16 for the paper's ViT-B (~4x the compute of S)")
    g.add_argument("--patch_size", type=int, default=None, help="patch side in pixels; default: the arch's (16 in "
                   "vit_s16), 4 offline. Smaller patches = more tokens: better accuracy, quadratic attention cost")
    g.add_argument("--drop_path", type=float, default=None, help="stochastic depth rate of the last block; default "
                   "0.1 (DeiT-S), 0 offline. Raise it for bigger models (DeiT-B: 0.1, ViT-L needs more)")
    g.add_argument("--pretrained", default=None, help="start from these weights (official DINO or timm files, or our "
                   "own checkpoints) via models.load_pretrained; the classifier head starts fresh if the file has "
                   "none")
    supervised.add_data_args(parser)
    g = parser.add_argument_group("optimisation (DeiT recipe; RandAugment and random erasing are not implemented)")
    g.add_argument("--epochs", type=int, default=None, help="default 300 (DeiT), 20 offline")
    g.add_argument("--batch_size", type=int, default=None, help="images per process per step; default 64 (DeiT's 1024 "
                   "on 16 GPUs), 32 offline. Lower it if out of memory: the lr follows the global batch")
    g.add_argument("--lr", type=float, default=None, help="AdamW peak lr for a global batch of 512, scaled linearly "
                   "to the real one (DeiT); default 5e-4, 8e-3 offline. Lower it (e.g. 1e-4) when fine-tuning "
                   "--pretrained")
    g.add_argument("--min_lr", type=float, default=1e-5, help="lr at the end of the cosine (DeiT)")
    g.add_argument("--warmup_epochs", type=int, default=None, help="linear lr warm-up; default 5 (DeiT), 2 offline. "
                   "Must stay below --epochs; more if the loss spikes early")
    g.add_argument("--weight_decay", type=float, default=0.05, help="AdamW decoupled weight decay, not on biases and "
                   "norms (DeiT)")
    g.add_argument("--label_smoothing", type=float, default=0.1, help="DeiT's 0.1; 0 for plain cross-entropy")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha; DeiT uses 0.8. Off by default: it pays "
                   "off over long ImageNet runs and slows short ones")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix Beta alpha; DeiT uses 1.0 (with --mixup 0.8, "
                   "each batch uses one of the two)")
    g.add_argument("--clip_grad", type=float, default=0.0, help="clip the global gradient norm to this (0 = off); try "
                   "1.0 if the loss spikes or turns NaN")
    supervised.add_system_args(parser, KIND)
    return parser


def choose_recipe(args):
    """-> (name, values that become the defaults): OFFLINE without --data (or with --data digits), else IMAGENET."""
    return ("offline", OFFLINE) if args.data in (None, "digits") else ("imagenet", IMAGENET)


def parse_args(argv=None):
    """Flags -> args: the recipe's values as the defaults (cli.parse_with_preset: flags given still win), then every
    number checked in one line."""
    parser = get_args_parser()
    args, recipe, applied = cli.parse_with_preset(parser, argv, choose_recipe)
    if recipe == "offline" and applied:
        distributed.print0(f"offline defaults: {cli.as_flags(applied)}")
    check_flags(parser, args, positive=("patch_size",), probability=("drop_path",))  # nonsense numbers stop here
    return args


def build_model_and_optimizer(args, info, train_set, steps):
    """The model (on the device; --pretrained loaded), the optimizer and the per-step schedules -> (raw_model,
    memory_format, optimizer, lr_schedule, wd_schedule)."""
    patch = {} if args.patch_size is None else {"patch_size": args.patch_size}
    model = build_model(args.arch, num_classes=train_set.num_classes, img_size=args.image_size,
                        drop_path_rate=args.drop_path, **patch)
    if args.pretrained:
        note = load_pretrained(model, args.pretrained, args.trust_pickle)
        distributed.print0(f"pretrained {args.pretrained}: {note}")
    memory_format = torch.contiguous_format
    raw_model = model.to(info.device)  # the plain module: saved, loaded and evaluated

    global_batch = args.batch_size * info.world_size
    lr = args.lr * global_batch / 512  # DeiT's linear scaling rule: 5e-4 for 512 images a step
    optimizer = torch.optim.AdamW(training.param_groups(raw_model, args.weight_decay), lr=lr)
    lr_schedule = training.cosine_schedule(lr, args.min_lr, args.epochs, steps, args.warmup_epochs)
    wd_schedule = np.full(args.epochs * steps, args.weight_decay)  # constant (DeiT); DINO's grows along a cosine
    distributed.print0(f"{args.arch}: {training.count_parameters(raw_model) / 1e6:.2f}M parameters; {args.epochs} "
                       f"epochs of {steps} steps, {global_batch} images a step, peak lr {lr:.2e}")
    return raw_model, memory_format, optimizer, lr_schedule, wd_schedule


def main(argv=None):
    with checkpoint.stop_cleanly(__file__, argv) as run:  # Ctrl-C, SIGTERM: one line, the saved epoch, the command
        supervised.fit(parse_args(argv), run, KIND, RESUME_MUST_MATCH, build_model_and_optimizer)


if __name__ == "__main__":
    main()
