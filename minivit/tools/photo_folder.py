"""A realistic photo folder made on the spot (no download): what the data pipeline is tested and measured on.

    python -m minivit.tools.photo_folder /tmp/photos --images 256 --classes 4      # ~50 MB, ~1 min on one core
    python -m minivit.tools.photo_folder /tmp/photos --images 2560 --classes 8 --processes 16   # bench/gpu_check.sh

Sizes follow ImageNet's training set, where most photos are 500 x 375, 375 x 500 or 500 x 333 and a few are far
larger or tiny (SIZES below, with their shares). The content is photo-like rather than flat: a 1/f ("pink") colour
field over several octaves, a few soft-edged objects, a sharp horizon-like edge and sensor grain, so that the JPEG
encoder has as much to do as on a photo: a 500 x 375 file is ~100-150 KB at quality 90, like ImageNet's (~110 KB).
Among them, as in ImageNet, a few greyscale and CMYK JPEGs, plus a few PNGs (lossless, so several times larger).
Files are root/<class>/<index>.<ext>; every image is a function of (seed, index) only.
"""
import multiprocessing
import os

import numpy as np
from PIL import Image

from minivit import checkpoint, cli
from minivit.data import cap_workers

# (width, height, share): ImageNet's common sizes first, then a few big and a few tiny photos
SIZES = [(500, 375, 0.45), (375, 500, 0.18), (500, 333, 0.15), (333, 500, 0.05), (500, 500, 0.04),
         (640, 480, 0.04), (1024, 768, 0.03), (1600, 1200, 0.02), (2000, 1333, 0.01), (1200, 1920, 0.01),
         (120, 90, 0.01), (80, 64, 0.01)]
SPECIAL = {"grey": 0.02, "cmyk": 0.01, "png": 0.02}  # shares of greyscale JPEGs, CMYK JPEGs and PNG files


def _pink_field(rng, h, w):
    """(h, w, 3) float in ~[0, 255]: random colour noise at octaves 4, 8, ..., with amplitude ~ 1/frequency."""
    field = np.zeros((h, w, 3), np.float32)
    cells, amplitude = 3, 90.0
    while cells <= max(h, w):
        coarse = rng.standard_normal((max(2, cells * h // max(h, w)), max(2, cells * w // max(h, w)), 3), np.float32)
        coarse = (coarse - coarse.min()) / max(np.ptp(coarse), 1e-6) * 255
        up = Image.fromarray(coarse.astype(np.uint8)).resize((w, h), Image.BICUBIC)
        field += (np.asarray(up, np.float32) - 127.5) * (amplitude / 127.5)
        cells, amplitude = cells * 2, amplitude * 0.92
    return field + 127.5


def photo(seed, index, size):
    """One photo-like RGB image of size (width, height) as a PIL Image, drawn from (seed, index)."""
    w, h = size
    rng = np.random.default_rng([seed, index])
    pixels = _pink_field(rng, h, w)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    horizon = h * rng.uniform(0.3, 0.7) + (xx - w / 2) * rng.uniform(-0.3, 0.3)
    pixels += np.where(yy > horizon, 1.0, -1.0)[..., None] * rng.uniform(-40, 40, 3)  # a sharp edge across
    for _ in range(rng.integers(2, 6)):  # soft-edged objects: ellipses of their own colour, the texture kept
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.05, 0.3) * min(w, h)
        inside = np.clip((1 - np.hypot((xx - cx) / r, (yy - cy) / (r * rng.uniform(0.5, 1.5)))) * 8, 0, 1)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        pixels += inside[..., None] * (colour + 0.5 * (pixels - pixels.mean()) - pixels)
    pixels += rng.standard_normal(pixels.shape, np.float32) * 20  # sensor grain
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _write(job):
    """Draw and save photo i of a make_photo_folder job -> its path."""
    stem, seed, i, size, kind = job
    image = photo(seed, i, size)
    if kind == "png":
        image.save(stem + ".png")
        return stem + ".png"
    image.convert({"grey": "L", "cmyk": "CMYK"}.get(kind, "RGB")).save(stem + ".jpg", quality=90)
    return stem + ".jpg"


def make_photo_folder(root, images=256, classes=4, seed=0, processes=1):
    """Write `images` photos under root/c0 .. root/c{classes-1}/ (sizes drawn from SIZES, a few greyscale, CMYK
    and PNG files), in `processes` processes -> list of the paths written. Existing files are overwritten."""
    rng = np.random.default_rng(seed)
    shares = np.array([s for _, _, s in SIZES])
    sizes = rng.choice(len(SIZES), images, p=shares / shares.sum())
    kinds = rng.choice(["rgb", *SPECIAL], images, p=[1 - sum(SPECIAL.values()), *SPECIAL.values()])
    for c in range(classes):
        os.makedirs(os.path.join(root, f"c{c}"), exist_ok=True)
    jobs = [(os.path.join(root, f"c{i % classes}", f"{i:06d}"), seed, i, SIZES[sizes[i]][:2], str(kinds[i]))
            for i in range(images)]
    if processes <= 1:
        return [_write(job) for job in jobs]
    with multiprocessing.Pool(processes) as pool:
        return pool.map(_write, jobs, chunksize=8)


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", help="folder to write root/<class>/<image> into")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1, help="draw the photos in this many processes")
    args = parser.parse_args(argv)
    cli.check_args(parser, args, positive=("images", "classes", "processes"), seed=("seed",))
    with cli.errors():  # root a file, or under one, or read-only: one line before drawing anything
        checkpoint.make_output_dir(args.root, "root", files=[f"c{c}/" for c in range(args.classes)])
    args.processes = cap_workers(args.processes)  # --processes 1000 on a laptop
    paths = make_photo_folder(args.root, args.images, args.classes, args.seed, args.processes)
    total = sum(os.path.getsize(p) for p in paths)
    print(f"wrote {len(paths)} photos ({total / 2 ** 20:.1f} MB) under {args.root}")


if __name__ == "__main__":
    main()
