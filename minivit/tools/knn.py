"""Weighted k-NN evaluation of frozen features (DINO sec. 4.1; Wu et al. 2018, "Unsupervised feature learning via
non-parametric instance discrimination").

No training at all: every test image is classified by the labels of its k nearest training images, each
neighbour voting with weight exp(cos_sim / T), T = 0.07. Features are the final-norm CLS token of the (teacher)
backbone, L2-normalised, so the cosine similarity is a plain dot product.

    python -m minivit.tools.knn --arch vit_s16 --weights dino_deitsmall16_pretrain.pth --data /path/to/imagenet
    python -m minivit.tools.knn --arch vit_ti16 --weights none --data digits --image_size 32      # random-init baseline
    python -m minivit.tools.knn --raw_pixels --data digits --image_size 32                       # raw-pixel baseline
"""
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from minivit import cli, distributed
from minivit.augment import EvalTransform
from minivit.data import ImageFolderDataset, build_dataset, build_loader, describe
from minivit.models import load_backbone


@torch.no_grad()  # not inference_mode: a linear probe may train on these, and autograd refuses inference tensors
def extract_features(model, loader, device, transform, chunk_size=256):
    """Run a frozen `model` over `loader` and return L2-normalised features in dataset order.

    model: any module mapping a float batch (B, 3, H, W) to features (B, D) (a backbone with num_classes=0).
    loader: yields (images uint8 (B, 3, S, S), labels int64 (B,)), unshuffled.
    transform: callable on the uint8 batch, already on `device`, returning the normalised float batch.
    chunk_size: at most this many images go through the model at once (bounds activation memory).
    Returns (features float32 (N, D) on `device`, unit rows; labels int64 (N,) on `device`). Under torch.distributed
    the loader must use an unshuffled DistributedSampler; every process then gets all N features, in dataset order.
    The model runs in fp32, as the official evaluation, with autocast switched off even when the caller is inside
    one (on GPUs matmuls may still use TF32 where distributed.setup_distributed allowed it, ~1e-3 relative).
    """
    was_training = model.training  # train_dino.py evaluates its teacher mid-training: hand it back as it was
    model.eval()
    fp32 = torch.autocast(torch.device(device).type, enabled=False)
    features, labels = [], []
    for images, targets in loader:
        if len(images) == 0:  # every file of the batch was unreadable (data.build_loader drops them)
            continue
        images = transform(images.to(device, non_blocking=True))
        for chunk in images.split(chunk_size):
            with fp32:
                feats = model(chunk.float())
            features.append(F.normalize(feats.float().flatten(1), dim=1))  # (b, D), unit rows
        labels.append(targets.to(device))
    model.train(was_training)
    features, labels = torch.cat(features), torch.cat(labels)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        features, labels = _gather_in_order(features, labels, len(loader.dataset))
    return features, labels


def _gather_in_order(features, labels, num_samples):
    """All-gather per-process features. An unshuffled DistributedSampler gives process r the samples r, r + W,
    r + 2W, ... (padded to equal length), so interleaving the W blocks restores dataset order; padding is cut."""
    world = dist.get_world_size()
    sizes = [None] * world
    dist.all_gather_object(sizes, len(labels))
    if len(set(sizes)) > 1:  # a process skipped unreadable files: the interleaved order would be wrong
        raise ValueError(f"processes extracted {sizes} features: remove the unreadable files from the data set")
    all_feats = features.new_empty(world * features.shape[0], features.shape[1])
    all_labels = labels.new_empty(world * labels.shape[0])
    dist.all_gather_into_tensor(all_feats, features.contiguous())
    dist.all_gather_into_tensor(all_labels, labels.contiguous())
    all_feats = all_feats.view(world, -1, features.shape[1]).transpose(0, 1).reshape(-1, features.shape[1])
    all_labels = all_labels.view(world, -1).t().reshape(-1)
    return all_feats[:num_samples], all_labels[:num_samples]


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k=20, T=0.07, num_classes=None,
                   chunk_size=1024):
    """Weighted k-NN accuracy (DINO sec. 4.1): the k most similar training features vote, each with exp(sim / T).

    train_features (N, D) and test_features (M, D): float, L2-normalised rows, on one device.
    train_labels (N,), test_labels (M,): int64 class ids. num_classes defaults to 1 + the largest label.
    Test features are processed chunk_size at a time, so memory is O(chunk_size * N), not O(M * N).
    Returns (top1, top5) in percent; top5 is None with fewer than 5 classes. As in the official code, top-5 only
    looks at the first min(5, k) predictions: at most k classes get a vote.
    """
    if train_features.shape[0] != train_labels.shape[0] or test_features.shape[0] != test_labels.shape[0]:
        raise ValueError(f"features and labels differ in length: train {tuple(train_features.shape)} vs "
                         f"{tuple(train_labels.shape)}, test {tuple(test_features.shape)} vs "
                         f"{tuple(test_labels.shape)}")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k={k} must be between 1 and the number of training features ({train_features.shape[0]})")
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct1 = correct5 = 0
    for feats, targets in zip(test_features.split(chunk_size), test_labels.split(chunk_size)):
        similarity = feats @ train_features.T                        # (b, N) cosine similarities
        sims, idx = similarity.topk(k, dim=1)                        # (b, k) nearest neighbours, most similar first
        neighbour_labels = train_labels[idx]                         # (b, k)
        votes = torch.zeros(feats.shape[0], num_classes, device=feats.device)
        votes.scatter_add_(1, neighbour_labels, (sims.float() / T).exp())  # (b, C) summed exp(sim / T)
        predictions = votes.topk(min(5, k, num_classes), dim=1).indices    # (b, <=5) best classes first
        hits = predictions == targets[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
    total = test_labels.shape[0]
    top5 = 100.0 * correct5 / total if num_classes >= 5 else None
    return 100.0 * correct1 / total, top5


def eval_transform(dataset, image_size=None):
    """DINO's evaluation view for a minivit.data data set -> an augment.EvalTransform (uint8 batch -> normalised
    float). Photos (an image folder, decoded as 256 px squares) are resized to image_size * 256/224 and centre-cropped
    to image_size: the ImageNet protocol, 256 -> 224. The small square sets (shapes, digits, CIFAR) are only resized
    to image_size, nothing cut off. image_size=None: 224 for photos, the data set's load_size otherwise."""
    photos = isinstance(dataset, ImageFolderDataset)
    size = image_size or (224 if photos else dataset.load_size)
    return EvalTransform(size, resize=round(size * 256 / 224) if photos else None)


def knn_eval(model, train_set, test_set, device, ks=(10, 20, 100, 200), T=0.07, image_size=None, batch_size=128,
             num_workers=0, distributed=None):
    """Extract features of both minivit.data sets with the frozen `model` (evaluation view: eval_transform) and run
    the weighted k-NN for every k; train_dino.py calls this. distributed=None follows torch.distributed.
    Returns {k: (top1, top5)} in percent; a k larger than the training set is skipped."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    transform = eval_transform(train_set, image_size)
    feats = {}
    for name, dataset in (("train", train_set), ("test", test_set)):
        loader = build_loader(dataset, batch_size=batch_size, shuffle=False, drop_last=False,
                              num_workers=num_workers, seed=0, distributed=distributed)
        feats[name] = extract_features(model, loader, device, transform, chunk_size=batch_size)
    (train_f, train_y), (test_f, test_y) = feats["train"], feats["test"]
    return {k: knn_classifier(train_f, train_y, test_f, test_y, k=k, T=T, num_classes=train_set.num_classes)
            for k in ks if k <= train_f.shape[0]}



def format_table(results):
    """{k: (top1, top5)} -> a small text table."""
    lines = ["    k   top-1   top-5"]
    for k, (top1, top5) in results.items():
        lines.append(f"{k:5d}  {top1:6.2f}  " + (f"{top5:6.2f}" if top5 is not None else "   n/a"))
    return "\n".join(lines)


def main(argv=None):
    parser = cli.ArgumentParser(description="Weighted k-NN evaluation of a frozen backbone (DINO sec. 4.1)")
    parser.add_argument("--arch", default="vit_s16", help="architecture name from minivit.models.ARCHS")
    parser.add_argument("--weights", default="none", help="our checkpoint or an official DINO file; 'none' = "
                        "random init, the baseline that training must beat")
    parser.add_argument("--patch_size", type=int, default=None, help="a ViT's patch if it was trained with another "
                        "than its name's (small images)")
    parser.add_argument("--small_stem", action="store_true", help="a ResNet trained with the small-image stem")
    parser.add_argument("--raw_pixels", action="store_true", help="baseline: normalised pixels as features, no model")
    parser.add_argument("--data", default="shapes", help="'shapes', 'digits', an ImageNet-style or CIFAR folder")
    parser.add_argument("--image_size", type=int, default=None, help="evaluation size (default: the data set's "
                        "own: 32 digits/CIFAR, 64 shapes, 224 image folders); photos are resized to image_size * "
                        "256/224 and centre-cropped, as in DINO's evaluation")
    parser.add_argument("--k", type=int, nargs="+", default=[10, 20, 100, 200], help="20 is usually the best")
    parser.add_argument("--temperature", type=float, default=0.07, help="T in the vote weight exp(sim / T)")
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--num_workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_trust_pickle(parser)
    args = parser.parse_args(argv)
    cli.check_args(parser, args, positive=("k", "temperature", "batch_size", "image_size", "patch_size"),
                   non_negative=("num_workers",))

    with cli.errors():
        device = distributed.pick_device(args.device)
        train_set, test_set = build_dataset(args.data, "train"), build_dataset(args.data, "test")
    if max(args.k) > len(train_set):
        cli.fail(f"--k {max(args.k)} is larger than the {len(train_set)} training images; pick k <= {len(train_set)}")
    if args.raw_pixels:
        model, name = nn.Flatten(), "raw pixels"
    else:
        model = load_backbone(args.arch, args.weights, args.patch_size, args.small_stem, args.trust_pickle)
        name = f"{args.arch} ({'random init' if args.weights.lower() == 'none' else args.weights})"
    model.to(device).requires_grad_(False)
    print(f"k-NN: {describe(train_set)}; {describe(test_set)}; {name}; T={args.temperature}")
    t0 = time.time()
    with cli.errors():  # out of memory: one line
        results = knn_eval(model, train_set, test_set, device, ks=args.k, T=args.temperature,
                           image_size=args.image_size, batch_size=args.batch_size, num_workers=args.num_workers)
    if len(results) < len(args.k):  # unreadable files were skipped: fewer training features than images
        print(f"note: k = {', '.join(str(k) for k in args.k if k not in results)} skipped: more than the "
              "training images that decoded")
    if not results:
        cli.fail(f"every --k ({' '.join(map(str, args.k))}) is larger than the training images that decoded; "
                 "pick a smaller --k")
    print(format_table(results))
    print(f"done in {time.time() - t0:.1f}s")
    return results


if __name__ == "__main__":
    main()
