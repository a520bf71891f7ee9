"""Object segmentation from self-attention, measured (DINO sec. 4.2.1, Table 4 and Fig. 3-4).

No decoder and no mask is ever trained: the last block's CLS attention of each head is thresholded so that the kept
patches hold 60% of the attention mass, and the masks are scored against ground-truth objects with the Jaccard
index (intersection over union). DINO's protocol (Mathilde Caron, facebookresearch/dino issue #54): for every
ground-truth object of an image, the head whose mask matches it best; averaged over the objects of the image, then
over the images. The report also gives the best single head over the whole set and the mean over heads.

    python -m minivit.tools.segmentation --arch vit_s8 --weights dino=runs/dino/teacher_backbone.pth \\
        supervised=runs/vit_shapes/checkpoint.pt random=none                 # offline: 200 test shapes, masks known
    python -m minivit.tools.segmentation --arch vit_s16 --weights dino=dino_deitsmall16_pretrain.pth random=none \\
        --data VOCdevkit/VOC2012 --image_set val                              # PASCAL VOC12, as the paper's Table 4

--data is "shapes" (the offline set draws its objects, so it knows their pixels) or a folder in PASCAL VOC layout:
JPEGImages/*.jpg with masks in SegmentationObject/*.png (one id per object; else SegmentationClass/*.png, one id
per class), matched by file name; 0 is background and 255 "void" (object borders), which counts as background.
Writes report.md, results.json and PNGs (heads over the image, their masks, a grid of best-head masks against the
ground truth) to --output_dir.
"""
import json
import os

import numpy as np
import torch
from PIL import Image

from minivit import checkpoint, cli, distributed
from minivit.augment import normalize
from minivit.cli import parse_weights
from minivit.data import SHAPE_SETS, build_dataset, open_image, to_rgb
from minivit.models import build_backbones
from minivit.tools.attention_maps import (PREPROCESS, cls_attention_maps, mass_threshold_masks, save_attention_figure,
                                          upsample)

VOID = 255  # PASCAL VOC's label for object borders and unlabelled pixels


# ---------------------------------------------------------------------------------------------------- the metrics

def jaccard(pred, gt):
    """Jaccard index |pred & gt| / |pred | gt| over the last two dims: bool (..., H, W) twice -> float64 (...).
    Two empty masks agree perfectly (1.0)."""
    if pred.shape != gt.shape:
        raise ValueError(f"masks of different shapes {tuple(pred.shape)} and {tuple(gt.shape)}")
    pred, gt = pred.bool(), gt.bool()
    inter = (pred & gt).flatten(-2).sum(-1).double()
    union = (pred | gt).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def attention_jaccard(attn_masks, gt, patch_size):
    """Jaccard index of every head's mask against the ground truth, at the pixel level.

    attn_masks: bool (B, heads, h, w) at the patch grid (e.g. mass_threshold_masks); gt: bool (B, H, W) with
    H = h * patch_size, W = w * patch_size. Each patch's mask value covers its p x p pixels (nearest upsampling, as
    the official visualize_attention.py). Returns float64 (B, heads)."""
    B, heads, h, w = attn_masks.shape
    if gt.shape != (B, h * patch_size, w * patch_size):
        raise ValueError(f"ground truth {tuple(gt.shape)} does not match {B} masks of {h}x{w} patches of "
                         f"{patch_size} px: expected {(B, h * patch_size, w * patch_size)}")
    return jaccard(upsample(attn_masks.bool(), patch_size), gt.bool()[:, None].expand(B, heads, -1, -1))


def segmentation_scores(object_iou, image_index):
    """Summaries of per-object, per-head Jaccard indices, each averaged over objects in an image, then over images.

    object_iou: (M, heads) float, one row per ground-truth object; image_index: (M,) int, the image of each row.
    Returns dict: dino (best head per object: DINO's Table 4 protocol), per_head (heads,) list, best_head (index of
    the best single head for the whole set), best_head_jaccard, mean_heads; all in [0, 1]."""
    object_iou, image_index = torch.as_tensor(object_iou, dtype=torch.float64), torch.as_tensor(image_index)
    if object_iou.ndim != 2 or len(object_iou) != len(image_index) or len(object_iou) == 0:
        raise ValueError(f"expected (M, heads) scores and M image indices with M > 0, got "
                         f"{tuple(object_iou.shape)} and {tuple(image_index.shape)}")
    columns = torch.cat((object_iou.max(1, keepdim=True).values, object_iou), 1)  # (M, 1 + heads): best, each
    per_image = torch.stack([columns[image_index == i].mean(0) for i in image_index.unique()])  # (images, 1 + heads)
    means = per_image.mean(0)
    per_head = means[1:]
    return {"dino": means[0].item(), "per_head": per_head.tolist(), "best_head": int(per_head.argmax()),
            "best_head_jaccard": per_head.max().item(), "mean_heads": per_head.mean().item()}

# --------------------------------------------------------------------------------------- models named on the CLI


# ------------------------------------------------------------------------------------------------ images + masks

def voc_pairs(root, image_set=None):
    """(image path, mask path) pairs of a PASCAL VOC-style folder: JPEGImages/<name>.jpg and
    SegmentationObject/<name>.png (else SegmentationClass/), matched by name; image_set restricts them to the
    names listed in ImageSets/Segmentation/<image_set>.txt (e.g. 'val')."""
    images = os.path.join(root, "JPEGImages")
    masks = next((os.path.join(root, d) for d in ("SegmentationObject", "SegmentationClass")
                  if os.path.isdir(os.path.join(root, d))), None)
    if not os.path.isdir(images) or masks is None:
        raise ValueError(f"{root} is not in PASCAL VOC layout: expected JPEGImages/ and SegmentationObject/ (or "
                         f"SegmentationClass/) with <name>.png masks")
    by_stem = {os.path.splitext(f)[0]: os.path.join(images, f) for f in sorted(os.listdir(images))}
    names = sorted(os.path.splitext(f)[0] for f in os.listdir(masks) if f.lower().endswith(".png"))
    if image_set:
        with open(os.path.join(root, "ImageSets", "Segmentation", f"{image_set}.txt")) as f:
            names = [n for n in (line.strip() for line in f) if n]
    pairs = [(by_stem[n], os.path.join(masks, n + ".png")) for n in names if n in by_stem]
    if not pairs:
        raise ValueError(f"no image in {images} has a mask of the same name in {masks}")
    return pairs


def load_pair(image_path, mask_path, image_size, patch_size, preprocess="keep_aspect"):
    """An image and its label mask with the same geometry, cut to multiples of the patch size, as
    attention_maps.load_image prepares an image: preprocess "official" squashes both to image_size x image_size
    (the image bilinear, as visualize_attention.py) and cuts from the top-left; "keep_aspect" (this function's
    default, as before issue 24) resizes the shorter side to image_size (bicubic) and cuts the centre. The mask is
    resized with the nearest filter either way, so that its ids stay ids and its objects stay over the image's.
    -> float (3, H, W) in [0, 1], int64 (H, W) ids. Palette or grey masks keep their ids; in an RGB mask every
    distinct colour but black is one object."""

    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess={preprocess!r}: use one of {', '.join(PREPROCESS)}")
    with open_image(image_path) as im, open_image(mask_path) as m:
        if im.size != m.size:
            raise ValueError(f"{mask_path} is {m.size[0]}x{m.size[1]} but {image_path} is {im.size[0]}x{im.size[1]}")
        if preprocess == "official":  # visualize_attention.py's Resize((480, 480)): squashed, bilinear
            size, resample = (image_size, image_size), Image.BILINEAR
        else:
            scale = image_size / min(im.size)
            size, resample = (max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC
        image = np.asarray(to_rgb(im, image_path).resize(size, resample))
        mask = np.asarray(m.resize(size, Image.NEAREST))
    if mask.ndim == 3:  # RGB: one id per colour, black = background (a colour cannot say "void")
        rgb = mask[..., :3].reshape(-1, 3)
        ids = np.unique(rgb, axis=0, return_inverse=True)[1].reshape(-1) + 1
        mask = np.where(rgb.max(1) > 0, ids, 0).reshape(mask.shape[:2])
    H, W = (size[1] // patch_size) * patch_size, (size[0] // patch_size) * patch_size
    top, left = ((size[1] - H) // 2, (size[0] - W) // 2) if preprocess == "keep_aspect" else (0, 0)
    image = torch.from_numpy(image[top:top + H, left:left + W].copy()).permute(2, 0, 1).float() / 255
    return image, torch.from_numpy(mask[top:top + H, left:left + W].astype(np.int64))


def batches(data, num_images, image_size, patch_size, batch_size, image_set=None, preprocess="keep_aspect"):
    """Yield (images float (B, 3, H, W) in [0, 1], labels int64 (B, H, W): 0 background, VOID, else object ids)
    for the first num_images (None: all) test shapes, in batches of batch_size at image_size (one object each), or
    VOC images one at a time (their sizes vary), prepared by load_pair(..., preprocess). The shapes are drawn
    square at image_size, a multiple of the patch: both preprocessings would leave them as they are."""

    if data in SHAPE_SETS:
        if image_size % patch_size:
            raise ValueError(f"--image_size {image_size} is not a multiple of the patch size {patch_size}")
        dataset = build_dataset(data, "test", load_size=image_size)
        n = min(num_images or len(dataset), len(dataset))
        for start in range(0, n, batch_size):
            rendered = [dataset.render(i) for i in range(start, min(start + batch_size, n))]
            yield (torch.stack([r[0] for r in rendered]).float() / 255,
                   torch.stack([r[2] for r in rendered]).long())                 # mask True -> object id 1
        return
    if not os.path.isdir(data):
        raise ValueError(f"--data {data!r}: use {', '.join(SHAPE_SETS)} or a PASCAL VOC-style folder (JPEGImages/ + "
                         f"SegmentationObject/ or SegmentationClass/)")
    for image_path, mask_path in voc_pairs(data, image_set)[:num_images]:
        image, labels = load_pair(image_path, mask_path, image_size, patch_size, preprocess)
        yield image[None], labels[None]

# --------------------------------------------------------------------------------------------- evaluation, report

@torch.no_grad()
def evaluate(models, batches, device, mass=0.6, keep=4):
    """Run every model over the batches of `batches`; score each head's mass-threshold mask against each object.

    models: {label: ViT}; batches: iterable of (images float (B, 3, H, W) in [0, 1], labels int64 (B, H, W)).
    Returns ({label: segmentation_scores dict}, number of images, number of objects, examples): examples holds the
    first `keep` images as dicts with 'image', 'labels' and, per label, (attn (heads, h, w), masks (heads, h, w),
    the head best on this image, its Jaccard or None when the image has no object)."""

    object_iou, image_index, examples, n_images = {label: [] for label in models}, [], [], 0
    for images, labels in batches:
        x = normalize(images.to(device))
        objects = [(b, o) for b in range(len(labels)) for o in labels[b].unique().tolist() if o not in (0, VOID)]
        rows = [b for b, _ in objects]
        gt = torch.stack([labels[b] == o for b, o in objects]) if objects else None  # (M, H, W) one per object
        new = [{"image": images[b], "labels": labels[b]} for b in range(min(len(images), keep - len(examples)))]
        for label, model in models.items():
            attn = cls_attention_maps(model, x).cpu()                                # (B, heads, h, w)
            masks = mass_threshold_masks(attn, mass)
            iou = attention_jaccard(masks[rows], gt, model.patch_size) if objects else torch.zeros(0, attn.shape[1])
            object_iou[label].append(iou)                                            # (M, heads)
            for b, example in enumerate(new):
                of_b = iou[[i for i, row in enumerate(rows) if row == b]]            # this image's objects
                best = int(of_b.mean(0).argmax()) if len(of_b) else 0
                example[label] = (attn[b], masks[b], best, of_b[:, best].mean().item() if len(of_b) else None)
        image_index += [n_images + b for b in rows]
        examples += new
        n_images += len(images)
    if not image_index:
        raise ValueError("no ground-truth object in any mask: check that the masks have non-zero, non-255 ids")
    scores = {label: segmentation_scores(torch.cat(rows), torch.tensor(image_index)) for label, rows in
              object_iou.items()}
    return scores, n_images, len(image_index), examples


def save_grid(examples, labels, patch_sizes, path):
    """PNG: one row per example image: the image, its ground truth, then each model's best head's mask for that
    image (the kept patches shown bright, the rest dimmed) with its Jaccard index. Returns path."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.9 * (2 + len(labels)), 1.9 * len(examples)))
    axes = fig.subplots(len(examples), 2 + len(labels), squeeze=False)
    for row, example in zip(axes, examples):
        img = example["image"].permute(1, 2, 0).numpy()                              # (H, W, 3)
        objects = ((example["labels"] > 0) & (example["labels"] != VOID)).numpy()[..., None]
        row[0].imshow(img)
        row[1].imshow(img * (0.25 + 0.75 * objects))
        for ax, label in zip(row[2:], labels):
            _, masks, best, score = example[label]
            kept = upsample(masks[best], patch_sizes[label]).numpy()[..., None]
            ax.imshow(img * (0.25 + 0.75 * kept))
            ax.set_title(f"{label}: head {best}" + ("" if score is None else f", J={100 * score:.0f}"), fontsize=7)
    axes[0, 0].set_title("image", fontsize=7)
    axes[0, 1].set_title("ground truth", fontsize=7)
    for ax in axes.flat:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_report(out, scores, setup):
    """report.md (a table, Jaccard in %) and results.json (the raw scores in [0, 1]) in folder out. -> paths."""
    S = setup["image_size"]
    geometry = f"squashed to {S}x{S} px" if setup.get("preprocess") == "official" else f"shorter side {S} px"
    lines = [f"# Segmentation from self-attention ({setup['mass']:.0%} of the CLS attention mass)", "",
             f"{setup['data']}: {setup['images']} images, {setup['objects']} objects; {setup['arch']} "
             f"(patch {setup['patch_size']}), {geometry}. Jaccard index in %.", "",
             "| weights | best head per object (DINO Table 4) | best single head | mean over heads |",
             "|---|---|---|---|"]
    for label, s in scores.items():
        lines.append(f"| {label} | {100 * s['dino']:.1f} | {100 * s['best_head_jaccard']:.1f} (head "
                     f"{s['best_head']}) | {100 * s['mean_heads']:.1f} |")
    lines += ["", "Per head: " + "; ".join(f"{label} " + " ".join(f"{100 * j:.0f}" for j in s["per_head"])
                                            for label, s in scores.items()), ""]
    md, js = os.path.join(out, "report.md"), os.path.join(out, "results.json")
    with open(md, "w") as f:
        f.write("\n".join(lines))
    with open(js, "w") as f:
        json.dump({"setup": setup, "scores": scores}, f, indent=2)
    return md, js


def main(argv=None):
    parser = cli.ArgumentParser(description="Jaccard index of thresholded CLS attention against ground-truth "
                                     "objects (DINO Table 4)")
    parser.add_argument("--arch", default="vit_s8", help="a ViT of minivit.models.ARCHS (all --weights share it); "
                        "patch 8 gives finer masks than 16")
    parser.add_argument("--weights", nargs="+", default=["random=none"], help="label=PATH (our train_dino.py or "
                        "train_vit.py files, or official ones) or label=none for random init; several give a "
                        "side-by-side table, e.g. dino=runs/dino/teacher_backbone.pth supervised=... random=none")
    parser.add_argument("--patch_size", type=int, default=None, help="override the arch's patch (as the model "
                        "was trained with, e.g. 4 for train_vit.py's offline ViT)")
    parser.add_argument("--data", default="shapes", help=f"{', '.join(SHAPE_SETS)} (offline, 1000 test images "
                        "with known masks) or a PASCAL VOC-style folder")
    parser.add_argument("--image_set", default=None, help="VOC: use the names in ImageSets/Segmentation/<name>.txt "
                        "(e.g. val); default: every image with a mask")
    parser.add_argument("--image_size", type=int, default=None, help="side in px of the square photos are "
                        "squashed to (the shorter side with --preprocess keep_aspect); default 64 for shapes, 480 for "
                        "photos (as the official visualize_attention.py). Lower it to go faster")
    parser.add_argument("--preprocess", default="official", choices=PREPROCESS, help="photos and their masks: "
                        "official squashes them to image_size x image_size and cuts from the top-left, as "
                        "visualize_attention.py; keep_aspect resizes the shorter side and cuts the centre (before "
                        "issue 24). The square shapes are the same either way")
    parser.add_argument("--num_images", type=int, default=None, help="default 200 shapes, all VOC images")
    parser.add_argument("--mass", type=float, default=0.6, help="attention mass kept by each mask (DINO: 0.6)")
    parser.add_argument("--batch_size", type=int, default=50)
    parser.add_argument("--num_figures", type=int, default=4, help="images drawn in the PNGs")
    parser.add_argument("--output_dir", default="runs/segmentation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_trust_pickle(parser)
    args = parser.parse_args(argv)
    cli.check_args(parser, args, positive=("patch_size", "image_size", "num_images", "batch_size"),
                   non_negative=("num_figures",), fraction=("mass",))

    shapes = args.data in SHAPE_SETS
    if not shapes and not os.path.isdir(args.data):
        cli.fail(f"--data {args.data}: no such folder; give {', '.join(SHAPE_SETS)} or a PASCAL VOC-style folder")
    with cli.errors():
        device = distributed.pick_device(args.device)
        checkpoint.make_output_dir(args.output_dir, files=("report.md", "results.json", "segmentation.png"))
    image_size = args.image_size or (64 if shapes else 480)
    models = build_backbones(args.arch, parse_weights(args.weights), device, args.trust_pickle, img_size=image_size,
                             patch_size=args.patch_size)
    if not all(hasattr(m, "get_last_selfattention") for m in models.values()):
        cli.fail(f"--arch {args.arch} has no self-attention: pick a ViT (vit_s8, vit_s16, ...)")
    patch_size = next(iter(models.values())).patch_size
    num_images = args.num_images or (200 if shapes else None)  # None: all
    try:
        scores, n_images, n_objects, examples = evaluate(
            models, batches(args.data, num_images, image_size, patch_size, args.batch_size, args.image_set,
                            args.preprocess),
            device, args.mass, keep=args.num_figures)
    except (ValueError, OSError) as e:
        cli.fail(str(e))
    setup = {"data": f"{args.data} test" if shapes else args.data, "images": n_images, "objects": n_objects,
             "arch": args.arch, "patch_size": patch_size, "image_size": image_size, "mass": args.mass,
             "preprocess": "square shapes" if shapes else args.preprocess,
             "weights": {label: path for label, path in parse_weights(args.weights)}}
    written = list(write_report(args.output_dir, scores, setup))
    print(open(written[0]).read())
    if examples:
        written.append(save_grid(examples, list(models), {k: m.patch_size for k, m in models.items()},
                                 os.path.join(args.output_dir, "segmentation.png")))
        for label in models:  # every head over the image and its mask (DINO Fig. 3), for the first two images
            for i, example in enumerate(examples[:2]):
                attn, masks, _, _ = example[label]
                written.append(save_attention_figure(example["image"], attn, masks, os.path.join(
                    args.output_dir, f"attention_{label}_{i}.png"), args.mass))
    print("\n".join(written))
    return scores


if __name__ == "__main__":
    main()
