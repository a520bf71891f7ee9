"""Datasets and the data loader shared by the three training scripts.

Every dataset yields `(image, label)`: a uint8 tensor (3, S, S) of a fixed size S (`load_size`) and an int, and has
`.classes`, `.num_classes`, `.targets` and `len()`. Decoding stays on the CPU; the random crops, flips and colour
changes are made afterwards on whole batches on the GPU (minivit/augment.py). For training on an image folder
(`min_pixels` set) each item is the whole decoded photo instead, uint8 (3, h, w) at its own size and aspect
(load_photo), and the loader pads a batch of them into a `Photos` canvas with each photo's true size, so that the
crop boxes are drawn over the whole photo as the official RandomResizedCrop draws them. For evaluation a photo is
resized once to an S x S square (load_image: Resize(S) + the centre square).

Sources, chosen by `build_dataset(data, split, load_size, min_pixels, cache)`:
  None / "shapes"  procedural shapes on clutter with ground-truth object masks, 64 px
  "shapes_plain"   the same shapes, larger, on a flat colour, 64 px
  "shapes_mono"    the same shapes, smaller, light grey on dark grey, anywhere (the offline DINO default), 64 px
  "digits"         scikit-learn's bundled 8x8 handwritten digits (1797 real images), upscaled to 32 px
  a folder         ImageNet-style root/<class>/<image>.jpg, or root/train/... and root/val/...; 256 px
  a CIFAR folder   the "python version" of CIFAR-10/100 (data_batch_1..5 + test_batch, or train + test), 32 px
"""
import os
import pickle
import warnings
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from minivit.distributed import print0

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# ----------------------------------------------------------------------------------------------------------------
# Procedural shapes: a small offline set where raw pixels are useless but shapes are learnable

def _polygon(points, angle, radius, cx, cy, S):
    """Unit-radius outline (K, 2) rotated by `angle`, scaled and moved to (cx, cy) in [0, 1]; pixel coordinates."""
    c, s = np.cos(angle), np.sin(angle)
    xy = points @ np.array([[c, s], [-s, c]]) * radius + (cx, cy)
    return [tuple(p) for p in (xy * S)]


def _circle(r=1.0, dx=0.0, n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([r * np.cos(t) + dx, r * np.sin(t)], 1)


def _star(points=5, inner=0.4):
    t = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False) - np.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _heart(n=48):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    return np.stack([x, y + 2.5], 1) / 16


# Each class is a list of (unit-radius outline, fill): 255 adds to the mask, 0 cuts a hole (ring, crescent).
SHAPES = {
    "circle": [(_circle(), 255)],
    "square": [(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * 0.8, 255)],
    "triangle": [(_circle(n=3), 255)],
    "star": [(_star(), 255)],
    "cross": [(np.array([[-.3, -1], [.3, -1], [.3, -.3], [1, -.3], [1, .3], [.3, .3], [.3, 1], [-.3, 1],
                         [-.3, .3], [-1, .3], [-1, -.3], [-.3, -.3]]), 255)],
    "ring": [(_circle(), 255), (_circle(0.55), 0)],
    "bar": [(np.array([[-1, -.25], [1, -.25], [1, .25], [-1, .25]]), 255)],
    "crescent": [(_circle(), 255), (_circle(0.85, dx=0.5), 0)],
    "arrow": [(np.array([[-1, -.2], [.2, -.2], [.2, -.6], [1, 0], [.2, .6], [.2, .2], [-1, .2]]), 255)],
    "heart": [(_heart(), 255)],
}


class ShapesDataset(Dataset):
    """Ten filled shapes (SHAPES) at a random position, size and rotation. Three looks:
    "clutter" (the default): a shape of a random colour over clutter, a smooth colour field, a coarse texture, random
    lines, blobs and small polygon fragments, objects of radius 0.16-0.3 of the side;
    "plain": a shape of a random colour over one flat random colour, objects of radius 0.3-0.45, so that what two
    crops of an image share is the object, not its background (with clutter DINO's two views matched on the
    background, docs/dino_offline_trials.md);
    "mono" (the offline DINO default): a light grey shape (level 170-255) on a dark grey (0-80), objects of radius
    0.15-0.3 anywhere in the image, under strong colour noise (std 64 per channel): two crops share the outline
    alone, the objects move and scale enough that raw pixels sort them badly (k-NN ~30% at 24 px against 38% on the
    plain look, where the large objects overlap), and the noisy background is a distraction for the attention where
    a flat one would cost nothing to attend to (docs/dino_offline_trials.md). The other two looks add noise of
    std 8.

    Image i of a split is drawn from a numpy Generator seeded with (seed, split, i), so it is the same in every
    process: drawing one 64 px image takes ~1 ms of CPU, so each loader worker makes ~1000 images a second. With
    cache=True each image is drawn the first time it is asked for and kept in memory (5000 images: 61 MB at 64 px),
    so that from the second epoch on a GPU is not kept waiting by the drawing. Labels cycle through the classes
    (i % 10), so every split is exactly balanced. 5000 train / 1000 test images: small enough for CPU runs, with a
    test accuracy resolved to 0.1%.
    With clutter, raw pixels are no use: 1-nearest-neighbour on pixels scores 15.4% and a linear classifier 8.4%
    (chance 10%), while a 4-layer CNN (Adam, flips, constant lr) scores 56-71% over its epochs 10-15.
    `mask(i)` gives the object's ground-truth pixels (S, S) bool, for attention-map segmentation (Jaccard).
    """
    SIZES = {"train": 5000, "test": 1000}

    LOOKS = {"clutter": "shapes", "plain": "shapes_plain", "mono": "shapes_mono"}  # look -> build_dataset's name
    NOISE = {"clutter": 28, "plain": 28, "mono": 220}  # width of the uniform pixel noise, per channel: std 8 / 64

    def __init__(self, split="train", load_size=64, seed=0, num_images=None, look="clutter", cache=False):
        if split not in SPLITS:
            raise ValueError(f"split={split!r}: use 'train' or 'test'")
        if look not in self.LOOKS:
            raise ValueError(f"look={look!r}: use one of {', '.join(self.LOOKS)}")
        self.split, self.load_size, self.seed, self.look, self.source = split, load_size, seed, look, self.LOOKS[look]
        self.classes = list(SHAPES)
        self.num_classes = len(self.classes)
        self.num_images = num_images or self.SIZES[split]
        self.targets = [i % self.num_classes for i in range(self.num_images)]
        self.cache = None
        if cache:  # filled as images are first asked for; in shared memory, so loader workers fill it for all
            N = self.num_images
            self.cache = dict(images=torch.zeros(N, 3, load_size, load_size, dtype=torch.uint8).share_memory_(),
                              masks=torch.zeros(N, load_size, load_size, dtype=torch.bool).share_memory_(),
                              drawn=torch.zeros(N, dtype=torch.bool).share_memory_())

    def __len__(self):
        return self.num_images

    @staticmethod
    def _clutter(rng, S):
        """The cluttered background: a smooth colour field plus a coarse texture, both upsampled from tiny random
        images, then random lines, blobs and polygon fragments smaller than any object. -> PIL RGB (S, S)."""
        field = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize((S, S), Image.BILINEAR)
        texture = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).resize((S, S), Image.BICUBIC)
        image = Image.blend(field, texture, 0.35)
        draw, width = ImageDraw.Draw(image), max(1, S // 64)
        colours = iter([tuple(c) for c in rng.integers(0, 256, (17, 3)).tolist()])  # 9 + 5 + 3 at most
        for x0, y0, x1, y1 in rng.uniform(-0.1, 1.1, (rng.integers(4, 10), 4)) * S:  # lines
            draw.line([(x0, y0), (x1, y1)], next(colours), width * int(rng.integers(1, 4)))
        for cx, cy, rx, ry in rng.uniform((0, 0, 0.03, 0.03), (1, 1, 0.12, 0.12), (rng.integers(2, 6), 4)):
            draw.ellipse([(cx - rx) * S, (cy - ry) * S, (cx + rx) * S, (cy + ry) * S], next(colours))  # blobs
        for _ in range(rng.integers(1, 4)):  # polygon fragments, smaller than any object
            points = rng.uniform(-1, 1, (int(rng.integers(3, 6)), 2))
            draw.polygon(_polygon(points, 0.0, rng.uniform(0.04, 0.1), *rng.uniform(0, 1, 2), S), next(colours))
        return image

    def render(self, i):
        """-> image uint8 (3, S, S), label int, mask bool (S, S): the pixels covered by the object."""
        S, label = self.load_size, self.targets[i]
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), i])
        if self.look == "clutter":
            image = self._clutter(rng, S)
            radius = rng.uniform(0.16, 0.3)  # the object's radius, a fraction of the side
        elif self.look == "plain":
            image = Image.new("RGB", (S, S), tuple(rng.integers(0, 256, 3).tolist()))
            radius = rng.uniform(0.3, 0.45)
        else:
            image = Image.new("RGB", (S, S), (int(rng.integers(0, 81)),) * 3)
            radius = rng.uniform(0.15, 0.3)
        # the object: fully inside the image, at any angle
        cx, cy = rng.uniform(radius, 1 - radius, 2)
        angle = rng.uniform(0, 2 * np.pi)
        mask_image = Image.new("L", (S, S), 0)
        mask_draw = ImageDraw.Draw(mask_image)
        for points, fill in SHAPES[self.classes[label]]:
            mask_draw.polygon(_polygon(points, angle, radius, cx, cy, S), fill)
        mask = np.asarray(mask_image) > 127
        pixels = np.asarray(image).astype(np.float32)
        if self.look == "mono":
            pixels[mask] = rng.uniform(170, 255)
        else:  # the object's colour: the most distant of 8 random colours from the background it covers, so it
            # stays visible; no colour belongs to a class.
            candidates = rng.uniform(0, 255, (8, 3))
            under = pixels[mask].mean(0) if mask.any() else pixels.mean((0, 1))
            pixels[mask] = candidates[np.argmax(((candidates - under) ** 2).sum(1))]
        pixels += (rng.random(pixels.shape, dtype=np.float32) - 0.5) * self.NOISE[self.look]  # uniform pixel noise
        image = torch.from_numpy(pixels.round().clip(0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous()
        return image, label, torch.from_numpy(mask)

    def _cached(self, i):
        """render(i) the first time, from memory afterwards: -> image (3, S, S) uint8, mask (S, S) bool."""
        c = self.cache
        if not c["drawn"][i]:
            c["images"][i], _, c["masks"][i] = self.render(i)
            c["drawn"][i] = True
        return c["images"][i], c["masks"][i]

    def __getitem__(self, i):
        image = self._cached(i)[0] if self.cache else self.render(i)[0]
        return image, self.targets[i]

    def mask(self, i):
        """Ground-truth foreground of image i: bool tensor (S, S), True on the object."""
        return self._cached(i)[1] if self.cache else self.render(i)[2]


SHAPE_SETS = {name: look for look, name in ShapesDataset.LOOKS.items()}  # build_dataset's name -> look


# ----------------------------------------------------------------------------------------------------------------
# Real images: sklearn digits, CIFAR, image folders

class TensorImageDataset(Dataset):
    """Images held in memory as one uint8 tensor (N, 3, h, w), resized per item to load_size when it differs."""

    def __init__(self, images, targets, classes, load_size, source, split):
        self.images, self.targets, self.classes = images, targets, classes
        self.num_classes, self.load_size, self.source, self.split = len(classes), load_size, source, split

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        image = self.images[i]
        if image.shape[-2:] != (self.load_size, self.load_size):  # bicubic, antialiased when shrinking
            image = F.interpolate(image[None].float(), size=self.load_size, mode="bicubic", antialias=True)[0]
            image = image.round().clamp(0, 255).to(torch.uint8)
        return image, self.targets[i]


def digits_dataset(split, load_size=32):
    """scikit-learn's 1797 bundled 8x8 handwritten digits (values 0..16): a fixed stratified split of 1437 train /
    360 test images (random_state=0), upscaled bilinearly to load_size, grey copied to 3 channels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    train, test = train_test_split(np.arange(len(digits.target)), test_size=360, stratify=digits.target,
                                   random_state=0)
    index = train if split == "train" else test
    images = torch.from_numpy(digits.images[index]).float()[:, None] / 16  # (N, 1, 8, 8) in [0, 1]
    images = F.interpolate(images, size=(load_size, load_size), mode="bilinear", align_corners=False)
    images = (images * 255).round().clamp(0, 255).to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    return TensorImageDataset(images, digits.target[index].tolist(), [str(c) for c in range(10)], load_size,
                              "digits", split)


def _find_cifar(root):
    """The CIFAR "python version" folder at or just under root, or None."""
    for folder in (root, os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar-100-python")):
        files = {entry.name for entry in os.scandir(folder) if entry.is_file()} if os.path.isdir(folder) else set()
        if {"data_batch_1", "test_batch", "batches.meta"} <= files or {"train", "test", "meta"} <= files:
            return folder
    return None


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what the official CIFAR files hold (dicts, lists, bytes, numpy arrays) and refuses any other
    global, so that a doctored batch file cannot run code."""
    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
               ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused {module}.{name}: CIFAR files hold only arrays, lists and bytes")
        if name == "_reconstruct":  # numpy 1 and 2 name the module differently
            return np.ndarray.__reduce__(np.zeros(1))[0]
        return super().find_class(module, name)


def _unpickle(path):
    """One official CIFAR "python version" file -> dict with str keys; ValueError if it is not one."""
    try:
        with open(path, "rb") as f:  # the official files are Python 2 pickles with bytes keys
            entries = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise ValueError(f"{path} is not an official CIFAR python file ({e}); download cifar-10-python.tar.gz "
                         "again") from None
    if not isinstance(entries, dict):
        raise ValueError(f"{path} holds a {type(entries).__name__}, not the dict of a CIFAR python file")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in entries.items()}


def cifar_dataset(folder, split, load_size=32):
    """CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, test, meta; fine labels)."""
    cifar10 = os.path.isfile(os.path.join(folder, "data_batch_1"))
    if cifar10:
        files = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
        files = [f for f in files if os.path.isfile(os.path.join(folder, f))]
        meta, names_key, labels_key = "batches.meta", "label_names", "labels"
    else:
        files, meta, names_key, labels_key = [split], "meta", "fine_label_names", "fine_labels"
    batches = [_unpickle(os.path.join(folder, f)) for f in files]
    images = torch.from_numpy(np.concatenate([b["data"] for b in batches])).reshape(-1, 3, 32, 32)
    targets = [int(t) for b in batches for t in b[labels_key]]
    names = _unpickle(os.path.join(folder, meta))[names_key]
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    return TensorImageDataset(images, targets, classes, load_size, "cifar10" if cifar10 else "cifar100", split)


def open_image(path):
    """Image.open(path) (lazy: the header only), with the ways a file fails before decoding as one-line ValueErrors
    naming it: missing (or a dangling symlink), unreadable, not an image, and larger than Pillow's decompression-bomb
    limit (PIL.Image.MAX_IMAGE_PIXELS, ~89 Mpx). Pillow only warns between 1x and 2x that limit and decodes
    anyway; here the limit itself refuses, since a 90 Mpx photo is ~270 MB decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError(f"{path} has more pixels than Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
                             "(PIL.Image.MAX_IMAGE_PIXELS, its guard against decompression bombs); shrink the "
                             "image, or raise PIL.Image.MAX_IMAGE_PIXELS in Python if you trust the file") from None
        except FileNotFoundError:
            raise ValueError(f"{path}: no such file (or a symlink to nothing); check the path") from None
        except PermissionError:
            raise ValueError(f"{path}: permission denied; make it readable (chmod a+r) or remove it") from None
        except (Image.UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{path} is not an image Pillow can read ({type(e).__name__}); pass JPEG or PNG "
                             "files") from None


def to_rgb(image, path=""):
    """Any Pillow image -> a decoded RGB one: greyscale, CMYK, RGBA (alpha dropped), palette, and high bit depths
    scaled to 8 bits (16-bit greyscale PNG/TIFF: the high byte; convert("RGB") would clip them to white). Pixels
    that have no 8-bit meaning (32-bit float, integers beyond 16 bits) and truncated files are refused in one line
    naming `path` (ValueError)."""
    try:
        if image.mode.startswith("I"):  # 16-bit greyscale ("I;16", or "I" holding 0..65535): keep the high byte
            pixels = np.asarray(image)
            if pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
                raise ValueError(f"{path}: {image.mode} pixels beyond 16 bits ({pixels.min()}..{pixels.max()}); "
                                 "convert the image to 8 or 16 bits per channel")
            image = Image.fromarray((pixels.astype(np.uint32) >> 8).astype(np.uint8))
        elif image.mode == "F":
            raise ValueError(f"{path}: 32-bit float pixels (mode F, e.g. a scientific TIFF) have no fixed 8-bit "
                             "scale; convert the image to 8 or 16 bits per channel")
        elif image.mode == "P":  # palette, maybe with a transparent colour: through RGBA, as Pillow advises
            image = image.convert("RGBA")
        return image.convert("RGB")
    except (OSError, SyntaxError) as e:  # a truncated or corrupt file fails here, when its pixels are decoded
        raise ValueError(f"{path} could not be decoded ({type(e).__name__}: {e}); the file is truncated or "
                         "corrupt: replace it") from None


def _to_tensor(image, channels_last=False):
    """RGB Pillow image (w x h) -> uint8 tensor (3, h, w); channels_last: a view of the decoded (h, w, 3) pixels
    (no transposing copy), as the whole photos for the crops are kept."""
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    return pixels if channels_last else pixels.contiguous()


def load_image(path, load_size):
    """Decode any Pillow-readable file to RGB, resize the shorter side to load_size (bicubic) and take the centre
    load_size x load_size square: -> uint8 tensor (3, load_size, load_size). Smaller images are upscaled.
    The evaluation view: with load_size 256, EvalTransform(224, resize=256) then gives Resize(256) +
    CenterCrop(224) of the whole photo, the ImageNet protocol."""
    with open_image(path) as image:
        image.draft("RGB", (load_size, load_size))  # JPEG: decode at 1/2, 1/4 or 1/8 scale if still >= load_size
        image = to_rgb(image, path)
        w, h = image.size
        side = min(w, h)  # resize + centre crop in one step: resample the central square only
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        return _to_tensor(image.resize((load_size, load_size), Image.BICUBIC, box=box))


def shrink_factor(width, height, min_pixels, factors=(8, 4, 2)):
    """The largest of `factors` by which a width x height photo can be shrunk and still keep >= min_pixels pixels
    ((width // k) * (height // k), so that rounding never takes it below), or 1 when none can."""
    return next((k for k in factors if (width // k) * (height // k) >= min_pixels), 1)


def load_photo(path, min_pixels):
    """Decode the whole photo, at its own size and aspect, to an RGB uint8 tensor (3, h, w) for random crops.

    A photo with more than min_pixels pixels is decoded smaller, but never below min_pixels: JPEGs through the
    DCT (Pillow's draft: 1/2, 1/4 or 1/8 scale, several times faster than a full decode), anything else (PNG, or a
    JPEG needing more than 1/8) by averaging k x k blocks (Image.reduce). min_pixels is what the augmentation's
    smallest crop needs for each of its output pixels to come from at least one source pixel
    (MultiCropAugment.min_pixels: 96^2 / 0.05 = 184,320 for DINO's, about a 500 x 375 photo), so no crop is
    enlarged that the full photo would not enlarge.
    The cap, and why: a decoded photo keeps fewer than 4 x min_pixels pixels (each factor 2 would halve both
    sides), e.g. a 4000 x 3000 photo becomes 500 x 375. More would change no crop by more than resampling twice
    does, and it bounds the padded canvas of a batch (data.Photos) to ~0.74 Mpx per photo for DINO's crops."""
    with open_image(path) as image:
        k = shrink_factor(*image.size, min_pixels)
        if k > 1:  # a no-op for anything but JPEG
            image.draft("RGB", (image.size[0] // k, image.size[1] // k))
        image = to_rgb(image, path)
        k = shrink_factor(*image.size, min_pixels, factors=range(int((image.size[0] * image.size[1] / min_pixels)
                                                                       ** 0.5), 1, -1))
        return _to_tensor(image.reduce(k) if k > 1 else image, channels_last=True)


@dataclass
class Photos:
    """A batch of whole photos of different sizes, as build_loader yields it for a whole-photo data set: photo i is
    pixels[i, :, :h_i, :w_i] (zeros around it) with (h_i, w_i) = sizes[i]. minivit/augment.py draws each photo's
    crop boxes in its own coordinates and cuts them out of the canvas on the device (a GPU: the whole batch at
    once)."""
    pixels: torch.Tensor  # uint8 (B, 3, H, W), H = max h_i, W = max w_i
    sizes: torch.Tensor  # int64 (B, 2): (h_i, w_i); stays on the CPU, where the random boxes are drawn

    @classmethod
    def stack(cls, images):
        """uint8 tensors (3, h_i, w_i) -> Photos, padded at the bottom and right to the largest h and w. The
        canvas is channels-last in memory (B, H, W, 3), as the photos decode and as the CPU's crops read it."""
        sizes = torch.tensor([image.shape[1:] for image in images], dtype=torch.int64).view(-1, 2)
        H, W = (sizes.max(0).values.tolist() if len(images) else (1, 1))
        pixels = torch.empty(len(images), H, W, 3, dtype=torch.uint8).permute(0, 3, 1, 2)
        for canvas, image in zip(pixels, images):  # in the loader's workers, not on the training step's path
            h, w = image.shape[1:]
            canvas[:, :h, :w] = image
            canvas[:, h:], canvas[:, :h, w:] = 0, 0  # the padding (no crop reads it)
        return cls(pixels, sizes)

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, index):
        """A slice of the batch, still Photos (an int i gives the batch of photo i alone)."""
        index = slice(index, index + 1) if isinstance(index, int) else index
        return Photos(self.pixels[index], self.sizes[index])

    def to(self, device, non_blocking=False):
        return Photos(self.pixels.to(device, non_blocking=non_blocking), self.sizes)

    def pin_memory(self):  # DataLoader(pin_memory=True) calls this
        return Photos(self.pixels.pin_memory(), self.sizes)


def _list_images(folder, classes=None):
    """(path, class index) for every image under folder/<class>/ (recursively), in sorted order."""
    find_classes = classes is None
    if find_classes:
        classes = sorted(d.name for d in os.scandir(folder) if d.is_dir() and not d.name.startswith("."))
    samples = []
    for label, name in enumerate(classes):
        found = [(os.path.join(parent, f), label) for parent, _, files in sorted(os.walk(os.path.join(folder, name)))
                 for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
        if find_classes and not found:  # as torchvision's ImageFolder: an empty class would shift every label after it
            raise ValueError(f"class folder {os.path.join(folder, name)} has no {'/'.join(IMAGE_EXTENSIONS)} images; "
                             "add images or remove the folder")
        samples += found
    return classes, samples


class ImageFolderDataset(Dataset):
    """ImageNet-style images: root/<class>/<image>, or root/train/<class>/... with root/val/<class>/... for the test
    split; classes are the sorted folder names of the train folder. Images are decoded by load_image (the load_size
    square of the evaluation view) or, with min_pixels, by load_photo (the whole photo, for random crops).
    An unreadable or truncated file yields None (build_loader's collate drops it), warns once naming the file and
    is counted in `num_skipped` (shared with the DataLoader workers), so a bad file never stops an epoch."""

    def __init__(self, root, split="train", load_size=256, min_pixels=None):
        expected = f"expected {root}/<class>/<image>.jpg, or {root}/train/<class>/... and {root}/val/<class>/..."
        train = os.path.join(root, "train")
        val = next((os.path.join(root, d) for d in ("val", "test") if os.path.isdir(os.path.join(root, d))), None)
        if not os.path.isdir(train):
            if val is not None:
                raise ValueError(f"{root} has a {os.path.basename(val)}/ folder but no train/ folder; {expected}")
            train = root
        if split == "test" and val is None:
            raise ValueError(f"{root} has no val/ folder for the test split; {expected}")
        self.classes, train_samples = _list_images(train)
        if not self.classes:
            raise ValueError(f"{train} has no class folders; {expected}")
        self.samples = train_samples if split == "train" else _list_images(val, self.classes)[1]
        if not self.samples:
            folder = train if split == "train" else val
            raise ValueError(f"{folder} has no {'/'.join(IMAGE_EXTENSIONS)} images in its class folders; {expected}")
        self.targets = [label for _, label in self.samples]
        self.num_classes, self.load_size, self.source, self.split = len(self.classes), load_size, root, split
        self.min_pixels = min_pixels  # None: load_size squares; else whole photos (data.Photos batches)
        self.bad = torch.zeros(len(self.samples), dtype=torch.bool).share_memory_()  # seen by all workers
        self._check_some_decode(train if split == "train" else val)

    def _decode(self, path):
        """One file as this data set yields it: the load_size square (load_image) or the whole photo (load_photo)."""
        return load_image(path, self.load_size) if self.min_pixels is None else load_photo(path, self.min_pixels)

    def _check_some_decode(self, folder):
        """The one rule for every loader of a folder: at least one of its images must decode, else a one-line
        ValueError naming the folder and how many files failed (zero-byte files, junk named .jpg, dangling
        symlinks), instead of an empty batch deep inside training or evaluation. Stops at the first image that
        decodes (one decode for a healthy folder); the files that fail later are skipped by __getitem__ and
        counted in num_skipped, as describe() says."""
        first = None
        for path, _ in self.samples:
            try:
                self._decode(path)
                return
            except Exception as error:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error, ...
                # open_image / to_rgb name the file and the reason; other decoder errors get both here
                first = first or (str(error).split(";")[0] if isinstance(error, ValueError) else
                                  f"{path}: {type(error).__name__}")
        raise ValueError(f"{folder}: none of its {len(self.samples)} image files could be decoded (the first: "
                         f"{first}); replace the unreadable files, or point --data at a folder of images")

    def __len__(self):
        return len(self.samples)

    @property
    def num_skipped(self):
        """How many files failed to decode so far."""
        return int(self.bad.sum())

    def skipped_files(self):
        return [self.samples[i][0] for i in self.bad.nonzero().flatten().tolist()]

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            return self._decode(path), label
        except Exception as error:  # Pillow's decoders raise OSError, ValueError, SyntaxError, struct.error, ...
            if not self.bad[i]:
                self.bad[i] = True
                warnings.warn(f"skipping unreadable image {path}: {type(error).__name__}: {error}", stacklevel=2)
            return None


# ----------------------------------------------------------------------------------------------------------------
# Entry points for the scripts

def build_dataset(data, split, load_size=None, min_pixels=None, cache=False, num_images=None):
    """data: None or a SHAPE_SETS name, "digits", an ImageNet-style folder or a CIFAR python folder; split:
    "train" or "test"; load_size: the side S of the returned square images (default: 64 shapes, 32 digits and
    CIFAR, 256 folders); cache: draw the shapes once and keep them in memory; num_images: the first N shapes (both
    ignored by the other sources).
    -> a Dataset of (uint8 (3, S, S), int) with .classes, .num_classes, .targets, .load_size.
    min_pixels (image folders only; the training crops' augment.min_pixels): yield each whole photo instead,
    uint8 (3, h, w) decoded by load_photo, which build_loader batches as data.Photos."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use 'train' or 'test'")
    if data is None or data in SHAPE_SETS:
        return ShapesDataset(split, load_size or 64, num_images=num_images, look=SHAPE_SETS[data or "shapes"],
                             cache=cache)
    if data == "digits":
        return digits_dataset(split, load_size or 32)
    if not os.path.isdir(data):
        raise ValueError(f"data={data!r} is not a folder; use 'shapes', 'shapes_plain', 'digits', an ImageNet-style "
                         f"folder (<class>/<image>.jpg, or train/ and val/) or a CIFAR-10/100 python folder")
    cifar = _find_cifar(data)
    if cifar is not None:
        return cifar_dataset(cifar, split, load_size or 32)
    return ImageFolderDataset(data, split, load_size or 256, min_pixels)


def describe(dataset):
    """One line for the logs, e.g. 'shapes/train: 5000 images, 10 classes, 64x64 px'."""
    pixels = f"{dataset.load_size}x{dataset.load_size} px" if getattr(dataset, "min_pixels", None) is None else \
        f"whole photos (decoded to >= {dataset.min_pixels} px)"
    line = f"{dataset.source}/{dataset.split}: {len(dataset)} images, {dataset.num_classes} classes, {pixels}"
    skipped = getattr(dataset, "num_skipped", 0)
    return line + (f", {skipped} unreadable files skipped" if skipped else "")


def _collate(batch, load_size, photos):
    """Stack (image, label) pairs, or pad them into data.Photos (photos=True), dropping the None of unreadable
    files: a batch may then be smaller, or empty."""
    batch = [item for item in batch if item is not None]
    labels = torch.tensor([label for _, label in batch], dtype=torch.int64)
    if photos:
        return Photos.stack([image for image, _ in batch]), labels
    if not batch:
        return torch.empty(0, 3, load_size, load_size, dtype=torch.uint8), labels
    return torch.stack([image for image, _ in batch]), labels


class Loader(DataLoader):
    """A DataLoader whose order depends only on (seed, epoch): call set_epoch(epoch) before each epoch, so that a
    resumed run sees the same batches as an uninterrupted one."""

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask: what a SLURM job or taskset grants), else all."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_noted_caps = set()  # the --num_workers values already reported, so that each is said once per process


def cap_workers(num_workers: int) -> int:
    """num_workers, or the usable cores when it asks for more: each worker is a whole process (its own copy of the
    data set, ~100 MB with torch), and more of them than cores only queue for the same cores. Says so once, in one
    line."""
    cpus = usable_cpus()
    if num_workers <= cpus:
        return num_workers
    if num_workers not in _noted_caps:
        _noted_caps.add(num_workers)
        print0(f"note: --num_workers {num_workers} is more than the {cpus} CPU cores this process may use; "
              f"using {cpus} loader processes")
    return cpus


def build_loader(dataset, batch_size, shuffle=True, drop_last=True, num_workers=0, seed=0, distributed=False):
    """-> Loader yielding (images uint8 (B, 3, S, S), labels int64 (B,)), or (data.Photos, labels) for a data set of
    whole photos (min_pixels set). The order is a permutation drawn from
    seed + epoch (DistributedSampler's rule; with distributed=True each process reads every world_size-th image of
    it, and with drop_last=False the last few are repeated so that all processes get as many).
    B = batch_size, except in the last batch when drop_last=False and in a batch holding unreadable files.
    num_workers is capped at the usable CPU cores (cap_workers)."""
    # one replica unless distributed: the same sampler, and so the same order, for a single process
    replicas = {} if distributed else {"num_replicas": 1, "rank": 0}
    sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last, **replicas)
    if drop_last and len(sampler) < batch_size:
        raise ValueError(f"batch_size={batch_size} is larger than the {len(sampler)} images per process and "
                         f"drop_last=True leaves no batch; lower the batch size")
    num_workers = cap_workers(num_workers)  # --num_workers 1000 would start 1000 processes
    collate = partial(_collate, load_size=dataset.load_size, photos=getattr(dataset, "min_pixels", None) is not None)
    return Loader(dataset, batch_size, sampler=sampler, drop_last=drop_last, num_workers=num_workers,
                  collate_fn=collate, pin_memory=torch.cuda.is_available(), persistent_workers=num_workers > 0)
