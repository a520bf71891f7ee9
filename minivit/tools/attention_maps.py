"""Self-attention maps of the CLS token (DINO sec. 4.2.1, Fig. 1 and 3; visualize_attention.py).

In the last block, the CLS query's softmax attention over the patch tokens gives one map per head; DINO-trained
ViTs segment objects in these maps without ever seeing a mask. A map is shown at the patch grid, upsampled by the
patch size (nearest), and thresholded to keep the most-attended patches holding 60% of the attention mass.
For the PNG figures an image is prepared as the official script prepares it: squashed to 480 x 480 (bilinear, the
aspect ratio is not kept), then cut to a multiple of the patch size from the top-left corner. The --html explorer
(and load_image called from Python) keeps the aspect: shorter side resized (bicubic), centre cut (--preprocess).

    python -m minivit.tools.attention_maps --arch vit_s8 --weights dino_deitsmall8_pretrain.pth --image photo.jpg
    python -m minivit.tools.attention_maps ... --image photo.jpg --image_size 224 --html photo.html   # explorer.py
"""
import os

import numpy as np
import torch
from PIL import Image

from minivit import checkpoint, cli, distributed
from minivit.augment import normalize
from minivit.data import open_image, to_rgb
from minivit.models import load_backbone
from minivit.tools.explorer import check_size, write_explorer


@torch.no_grad()
def cls_attention_maps(model, images):
    """Last-block attention of the CLS query over the patches, one map per head.

    model: a ViT with get_last_selfattention(x) -> (B, heads, 1+N, 1+N) and `patch_size`.
    images: (B, 3, H, W) float, normalised, H and W multiples of the patch size (non-square is fine).
    Returns (B, heads, H/p, W/p) float32; each map sums to 1 minus the CLS token's attention to itself.
    """
    B, _, H, W = images.shape
    p = model.patch_size
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}: crop it first")
    attn = model.get_last_selfattention(images)                  # (B, heads, 1+N, 1+N)
    cls_to_patches = attn[:, :, 0, 1:].float()                   # (B, heads, N): row 0 = CLS query, drop CLS key
    return cls_to_patches.reshape(B, attn.shape[1], H // p, W // p)


def mass_threshold_masks(attn, mass=0.6):
    """Per map, keep the fewest largest weights that together hold at least `mass` of its total (DINO Fig. 3).

    attn: (..., h, w) non-negative float, e.g. (B, heads, h, w). Returns a bool mask of the same shape. Minimal:
    dropping the smallest kept weight leaves less than `mass`.
    """
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass={mass} must be in (0, 1], e.g. 0.6 as in the DINO paper")
    flat = attn.flatten(-2).double()                             # (..., h*w)
    flat = flat / flat.sum(-1, keepdim=True)
    values, order = flat.sort(dim=-1, descending=True)
    mass_before = values.cumsum(-1) - values                     # mass of all strictly larger weights
    keep_sorted = mass_before < mass                             # keep until `mass` is reached, the last one too
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    return keep.reshape(attn.shape)


def upsample(maps, patch_size):
    """Nearest upsampling by the patch size, as the official code: (..., h, w) -> (..., h*p, w*p), any dtype."""
    return maps.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def save_attention_figure(image, attn, masks, path, mass=0.6):
    """Write one PNG: the image, then each head's map as a heat-map over it, and below (if masks is not None) each
    head's mass-threshold mask over the image.

    image: (3, H, W) float in [0, 1]. attn: (heads, h, w) float and masks: (heads, h, w) bool, at the patch grid
    (upsampled here by H // h) or already at (H, W). Returns path."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

    heads, h, w = attn.shape
    H, W = image.shape[-2:]
    if H % h or W % w or H // h != W // w:
        raise ValueError(f"attention grid {h}x{w} does not tile the {H}x{W} image")
    p = H // h
    img = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()        # (H, W, 3)
    maps = upsample(attn.detach().float().cpu(), p).numpy()                          # (heads, H, W)
    rows = 1 if masks is None else 2
    fig = Figure(figsize=(2.2 * (heads + 1), 2.2 * rows))
    axes = fig.subplots(rows, heads + 1, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    axes[0, 0].imshow(img)
    axes[0, 0].set_title("image", fontsize=8)
    for j in range(heads):
        axes[0, j + 1].imshow(img)
        axes[0, j + 1].imshow(maps[j], cmap="inferno", alpha=0.6)
        axes[0, j + 1].set_title(f"head {j}", fontsize=8)
    if masks is not None:
        kept = upsample(masks.detach().cpu().bool(), p).numpy()                        # (heads, H, W)
        axes[1, 0].text(0.5, 0.5, f"{100 * mass:.0f}% of the\nattention mass", ha="center", va="center")
        for j in range(heads):
            axes[1, j + 1].imshow(img * (0.25 + 0.75 * kept[j][..., None]))          # dim what is not kept
    fig.tight_layout()
    with checkpoint.atomic_write(path) as tmp:  # train_dino.py writes these mid-run: no half-written PNG on Ctrl-C
        fig.savefig(tmp, dpi=100)
    return path


PREPROCESS = ("official", "keep_aspect")  # how load_image (and segmentation.load_pair) prepare an image


def load_image(path, image_size, patch_size, preprocess="keep_aspect"):
    """Read an image file -> (3, H, W) float in [0, 1] with H and W multiples of the patch size.

    preprocess "official" (visualize_attention.py: Resize((480, 480)), torchvision's default bilinear on the PIL
    image, then img[:, :h, :w] with h, w cut down to multiples of the patch): squashed to image_size x image_size,
    then cut from the top-left; "keep_aspect": shorter side resized to image_size (bicubic), the centre cut to
    multiples of the patch. keep_aspect is this function's default (what it did before issue 24, and what the --html
    explorer shows); the command line's PNG figures default to official. A file Pillow cannot read, one above its
    decompression-bomb limit or with pixels of no 8-bit meaning -> ValueError naming it (data.open_image, to_rgb:
    16-bit greyscale keeps its high byte, where convert("RGB") would clip it to white)."""

    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess={preprocess!r}: use one of {', '.join(PREPROCESS)}")
    with open_image(path) as im:
        im = to_rgb(im, path)
        if preprocess == "official":
            im = im.resize((image_size, image_size), Image.BILINEAR)
        else:
            scale = image_size / min(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255   # (3, H, W)
    H, W = (x.shape[1] // patch_size) * patch_size, (x.shape[2] // patch_size) * patch_size
    if H == 0 or W == 0:
        raise ValueError(f"{path}: smaller than one {patch_size}-pixel patch at --image_size {image_size}")
    top, left = ((x.shape[1] - H) // 2, (x.shape[2] - W) // 2) if preprocess == "keep_aspect" else (0, 0)
    return x[:, top:top + H, left:left + W]


def main(argv=None):
    parser = cli.ArgumentParser(description="Save the CLS self-attention maps of a ViT (DINO Fig. 1 and 3)")
    parser.add_argument("--arch", default="vit_s8", help="a ViT from minivit.models.ARCHS; patch 8 gives the "
                        "sharpest maps (the paper's figures use ViT-S/8)")
    parser.add_argument("--weights", default="none", help="our checkpoint or an official DINO file; 'none' = "
                        "random init (maps are then noise, useful only as a contrast)")
    parser.add_argument("--patch_size", type=int, default=None, help="the patch if the ViT was trained with another "
                        "than its name's (small images)")
    parser.add_argument("--image", nargs="+", required=True, help="one or more image files, any resolution")
    parser.add_argument("--image_size", type=int, default=480, help="side of the square the image is squashed to "
                        "(the shorter side with --preprocess keep_aspect); the position embeddings are interpolated, "
                        "so any size works, cut down to a multiple of the patch")
    parser.add_argument("--preprocess", default=None, choices=PREPROCESS, help="official (the default for the "
                        "PNGs): squash to image_size x image_size (bilinear) and cut from the top-left, as "
                        "visualize_attention.py; keep_aspect (the default of --html, whose page shows the photo "
                        "undistorted): shorter side to image_size (bicubic), centre cut")
    parser.add_argument("--mass", type=float, default=0.6, help="attention mass kept in the masks (DINO: 0.6)")
    parser.add_argument("--output_dir", default="attention_maps")
    parser.add_argument("--html", default=None, help="write this self-contained HTML page instead of PNGs: the "
                        "attention of any hovered patch, per head and averaged, and the CLS maps with their masks "
                        "(one --image; its size grows as the 4th power of --image_size / patch, 224 suits patch 8)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_trust_pickle(parser)
    args = parser.parse_args(argv)
    cli.check_args(parser, args, positive=("image_size", "patch_size"), fraction=("mass",))
    cli.check_output_file(args.html, "--html")

    if args.preprocess is None:
        args.preprocess = "keep_aspect" if args.html else "official"
    if not args.arch.startswith("vit_"):
        cli.fail(f"--arch {args.arch} has no self-attention: pick a ViT (vit_s8, vit_s16, vit_b8, ...)")
    for path in args.image:  # before building anything
        if not os.path.isfile(path):
            cli.fail(f"--image {path}: no such file; check the path")
    with cli.errors():
        device = distributed.pick_device(args.device)
        if not args.html:
            checkpoint.make_output_dir(args.output_dir)
    model = load_backbone(args.arch, args.weights, args.patch_size, trust_pickle=args.trust_pickle)
    model.to(device).requires_grad_(False).eval()
    args.device = device
    if args.html:
        return [write_html(model, args)]
    written = []
    for path in args.image:
        with cli.errors():  # an unreadable file; an --image_size beyond the memory
            image = load_image(path, args.image_size, model.patch_size, args.preprocess)  # (3, H, W) in [0, 1]
            batch = normalize(image[None].to(device))                            # (1, 3, H, W)
            attn = cls_attention_maps(model, batch)[0].cpu()                    # (heads, h, w)
        masks = mass_threshold_masks(attn, args.mass)
        stem = os.path.splitext(os.path.basename(path))[0]
        out = os.path.join(args.output_dir, f"{stem}_{args.arch}_attention.png")
        written.append(save_attention_figure(image, attn, masks, out, args.mass))
        print(out)
    return written


def write_html(model, args):
    """The --html page for args.image[0] (minivit/tools/explorer.py); returns its path."""

    if len(args.image) != 1 or not os.path.isfile(args.image[0]):
        cli.fail(f"--html writes one page: pass one existing --image (got {' '.join(args.image)})")
    with cli.errors():
        image = load_image(args.image[0], args.image_size, model.patch_size, args.preprocess)  # (3, H, W)
        h, w = image.shape[1] // model.patch_size, image.shape[2] // model.patch_size
        check_size(model.num_heads, h * w, model.patch_size, args.image_size)
    batch = normalize(image[None].to(args.device))                                   # (1, 3, H, W)
    attn = model.get_last_selfattention(batch)[0].float().cpu()                       # (heads, 1+N, 1+N)
    masks = mass_threshold_masks(cls_attention_maps(model, batch)[0].cpu(), args.mass)  # (heads, h, w)
    title = f"{os.path.basename(args.image[0])}: {args.arch}, {args.weights}, {image.shape[1]}x{image.shape[2]} px"
    path = write_explorer(args.html, image, attn, masks, model.patch_size, title, args.mass)
    print(f"{path} ({os.path.getsize(path) / 2**20:.1f} MB)")
    return path


if __name__ == "__main__":
    main()
