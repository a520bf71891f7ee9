"""What train_vit.py and train_resnet.py share, written once: the step loop of one epoch, the evaluation, batched
mixup / cutmix, the subset behind --train_fraction, the one-line errors of the command line, and (at the end) the
whole run, `fit`: setup, data, resume, the epoch loop and the final report.

The scripts keep their recipe (flags, model, optimizer, schedules: build_model_and_optimizer) and hand it to fit;
this file holds only what would otherwise be copied between them, so `diff train_vit.py train_resnet.py` shows the
model and the recipe alone.
"""
import argparse
import json
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from minivit import checkpoint, cli, distributed, training
from minivit.augment import EvalTransform, SupervisedAugment
from minivit.data import build_dataset, build_loader, describe
from minivit.models import arch_family

# ------------------------------------------------------------------------------------------------ data


class Subset(Dataset):
    """The images `indices` of `dataset`, keeping what the scripts read from a dataset: .classes, .num_classes,
    .targets, .load_size, .min_pixels, .source, .split (e.g. "train[10%]")."""

    def __init__(self, dataset, indices, split):
        self.dataset, self.indices = dataset, list(indices)
        self.classes, self.num_classes, self.load_size = dataset.classes, dataset.num_classes, dataset.load_size
        self.source, self.split = dataset.source, split
        self.min_pixels = getattr(dataset, "min_pixels", None)  # whole photos: build_loader batches data.Photos
        self.targets = [dataset.targets[i] for i in self.indices]

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, i):
        return self.dataset[self.indices[i]]


def subset(dataset, fraction: float, seed: int = 0):
    """A deterministic, class-balanced fraction of `dataset`: round(fraction * n_c) images (at least 1) of each
    class c, drawn from `seed` alone, so every run and every process picks the same images. fraction 1 -> the
    dataset itself. Used by --train_fraction to compare ViT and ResNet as the training set shrinks (the ViT paper's
    point: ViTs need more data, sec. 4.3)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"train_fraction={fraction} must be in (0, 1]; 1 keeps the whole training set")
    if fraction == 1.0:
        return dataset
    targets = torch.as_tensor(dataset.targets)
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(dataset.num_classes):
        members = (targets == c).nonzero().flatten()
        if len(members):
            chosen = members[torch.randperm(len(members), generator=generator)]
            keep.append(chosen[:max(1, round(fraction * len(members)))])
    indices = torch.cat(keep).sort().values.tolist()  # file order, not class order: the loader shuffles anyway
    return Subset(dataset, indices, f"{dataset.split}[{fraction:.0%}]")


# ------------------------------------------------------------------------------------------------ mixup / cutmix


def _beta(alpha: float, generator: torch.Generator | None) -> float:
    """One draw of Beta(alpha, alpha), made reproducible by `generator` (torch's Beta sampler takes none)."""
    seed = int(torch.randint(2 ** 62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


def _mixed_targets(labels, num_classes, lam):
    """lam * one_hot(labels) + (1 - lam) * one_hot(labels of the batch reversed) -> float (B, num_classes)."""
    one_hot = F.one_hot(labels, num_classes).float()
    return lam * one_hot + (1 - lam) * one_hot.flip(0)


def mixup(images, labels, num_classes: int, alpha: float = 0.8, generator=None):
    """mixup (Zhang et al. 2018): each image blended with its partner in the reversed batch, lam ~ Beta(alpha,
    alpha) once per batch (as timm does for DeiT, alpha 0.8).
    images float (B, 3, H, W), labels int64 (B,) -> mixed images (B, 3, H, W), soft targets float (B, num_classes)
    whose rows sum to 1."""
    lam = _beta(alpha, generator)
    return lam * images + (1 - lam) * images.flip(0), _mixed_targets(labels, num_classes, lam)


def cutmix(images, labels, num_classes: int, alpha: float = 1.0, generator=None):
    """CutMix (Yun et al. 2019): a box of about (1 - lam) of the area, lam ~ Beta(alpha, alpha), is pasted from the
    reversed batch (one box per batch, DeiT's alpha 1.0); lam is then corrected to the box's true area after
    clipping at the border, so the soft targets weigh each label by its share of the pixels.
    images float (B, 3, H, W), labels int64 (B,) -> (B, 3, H, W), soft targets float (B, num_classes)."""
    B, _, H, W = images.shape
    lam = _beta(alpha, generator)
    cut_h, cut_w = int(H * (1 - lam) ** 0.5), int(W * (1 - lam) ** 0.5)
    cy, cx = (int(v) for v in torch.randint(0, 2 ** 31, (2,), generator=generator) % torch.tensor([H, W]))
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
    images = images.clone()
    images[:, :, top:bottom, left:right] = images.flip(0)[:, :, top:bottom, left:right]
    lam = 1 - (bottom - top) * (right - left) / (H * W)
    return images, _mixed_targets(labels, num_classes, lam)


def mix_batch(images, labels, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0,
              generator=None):
    """DeiT's choice per batch: mixup or cutmix with probability 1/2 each when both alphas are > 0, the one that is
    > 0 otherwise; with both 0 the batch is returned unchanged with hard labels.
    -> images (B, 3, H, W), targets: int64 (B,) labels or float (B, num_classes) soft targets (F.cross_entropy
    takes both, and applies label_smoothing to both)."""
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        return images, labels
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or bool(torch.rand(1, generator=generator) < 0.5))
    if use_cutmix:
        return cutmix(images, labels, num_classes, cutmix_alpha, generator)
    return mixup(images, labels, num_classes, mixup_alpha, generator)


# ------------------------------------------------------------------------------------------------ train / eval


def train_one_epoch(model, loader, optimizer, scaler, augment, generator, lr_schedule, wd_schedule, epoch: int,
                    steps: int, *, device, precision: str, num_classes: int, label_smoothing: float = 0.0,
                    mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, clip_grad: float = 0.0, progress=None,
                    checkpoint_path="checkpoint.pt", memory_format=torch.contiguous_format) -> dict:
    """One epoch of supervised training: `steps` batches of `loader` (fewer than len(loader) for smoke runs).

    Per step: uint8 batch -> device -> augment(images, generator) (the training views, made on the device with
    the CPU `generator` drawing the random choices) -> optional mixup/cutmix -> this iteration's lr and weight decay
    (lr_schedule / wd_schedule arrays indexed by epoch * steps + it) -> forward and loss under autocast ->
    NaN guard (training.check_finite stops every process) -> backward, optional clipping of the global grad norm,
    step, through the GradScaler (a no-op unless fp16) -> progress line.
    Returns {"loss": mean train loss, "images": images seen by all processes, "seconds", "images_per_s"}.
    """
    model.train()
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    losses, images_seen, start = [], 0, time.perf_counter()
    for it, (images, labels) in enumerate(loader):
        if it >= steps:
            break
        if len(labels) == 0:  # every file of the batch was unreadable (data.ImageFolderDataset skips them)
            continue
        step = epoch * steps + it
        lr = float(lr_schedule[step])  # a python float: numpy scalars would not load back from a checkpoint
        training.set_schedules(optimizer, lr, float(wd_schedule[step]))
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        x = augment(images, generator).contiguous(memory_format=memory_format)
        x, targets = mix_batch(x, labels, num_classes, mixup_alpha, cutmix_alpha, generator)

        with training.autocast_context(device, precision):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
        loss_value = training.check_finite(loss, epoch, it, checkpoint_path)

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if clip_grad > 0:
            scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()

        losses.append(loss_value)
        images_seen += len(images) * world_size
        if progress is not None:
            progress.step(epoch, it, loss_value, lr, len(images) * world_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # count the queued GPU work in the epoch's time
    seconds = time.perf_counter() - start
    return {"loss": float(np.mean(losses)) if losses else float("nan"), "images": images_seen,
            "seconds": seconds, "images_per_s": images_seen / max(seconds, 1e-9)}


@torch.no_grad()
def evaluate(model, loader, transform, device, precision: str, memory_format=torch.contiguous_format) -> dict:
    """Accuracy of `model` on `loader`: transform(uint8 batch) (e.g. augment.EvalTransform) -> logits under autocast.
    Returns {"top1", "top5" (in %, top-k with k = min(5, classes)), "loss" (mean cross-entropy), "images"}, summed
    over all processes when a process group is up (each process evaluating its own share of the test set; the
    DistributedSampler repeats up to world_size - 1 images so that all shares are equal)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(4, device=device)  # correct@1, correct@5, summed loss, images
    for images, labels in loader:
        if len(images) == 0:  # every file of the batch was unreadable (data.ImageFolderDataset skips them)
            continue
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with training.autocast_context(device, precision):
            logits = model(transform(images).contiguous(memory_format=memory_format)).float()  # (B, classes)
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == labels[:, None]  # (B, k), best guess first
        sums[0] += hits[:, 0].sum()
        sums[1] += hits.any(1).sum()
        sums[2] += F.cross_entropy(logits, labels, reduction="sum")
        sums[3] += len(labels)
    if dist.is_initialized():
        dist.all_reduce(sums)
    model.train(was_training)
    n = max(sums[3].item(), 1)
    return {"top1": 100 * sums[0].item() / n, "top5": 100 * sums[1].item() / n, "loss": sums[2].item() / n,
            "images": int(sums[3].item())}


# ------------------------------------------------------------------------------------------------ command line


# the numeric flags train_vit.py and train_resnet.py share, by the rule each must satisfy (cli.check_args)
FLAG_RULES = dict(
    positive=("image_size", "load_size", "epochs", "batch_size", "lr", "log_every", "max_steps_per_epoch",
              "stop_after"),
    non_negative=("warmup_epochs", "min_lr", "weight_decay", "mixup", "cutmix", "clip_grad", "num_workers",
                  "eval_every"),
    probability=("label_smoothing",),
    fraction=("crop_scale", "train_fraction"),
    seed=("seed",))


def check_flags(parser, args, **extra) -> None:
    """Stop in one line at the first numeric flag that makes no sense (FLAG_RULES, plus `extra` rules such as
    positive=("patch_size",)), and at a warm-up that does not end before the last epoch."""
    rules = {rule: FLAG_RULES.get(rule, ()) + tuple(extra.get(rule, ())) for rule in {*FLAG_RULES, *extra}}
    cli.check_args(parser, args, **rules)
    if args.warmup_epochs >= args.epochs:
        cli.fail(f"--warmup_epochs {args.warmup_epochs} must be smaller than --epochs {args.epochs}")


def resume(checkpoint_path, kind: str, args, must_match, model, optimizer, scaler, generator) -> int:
    """Continue a run exactly: load checkpoint_path (written by the same script, `kind`, with the same --arch and
    the flags in `must_match`) into model, optimizer, scaler and the RNG streams. -> the epoch to start from."""
    with cli.errors():
        state = checkpoint.load_checkpoint(checkpoint_path, kind=kind, arch=args.arch)
    changed = [f"--{k} {state['args'].get(k)} (now {getattr(args, k)})" for k in must_match
               if state["args"].get(k) != getattr(args, k)]
    if changed:
        raise SystemExit(f"error: {checkpoint_path} was trained with {', '.join(changed)}; pass the same flags to "
                         "resume it")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    if not checkpoint.set_rng_state(state["rng"], {"augment": generator}):
        distributed.print0("note: the checkpoint comes from another number of processes; random streams start afresh")
    distributed.print0(f"resumed {checkpoint_path} after epoch {state['epoch']}")
    return state["epoch"]


def write_results(path, args, test: dict, model, train_set, log_path, info, precision: str) -> dict:
    """results.json of a finished run (what minivit.tools.compare reads): test accuracy, training speed over the logged
    epochs, parameters and the run's settings. -> the dict written."""
    records = training.read_jsonl(log_path)
    seconds = sum(r["train_seconds"] for r in records)
    results = {"arch": args.arch, "test_top1": test["top1"], "test_top5": test["top5"], "test_loss": test["loss"],
               "train_images_per_s": sum(r["train_images"] for r in records) / max(seconds, 1e-9),
               "train_seconds": seconds, "params": training.count_parameters(model), "epochs": args.epochs,
               "train_fraction": args.train_fraction, "train_images": len(train_set), "data": args.data,
               "image_size": args.image_size, "world_size": info.world_size, "device": str(info.device),
               "precision": precision}
    with checkpoint.atomic_write(path) as tmp:
        tmp.write_text(json.dumps(results, indent=2) + "\n")
    return results


# ------------------------------------------------------------------ the flags both scripts take, written once


def add_data_args(parser) -> None:
    """The "data" flags of train_vit.py and train_resnet.py (None: filled by the script's recipe)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help="an ImageNet-style or CIFAR folder; default: digits (offline)")
    g.add_argument("--image_size", type=int, default=None, help="training/test resolution; default 224, 16 offline. "
                   "Must be a multiple of the patch size")
    g.add_argument("--load_size", type=int, default=None, help="side of the square images decoded from disk (CIFAR, "
                   "digits: crops are taken inside it; image folders: the test view's Resize + centre square, "
                   "training crops come from the whole photo); default 256 for image folders, 32 for CIFAR, 16 "
                   "offline")
    g.add_argument("--crop_scale", type=float, default=None, help="smallest area fraction of RandomResizedCrop; "
                   "default 0.08 (Inception/DeiT), 0.8 offline. Raise it for small images where a tiny crop is "
                   "unrecognisable")
    g.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=None, help="random horizontal flips; on "
                   "for photos, off offline (a mirrored digit is another symbol)")
    g.add_argument("--train_fraction", type=float, default=1.0, help="train on this class-balanced fraction of the "
                   "training set (same images every run); lower it to see how ViTs fare with less data than CNNs")
    g.add_argument("--num_workers", type=int, default=None, help="data loading processes; default 8, 0 offline. Raise "
                   "it if the GPU waits for JPEG decoding (img/s below what --data digits gives)")


def add_system_args(parser, kind: str) -> None:
    """The "system" flags of train_vit.py and train_resnet.py; --output_dir defaults to runs/<kind>."""
    g = parser.add_argument_group("system")
    g.add_argument("--output_dir", default=f"runs/{kind}", help="where checkpoint.pt, log.jsonl, curves.png and "
                   "results.json go")
    g.add_argument("--resume", action="store_true", help="continue from output_dir/checkpoint.pt exactly where it "
                   "stopped (weights, optimizer, epoch, random streams, data order); pass the same flags")
    g.add_argument("--device", default="auto", help="auto (CUDA if available), cuda, cpu or mps")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="autocast dtype; "
                   "auto = bf16 on GPUs that have it, fp32 elsewhere. fp16 (with loss scaling) only for GPUs without "
                   "bf16")
    g.add_argument("--seed", type=int, default=0, help="seeds the weights, data order and augmentations")
    g.add_argument("--log_every", type=int, default=20, help="print a progress line every this many steps")
    g.add_argument("--eval_every", type=int, default=1, help="evaluate every this many epochs and after the last (0: "
                   "only after the last); raise it when the test set is slow to run")
    g.add_argument("--max_steps_per_epoch", type=int, default=None, help="debug: cut each epoch to this many steps")
    g.add_argument("--stop_after", type=int, default=None, help="stop after this many epochs of this job, keeping the "
                   "schedule of --epochs; for clusters with a time limit: run again with --resume")
    cli.add_trust_pickle(parser)


# --------------------------------------------------------------------- the whole run, the same for both scripts

OUTPUTS = ("checkpoint.pt", "log.jsonl", "curves.png", "results.json")  # what --output_dir gets


def setup(args, kind):
    """For a script whose checkpoints are of `kind` ("vit", "resnet"): process, device, precision, the output folder
    (checked and locked) and the augmentations' generator -> (info, precision, out, generator)."""
    with cli.errors():  # bad flags, folders and files end here with a one-line error
        if arch_family(args.arch) != kind:  # an unknown name gets the list of valid ones
            raise ValueError(f"--arch {args.arch} is not a {kind}; train it with train_{arch_family(args.arch)}.py")
        training.keep_freed_memory()  # the CPU's eager tensor ops: no fresh pages per op (training.py)
        info = distributed.setup_distributed(args.device)
        precision = training.resolve_precision(args.precision, info.device)
        out = checkpoint.make_output_dir(args.output_dir, files=OUTPUTS)
        checkpoint.lock_output_dir(out)  # a second run on the same folder stops here
        seed = distributed.seed_everything(args.seed, info.rank)
        generator = torch.Generator().manual_seed(seed)  # the augmentations' random choices, saved in every checkpoint
    distributed.print0(f"{info.world_size} process(es) on {info.device}, precision {precision}")
    return info, precision, out, generator


def build_data(args, info):
    """The training and test loaders, built once -> (augment, train_set, train_loader, test_loader, eval_transform,
    steps per epoch)."""
    augment = SupervisedAugment(args.image_size, scale=(args.crop_scale, 1.0), hflip=args.hflip)
    # image folders: training crops from the whole photo (decoded no smaller than the smallest crop needs)
    train_set = subset(build_dataset(args.data, "train", args.load_size, augment.min_pixels), args.train_fraction,
                       args.seed)
    test_set = build_dataset(args.data, "test", args.load_size)
    distributed.print0(f"train {describe(train_set)}\ntest  {describe(test_set)}")
    train_loader = build_loader(train_set, args.batch_size, shuffle=True, drop_last=True,
                                num_workers=args.num_workers, seed=args.seed, distributed=info.distributed)
    test_loader = build_loader(test_set, args.batch_size, shuffle=False, drop_last=False,
                               num_workers=args.num_workers, distributed=info.distributed)
    steps = min(len(train_loader), args.max_steps_per_epoch or len(train_loader))
    # the test view: the centre image_size square of the load_size image (224 of 256 for ImageNet)
    eval_transform = EvalTransform(args.image_size, resize=max(train_set.load_size, args.image_size))
    return augment, train_set, train_loader, test_loader, eval_transform, steps


def fit(args, run, kind, resume_must_match, build_model_and_optimizer):
    """The whole run of train_vit.py / train_resnet.py: setup, data, the script's own
    build_model_and_optimizer(args, info, train_set, steps), optional resume, the epoch loop, the final report. `kind`
    names the checkpoints (the other script refuses them), resume_must_match the flags a resumed run must repeat;
    `run` (checkpoint.stop_cleanly) is told of every checkpoint saved, for the line Ctrl-C or SIGTERM prints."""
    info, precision, out, generator = setup(args, kind)
    with cli.errors():  # a missing folder, a batch larger than the data set, weights of another model, ...
        augment, train_set, train_loader, test_loader, eval_transform, steps = build_data(args, info)
        raw_model, memory_format, optimizer, lr_schedule, wd_schedule = build_model_and_optimizer(args, info,
                                                                                                   train_set, steps)
    scaler = training.make_grad_scaler(info.device, precision)
    ckpt_path, log_path = out / "checkpoint.pt", out / "log.jsonl"
    start_epoch = 0
    if args.resume:
        start_epoch = resume(ckpt_path, kind, args, resume_must_match, raw_model, optimizer, scaler, generator)
        run.saved(ckpt_path, start_epoch)
        training.trim_log(log_path, start_epoch)  # a run killed after logging an epoch but before saving it
    elif info.is_main and log_path.exists():
        log_path.unlink()  # a fresh run starts a fresh log
    model = DistributedDataParallel(raw_model) if info.distributed else raw_model

    # ------------------------------------------------------------------------------------------------ training loop
    logger = training.JsonlLogger(log_path)
    progress = training.Progress(args.epochs, steps, args.log_every, start_epoch)
    end_epoch = min(args.epochs, start_epoch + args.stop_after) if args.stop_after else args.epochs
    test = None
    for epoch in range(start_epoch, end_epoch):
        train_loader.set_epoch(epoch)  # the data order depends on (seed, epoch) only: a resumed run sees the same
        train = train_one_epoch(model, train_loader, optimizer, scaler, augment, generator, lr_schedule, wd_schedule,
                                epoch, steps, device=info.device, precision=precision,
                                num_classes=train_set.num_classes, label_smoothing=args.label_smoothing,
                                mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, clip_grad=args.clip_grad,
                                progress=progress, checkpoint_path=ckpt_path, memory_format=memory_format)
        record = {"epoch": epoch + 1, "train_loss": train["loss"], "lr": optimizer.param_groups[0]["lr"],
                  "train_images": train["images"], "train_seconds": train["seconds"]}
        if epoch + 1 == args.epochs or (args.eval_every > 0 and (epoch + 1) % args.eval_every == 0):
            test = evaluate(raw_model, test_loader, eval_transform, info.device, precision, memory_format)
            record.update(test_loss=test["loss"], test_top1=test["top1"], test_top5=test["top5"])
            distributed.print0(f"epoch {epoch + 1}/{args.epochs}: train loss {train['loss']:.4f} | test loss "
                               f"{test['loss']:.4f} top-1 {test['top1']:.2f}% top-5 {test['top5']:.2f}% | "
                               f"{train['images_per_s']:.0f} img/s")
        logger.log(record)
        run.save(ckpt_path, {"kind": kind, "model": raw_model.state_dict(), "epoch": epoch + 1,
                             "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                             "args": vars(args), "rng": checkpoint.rng_state({"augment": generator})})
    if end_epoch < args.epochs:
        distributed.print0(f"stopped after epoch {end_epoch} of {args.epochs} (--stop_after); continue with --resume")
        distributed.cleanup_distributed()
        return

    # ------------------------------------------------------------------------------------------------- final report
    if test is None:  # a finished run resumed: nothing was trained, report its test accuracy all the same
        test = evaluate(raw_model, test_loader, eval_transform, info.device, precision, memory_format)
    if info.is_main:
        training.plot_curves(log_path, out / "curves.png", ["train_loss", "test_loss", "test_top1", "lr"])
        write_results(out / "results.json", args, test, raw_model, train_set, log_path, info, precision)
    distributed.print0(f"test top-1 {test['top1']:.1f}% top-5 {test['top5']:.1f}%")
    distributed.cleanup_distributed()
