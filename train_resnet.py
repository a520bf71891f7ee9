"""Supervised training of a ResNet (He et al. 2015), the CNN baseline of ViT and DINO, with the classic recipe.

    python train_resnet.py                                     # CPU, offline: digits, ResNet-18, 2 min, 98.6%
    python train_resnet.py --data /data/imagenet               # one GPU: ResNet-50, SGD, 90 epochs
    torchrun --nproc_per_node=8 train_resnet.py --data /data/imagenet --sync_bn    # 8 GPUs, 512 images a step
    python train_resnet.py --data /data/imagenet --pretrained dino_resnet50_pretrain.pth --epochs 30   # fine-tune DINO
    python train_resnet.py --data /data/imagenet --resume      # continue output_dir/checkpoint.pt after a stop

--data is an ImageNet-style folder (train/<class>/*.JPEG and val/<class>/*.JPEG) or a CIFAR python folder (then pass
--image_size 32 --small_stem); without it the script trains on scikit-learn's digits, which needs no download.
Written to --output_dir: checkpoint.pt (every epoch), log.jsonl (one line an epoch), curves.png, results.json.
"""
import argparse

import numpy as np
import torch

from minivit import checkpoint, cli, distributed, supervised, training
from minivit.models import build_model, load_pretrained
from minivit.supervised import check_flags

KIND = "resnet"  # the checkpoint's kind: the other script refuses to resume it
# the recipe for ImageNet folders: torchvision's classic one (SGD 0.1 per 256 images, momentum 0.9, wd 1e-4), with
# a warm-up + cosine instead of its step decay (Goyal et al. 2017; Loshchilov & Hutter 2017)
IMAGENET = dict(arch="resnet50", small_stem=False, image_size=224, crop_scale=0.08, hflip=True,
                epochs=90, warmup_epochs=5, batch_size=64, lr=0.1, num_workers=8)
# without --data (or with --data digits): ResNet-18 on the 8x8 digits, 98.6% test top-1 in 2m03s on 2 CPU cores
# (Xeon, torch 2.13; chosen by measuring: at 8 px, 15 epochs took half the CPU time and reached 97.5%)
OFFLINE = dict(data="digits", arch="resnet18", small_stem=True, image_size=16, load_size=16, crop_scale=0.8,
               hflip=False, epochs=10, warmup_epochs=1, batch_size=64, lr=0.4, num_workers=0)
# flags that shape the model: a resumed run must pass the same
RESUME_MUST_MATCH = ("small_stem", "data")


def get_args_parser():
    """The flags, in groups; those left at None are filled by the recipe (OFFLINE or IMAGENET above)."""
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument("--arch", default=None, help="a ResNet of minivit.models.ARCHS; default resnet50 (25.6M), resnet18 "
                   "offline. resnet18/34 for quick baselines, resnet101/152 for more accuracy at 2-3x the cost")
    g.add_argument("--small_stem", action=argparse.BooleanOptionalAction, default=None, help="3x3/1 stem without "
                   "max-pool for images of 32 px or less (CIFAR, digits); on offline, off for ImageNet. Not with "
                   "ImageNet weights")
    g.add_argument("--zero_init_residual", action="store_true", help="start each residual branch's last BN at 0, so "
                   "blocks begin as identities: helps large-batch training (Goyal et al. 2017)")
    g.add_argument("--sync_bn", action="store_true", help="BatchNorm statistics over all GPUs (torchrun on CUDA "
                   "only); turn on when the batch per GPU is small (< 32)")
    g.add_argument("--pretrained", default=None, help="start from these weights (torchvision, timm or official DINO "
                   "files, or our own checkpoints) via models.load_pretrained; the fc starts fresh if the file has "
                   "none")
    supervised.add_data_args(parser)
    g = parser.add_argument_group("optimisation (classic recipe: SGD, momentum, weight decay, warm-up + cosine)")
    g.add_argument("--epochs", type=int, default=None, help="default 90 (torchvision), 10 offline")
    g.add_argument("--batch_size", type=int, default=None, help="images per process per step; default 64. Lower it if "
                   "out of memory: the lr follows the global batch")
    g.add_argument("--lr", type=float, default=None, help="SGD peak lr for a global batch of 256, scaled linearly to "
                   "the real one (Goyal et al. 2017); default 0.1, 0.4 offline. Lower it (e.g. 0.01) to fine-tune "
                   "--pretrained")
    g.add_argument("--min_lr", type=float, default=0.0, help="lr at the end of the cosine")
    g.add_argument("--warmup_epochs", type=int, default=None, help="linear lr warm-up; default 5, 1 offline. Must "
                   "stay below --epochs; needed for global batches above ~1k (Goyal et al. 2017)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (torchvision, He et al. 2015)")
    g.add_argument("--nesterov", action="store_true", help="Nesterov momentum: sometimes a little better, same cost")
    g.add_argument("--weight_decay", type=float, default=0.0001, help="L2 weight decay, not on BN parameters and "
                   "biases (torchvision's 1e-4)")
    g.add_argument("--label_smoothing", type=float, default=0.0, help="0 in the classic recipe; torchvision's newer "
                   "recipe uses 0.1")
    g.add_argument("--mixup", type=float, default=0.0, help="mixup Beta alpha; torchvision's newer recipe uses 0.2. "
                   "Off in the classic recipe")
    g.add_argument("--cutmix", type=float, default=0.0, help="CutMix Beta alpha; torchvision's newer recipe uses 1.0 "
                   "(with --mixup, each batch uses one of the two)")
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
    check_flags(parser, args, probability=("momentum",))  # nonsense numbers stop here
    return args


def build_model_and_optimizer(args, info, train_set, steps):
    """The model (on the device; --pretrained loaded), the optimizer and the per-step schedules -> (raw_model,
    memory_format, optimizer, lr_schedule, wd_schedule)."""
    model = build_model(args.arch, num_classes=train_set.num_classes, small_stem=args.small_stem,
                        zero_init_residual=args.zero_init_residual)
    if args.pretrained:
        note = load_pretrained(model, args.pretrained, args.trust_pickle)
        distributed.print0(f"pretrained {args.pretrained}: {note}")
    # channels_last: cuDNN's fastest convolutions (tensor cores) want NHWC; on the CPU it does not pay
    memory_format = torch.channels_last if info.device_type == "cuda" else torch.contiguous_format
    if args.sync_bn and info.distributed:
        if info.device_type != "cuda":
            raise ValueError("--sync_bn needs CUDA GPUs (torch's SyncBatchNorm); drop it on the CPU")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    raw_model = model.to(info.device, memory_format=memory_format)  # the plain module: saved, loaded and evaluated

    global_batch = args.batch_size * info.world_size
    lr = args.lr * global_batch / 256  # the linear scaling rule (Goyal et al. 2017): 0.1 for 256 images a step
    optimizer = torch.optim.SGD(training.param_groups(raw_model, args.weight_decay), lr=lr,
                                momentum=args.momentum, nesterov=args.nesterov)
    lr_schedule = training.cosine_schedule(lr, args.min_lr, args.epochs, steps, args.warmup_epochs)
    wd_schedule = np.full(args.epochs * steps, args.weight_decay)  # constant, as in torchvision
    distributed.print0(f"{args.arch}: {training.count_parameters(raw_model) / 1e6:.2f}M parameters; {args.epochs} "
                       f"epochs of {steps} steps, {global_batch} images a step, peak lr {lr:.2e}")
    return raw_model, memory_format, optimizer, lr_schedule, wd_schedule


def main(argv=None):
    with checkpoint.stop_cleanly(__file__, argv) as run:  # Ctrl-C, SIGTERM: one line, the saved epoch, the command
        supervised.fit(parse_args(argv), run, KIND, RESUME_MUST_MATCH, build_model_and_optimizer)


if __name__ == "__main__":
    main()
