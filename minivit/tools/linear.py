"""Linear probe: train one linear layer on the features of a frozen backbone (DINO sec. 4.1, eval_linear.py).

Features (the official eval_linear.py): ViT-S concatenates the CLS tokens of its last 4 blocks, each passed
through the final norm (`--n_last_blocks 4`); ViT-B uses the last CLS token and the mean patch token
(`--n_last_blocks 1 --avgpool_patchtokens`); a ResNet uses its pooled feature. Optimisation: SGD momentum 0.9,
no weight decay, lr = 0.001 * batch / 256, cosine to 0 over the epochs, 100 epochs on ImageNet. Training views:
RandomResizedCrop (scale 0.08-1) of the whole photo with torchvision's default bilinear filter + flip, as the official
train_transform (DINO's pre-training crops are bicubic; the probe's are not); evaluation: resize + centre crop.

    python -m minivit.tools.linear --arch vit_s16 --weights dino_deitsmall16_pretrain.pth --data /path/to/imagenet
    python -m minivit.tools.linear --arch vit_ti16 --weights ckpt.pth --data digits --image_size 32 --no_aug --epochs 50
"""
import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from minivit import cli, distributed
from minivit.augment import SupervisedAugment
from minivit.data import build_dataset, build_loader, describe
from minivit.models import load_backbone
from minivit.tools.knn import eval_transform


class LinearClassifier(nn.Module):
    """One linear layer on frozen features: (B, dim) float -> (B, num_classes) logits.
    Initialised as the official probe: weights N(0, 0.01^2), bias 0."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        return self.linear(x.flatten(1))


def probe_features(model, images, n_last_blocks=4, avgpool_patchtokens=False):
    """Frozen features for the probe: (B, 3, H, W) float -> (B, feature_dim(...)) float32.

    A ViT (anything with get_intermediate_layers) gives the CLS tokens of its last n_last_blocks blocks, each
    after the final norm, concatenated, plus the mean patch token of the last block if avgpool_patchtokens;
    any other backbone (ResNet) gives model(images), its pooled feature."""
    if not hasattr(model, "get_intermediate_layers"):
        return model(images).float()
    blocks = model.get_intermediate_layers(images, n_last_blocks)   # n tensors (B, 1+N, D), normed
    feats = [x[:, 0] for x in blocks]                               # CLS tokens, (B, D) each
    if avgpool_patchtokens:
        feats.append(blocks[-1][:, 1:].mean(dim=1))                 # mean patch token (B, D)
    return torch.cat(feats, dim=-1).float()


def feature_dim(model, n_last_blocks=4, avgpool_patchtokens=False):
    """Length of probe_features(model, ...) rows: embed_dim * (n_last_blocks + avgpool) for a ViT."""
    if hasattr(model, "get_intermediate_layers"):
        return model.embed_dim * (n_last_blocks + int(avgpool_patchtokens))
    return model.num_features


def dino_probe_recipe(model):
    """DINO's probe features for a backbone -> (n_last_blocks, avgpool_patchtokens): (4, False) for ViT-Ti/S,
    (1, True) for ViT-B and wider (official eval_linear.py); a ResNet ignores both."""
    return (1, True) if getattr(model, "embed_dim", 0) >= 768 else (4, False)


def image_batches(model, loader, device, transform, n_last_blocks=4, avgpool_patchtokens=False):
    """Yield (probe features (B, F) float32, labels (B,)) from a loader of uint8 images, through `transform` (an
    augmentation or the eval view) and the frozen backbone, no gradients, in fp32 as the official probe (autocast
    off even inside a caller's; GPU matmuls may use TF32 where distributed.setup_distributed allowed it)."""
    model.eval()  # BatchNorm statistics and drop path stay frozen too
    fp32 = torch.autocast(torch.device(device).type, enabled=False)
    for images, labels in loader:
        if len(images) == 0:  # every file of the batch was unreadable (data.build_loader drops them)
            continue
        with torch.no_grad(), fp32:
            feats = probe_features(model, transform(images.to(device, non_blocking=True)).float(), n_last_blocks,
                                   avgpool_patchtokens)
        yield feats, labels.to(device)


def tensor_batches(features, labels, batch_size, generator=None):
    """Yield (features, labels) mini-batches of precomputed features; shuffled when a generator is given."""
    order = (torch.randperm(len(labels), generator=generator) if generator is not None
             else torch.arange(len(labels))).to(labels.device)
    for idx in order.split(batch_size):
        yield features[idx], labels[idx]


def train_one_epoch(classifier, optimizer, batches):
    """One pass of cross-entropy training of the classifier over (features, labels) batches; returns mean loss."""
    classifier.train()
    total, count = 0.0, 0
    for feats, labels in batches:
        loss = F.cross_entropy(classifier(feats), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total, count = total + loss.item() * len(labels), count + len(labels)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(classifier, batches):
    """Top-1 / top-5 accuracy in percent over (features, labels) batches; top5 is None with < 5 classes."""
    classifier.eval()
    correct1 = correct5 = total = 0
    for feats, labels in batches:
        logits = classifier(feats)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices     # (B, <=5) best classes first
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        total += len(labels)
    num_classes = classifier.linear.out_features
    return 100.0 * correct1 / total, (100.0 * correct5 / total if num_classes >= 5 else None)


def make_optimizer(classifier, epochs, batch_size, base_lr=0.001):
    """SGD momentum 0.9, no weight decay, lr = base_lr * batch_size / 256 (linear scaling rule), cosine to 0 over
    `epochs` (stepped once per epoch, as the official probe). Returns (optimizer, scheduler)."""
    optimizer = torch.optim.SGD(classifier.parameters(), lr=base_lr * batch_size / 256, momentum=0.9, weight_decay=0)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=0)


def main(argv=None):
    parser = cli.ArgumentParser(description="Linear probe on a frozen backbone (DINO sec. 4.1)")
    parser.add_argument("--arch", default="vit_s16", help="architecture name from minivit.models.ARCHS")
    parser.add_argument("--weights", default="none", help="our checkpoint or an official DINO file; 'none' = random")
    parser.add_argument("--patch_size", type=int, default=None, help="a ViT's patch if it was trained with another "
                        "than its name's (small images)")
    parser.add_argument("--small_stem", action="store_true", help="a ResNet trained with the small-image stem")
    parser.add_argument("--data", default="shapes", help="'shapes', 'digits', an ImageNet-style or CIFAR folder")
    parser.add_argument("--image_size", type=int, default=None, help="crop size (default: the data set's own: 32 "
                        "digits/CIFAR, 64 shapes, 224 image folders); photos are resized to image_size * 256/224 "
                        "and centre-cropped for evaluation, as in DINO")
    parser.add_argument("--n_last_blocks", type=int, default=None, help="concatenate the CLS tokens of the n last "
                        "blocks; default as DINO: 4 for ViT-Ti/S, 1 for ViT-B and larger")
    parser.add_argument("--avgpool_patchtokens", action=argparse.BooleanOptionalAction, default=None,
                        help="append the mean patch token of the last block; default as DINO: on for ViT-B and "
                        "larger, off for ViT-Ti/S")
    parser.add_argument("--epochs", type=int, default=100, help="100 in DINO on ImageNet")
    parser.add_argument("--batch_size", type=int, default=256, help="the lr scales with it (DINO: 8 GPUs x 128)")
    parser.add_argument("--lr", type=float, default=0.001, help="base lr for a batch of 256, scaled linearly; "
                        "the official advice is to tune it per checkpoint; small data sets trained for few epochs "
                        "usually need a larger one")
    parser.add_argument("--no_aug", action="store_true", help="no augmentation: compute the frozen features once "
                        "and train on them, much faster (on a CPU, the only practical way)")
    parser.add_argument("--interpolation", default="bilinear", choices=("bilinear", "bicubic"), help="filter of the "
                        "training crops: bilinear, torchvision's default that the official eval_linear.py keeps; "
                        "bicubic as minivit's probe before issue 24 and DINO's pre-training crops")
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_trust_pickle(parser)
    args = parser.parse_args(argv)
    cli.check_args(parser, args, positive=("patch_size", "image_size", "n_last_blocks", "epochs", "batch_size", "lr"),
                   non_negative=("num_workers",), seed=("seed",))

    with cli.errors():
        args.device = distributed.pick_device(args.device)
        train_set, test_set = build_dataset(args.data, "train"), build_dataset(args.data, "test")
    torch.manual_seed(args.seed)
    model = load_backbone(args.arch, args.weights, args.patch_size, args.small_stem, args.trust_pickle)
    model.to(args.device).requires_grad_(False).eval()
    n_last_blocks, avgpool_patchtokens = dino_probe_recipe(model)
    if args.n_last_blocks is None:
        args.n_last_blocks = n_last_blocks
    if args.avgpool_patchtokens is None:
        args.avgpool_patchtokens = avgpool_patchtokens
    dim = feature_dim(model, args.n_last_blocks, args.avgpool_patchtokens)
    classifier = LinearClassifier(dim, train_set.num_classes).to(args.device)
    optimizer, scheduler = make_optimizer(classifier, args.epochs, args.batch_size, args.lr)
    views = "the evaluation view (--no_aug)" if args.no_aug else f"random-resized crops ({args.interpolation}) + flip"
    print(f"linear probe: {describe(train_set)}; {describe(test_set)}; {args.arch} ({args.weights}); "
          f"{dim}-d features; lr {optimizer.param_groups[0]['lr']:.2e}; training views: {views}")
    if hasattr(model, "get_intermediate_layers"):
        print(f"features: CLS tokens of the last {args.n_last_blocks} blocks"
              + (" + the mean patch token" if args.avgpool_patchtokens else ""))

    generator = torch.Generator().manual_seed(args.seed)  # crops and the order of precomputed features
    eval_view = eval_transform(train_set, args.image_size)
    augment = SupervisedAugment(eval_view.size, interpolation=args.interpolation)  # + flip, as the official
    if not args.no_aug:  # image folders: the random crops come from the whole photo (square sets are unchanged)
        train_set = build_dataset(args.data, "train", min_pixels=augment.min_pixels)
    train_aug = eval_view if args.no_aug else (lambda images: augment(images, generator))
    probe = dict(n_last_blocks=args.n_last_blocks, avgpool_patchtokens=args.avgpool_patchtokens)

    train_loader, test_loader = (build_loader(ds, args.batch_size, shuffle=ds is train_set, drop_last=False,
                                              num_workers=args.num_workers, seed=args.seed)
                                 for ds in (train_set, test_set))

    def cat(batches):  # materialise a whole feature set: (N, F), (N,)
        feats, labels = zip(*batches)
        return torch.cat(feats), torch.cat(labels)

    # the backbone is frozen: test features (and without augmentation the train features) are computed once
    test_feats = cat(image_batches(model, test_loader, args.device, eval_view, **probe))
    if args.no_aug:
        train_feats = cat(image_batches(model, train_loader, args.device, eval_view, **probe))
    best = 0.0
    t0 = time.time()
    for epoch in range(args.epochs):
        if args.no_aug:
            batches = tensor_batches(*train_feats, args.batch_size, generator)
        else:
            train_loader.set_epoch(epoch)
            batches = image_batches(model, train_loader, args.device, train_aug, **probe)
        loss = train_one_epoch(classifier, optimizer, batches)
        scheduler.step()
        top1, top5 = evaluate(classifier, tensor_batches(*test_feats, args.batch_size))
        best = max(best, top1)
        top5_text = f"  top-5 {top5:6.2f}" if top5 is not None else ""
        print(f"epoch {epoch + 1:3d}/{args.epochs}  loss {loss:.4f}  top-1 {top1:6.2f}{top5_text}  "
              f"best {best:6.2f}  ({time.time() - t0:.0f}s)")
    print(f"best top-1: {best:.2f}%")
    return best


if __name__ == "__main__":
    main()
