"""Batched image augmentations in plain PyTorch, on the CPU or the GPU.

Every function takes a batch and a CPU `torch.Generator`: it draws each image's random parameters on the CPU (so a
seed makes the same random choices on any device), moves them to the images' device and transforms the whole batch
in a few tensor ops, with no Python loop over images. The crops take a uint8 tensor (B, 3, H, W) or a data.Photos
batch of whole photos of different sizes (a padded canvas + each photo's size): boxes are drawn in each photo's own
pixels (torchvision's RandomResizedCrop rule over the whole photo) and resampled with PIL's bicubic coefficients,
antialiased when shrinking, as two batched matmuls (crop_resize). The photometric ops then take the float crops
(B, 3, S, S) in [0, 1]. This is how DINO's multi-crop (2 global + 8 local views of every image) runs on the GPU
from the decoded photos; the official code makes each view with PIL on the CPU, one image at a time.

The recipes are those of torchvision/PIL that DINO uses, with these deliberate differences:
  - a crop is computed in float from PIL's own coefficients (tests/test_augment.py: to 1 level of PIL once PIL's
    uint8 rounding between its two passes is replayed); PIL clips that intermediate to 0..255, we do not, so
    where the bicubic overshoots (grain, sharp edges) a pixel may differ by up to ~3%, < 0.5 levels on average;
  - photos larger than a recipe needs are decoded smaller, through the JPEG DCT (data.load_photo), never below
    the size at which its smallest crop would be enlarged (min_pixels); the official code decodes every photo
    whole, so it resamples once where we may, in effect, resample twice;
  - Gaussian blur is an exact separable Gaussian (radius 3 sigma, reflect padding) where PIL approximates it with
    box blurs; PIL's uint8 rounding between operations is not reproduced.
"""
import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale


def _uniform(low, high, n, generator):
    """n numbers U(low, high), drawn on the CPU in float64."""
    return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)


def _coin(p, n, generator):
    """n CPU booleans, each True with probability p."""
    return torch.rand(n, generator=generator) < p


def _to_device(values, device):
    """A small CPU tensor -> device without a sync: a plain .to("cuda") of pageable memory waits for the GPU to
    finish everything queued (once per augmentation op, that starved the GPU); from pinned memory it does not."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def _constant(values, x):
    """A few Python numbers -> a tensor on x's device and dtype, without a sync (see _to_device)."""
    return _to_device(torch.tensor(values, dtype=x.dtype), x.device)


def _per_image(values, x):
    """CPU parameters (n,) -> (n, 1, 1, 1) on x's device and dtype, to broadcast over an image batch."""
    return _to_device(values, x.device).to(x.dtype).view(-1, 1, 1, 1)


def _apply(images, chosen, fn, *params, inplace=False):
    """images with fn applied to the chosen images only: fn(x_subset, *params_subset) -> same shape. inplace: write
    the results into images itself (for a caller that owns it) rather than into a copy."""
    index = chosen.nonzero().flatten()
    if len(index) == 0:
        return images
    if len(index) == len(images):  # all of them: no gather / scatter
        return fn(images, *(_per_image(p, images) for p in params))
    index_dev = _to_device(index, images.device)
    subset = fn(images.index_select(0, index_dev), *(_per_image(p[index], images) for p in params))
    return images.index_copy_(0, index_dev, subset) if inplace else images.index_copy(0, index_dev, subset)


def to_float(images, dtype=torch.float32):
    """uint8 images (B, 3, H, W) in 0..255 -> float (B, 3, H, W) in [0, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}; the loaders yield uint8")
    return images.to(dtype) / 255


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(B, 3, H, W) in [0, 1] -> (x - mean) / std per channel (ImageNet statistics, as all the official models)."""
    mean, std = _constant(mean, images).view(1, -1, 1, 1), _constant(std, images).view(1, -1, 1, 1)
    return (images - mean) / std


def photo_batch(images):
    """A batch to crop from -> (pixels uint8 or float (B, 3, H, W), sizes int64 (B, 2) on the CPU): a data.Photos
    batch of whole photos (each pixels[i, :, :h_i, :w_i]), or a plain tensor whose images fill it."""
    if isinstance(images, torch.Tensor):
        return images, torch.tensor(images.shape[-2:], dtype=torch.int64).expand(len(images), 2)
    return images.pixels, images.sizes


def sample_crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """torchvision's RandomResizedCrop boxes for n images of height x width (ints, or int64 (n,) tensors: one size
    per photo) -> int64 (n, 4): top, left, h, w, in each image's own pixels.

    Up to 10 tries per image: area ~ U(scale) * H * W and log aspect ratio ~ U(log ratio); the first box that fits
    is kept at a uniform position; if none fits, the central crop clipped to the ratio range (torchvision's rule).
    """
    tries = 10
    height = torch.as_tensor(height, dtype=torch.int64).expand(n)
    width = torch.as_tensor(width, dtype=torch.int64).expand(n)
    area = (height * width)[:, None] * _uniform(scale[0], scale[1], (n, tries), generator)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries), generator))
    w = torch.sqrt(area * aspect).round().long()
    h = torch.sqrt(area / aspect).round().long()
    fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = fits.long().argmax(1, keepdim=True)  # index of the first box that fits (0 when none does)
    found = fits.any(1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # fallback: the whole image, cut to the nearest allowed aspect ratio
    image_ratio = width / height
    fallback_h = torch.where(image_ratio < min(ratio), (width / min(ratio)).round().long(), height)
    fallback_w = torch.where(image_ratio > max(ratio), (height * max(ratio)).round().long(), width)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (height - h + 1)).floor().long()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1)).floor().long()
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def random_crop_params(sizes, scale, ratio=(3 / 4, 4 / 3), hflip_p=0.0, generator=None):
    """RandomResizedCrop's (+ RandomHorizontalFlip's) random choices for photos of sizes int64 (n, 2: h, w)
    -> boxes int64 (n, 4: top, left, h, w) in each photo's own pixels, flip bool (n,). All on the CPU."""
    boxes = sample_crop_boxes(len(sizes), sizes[:, 0], sizes[:, 1], scale, ratio, generator)
    return boxes, _coin(hflip_p, len(sizes), generator)


# PIL's resampling filters (Resample.c): support in source pixels at scale 1, and the kernel
def _bicubic(x, a=-0.5):  # Keys' cubic with a = -0.5 (PIL's; grid_sample and OpenCV use -0.75)
    x = x.abs()
    return torch.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                       torch.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0))


PIL_FILTERS = {"bicubic": (2.0, _bicubic), "bilinear": (1.0, lambda x: (1 - x.abs()).clamp(min=0))}


def resample_taps(start, length, in_size, out_size, taps, interpolation="bicubic"):
    """PIL's resampling coefficients (Resample.c, precompute_coeffs) for n boxes along one axis, on start's device
    and in its float dtype: -> source pixel index int64 (n, out_size, taps), weight (n, out_size, taps).

    Box i covers source pixels [start_i, start_i + length_i); output pixel x samples at its centre
    start + (x + 0.5) length / out_size. Shrinking by s = length / out_size > 1 widens the filter s times (PIL's
    antialiasing: the kernel then averages ~s source pixels per tap instead of skipping them). Taps stop at the
    photo's own edge (0, in_size_i), never reaching the padding, and each output's weights sum to 1, as PIL's.
    start, length, in_size: float (n,); taps: an int >= every box's tap count (_taps); unused taps weigh 0."""
    support, kernel = PIL_FILTERS[interpolation]
    scale = length / out_size                                                    # (n,) source px per output px
    filterscale = scale.clamp(min=1.0)[:, None, None]
    x = torch.arange(out_size, device=start.device, dtype=start.dtype)
    centre = (start[:, None] + (x + 0.5) * scale[:, None])[..., None]           # (n, out, 1)
    radius = support * filterscale
    first = (centre - radius + 0.5).trunc().clamp(min=0)                        # PIL's int() truncates
    last = torch.minimum((centre + radius + 0.5).trunc(), in_size[:, None, None])
    j = first + torch.arange(taps, device=start.device, dtype=start.dtype)      # (n, out, taps)
    w = torch.where(j < last, kernel((j - centre + 0.5) / filterscale), 0)
    return torch.minimum(j, in_size[:, None, None] - 1).long(), w / w.sum(-1, keepdim=True)


def _taps(scale, interpolation):
    """How many taps cover the widest filter of these boxes (scale: source px per output px, CPU (n,)) -> int."""
    return math.ceil(2 * PIL_FILTERS[interpolation][0] * max(1.0, float(scale.max()))) + 2


def canvas_rows(images, dtype=torch.float32):
    """A batch (B, C, H, W), uint8 or float, as the table of its rows that crop_resize samples from: float
    (B H, C W), row y of image b at b H + y (one strided copy; uint8 stays 0..255, crop_resize scales it)."""
    B, C, H, W = images.shape
    dtype = torch.promote_types(images.dtype if images.dtype.is_floating_point else dtype, torch.float32)
    return torch.empty(B, H, C, W, dtype=dtype, device=images.device).copy_(images.permute(0, 2, 1, 3)).view(
        B * H, C * W)


def crop_resize(images, boxes, size, interpolation="bicubic", flip=None, sizes=None, source=None,
                dtype=torch.float32, rows=None):
    """Cut boxes out of a batch and resample each to size x size (an int or (h, w)) as PIL's resize(size, box=...)
    does, antialiased when shrinking, mirrored where flip is True; the whole batch in a fixed handful of kernels.

    images: uint8 (B, 3, H, W) (-> values in [0, 1]) or float (same values); boxes: int64 (n, 4: top, left, h, w)
    on the CPU, in the pixels of photo source[i] (default: i), whose true size is sizes[source[i]] (default: all
    of H x W; a data.Photos canvas passes its sizes); flip: bool (n,) or None; rows: canvas_rows(images), to share
    it between calls. -> float (n, 3, h, w), in images' float dtype (at least float32: pixel positions need it),
    or `dtype` for uint8 images.

    Separable, as PIL: each output row is first a weighted sum of the few source rows under its filter
    (resample_taps), one F.embedding_bag over the canvas rows for all crops (weighted sums of table rows, without
    materialising the gathered rows: work ~ outputs x taps); then each output column a weighted sum of the
    columns of that, as one batched matmul with the taps scattered into a dense (w, W) matrix per crop (no
    transpose of the intermediate). No device sync: every size is known on the CPU."""
    n = len(boxes)
    B, C, H, W = images.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    dtype = torch.promote_types(images.dtype if images.dtype.is_floating_point else dtype, torch.float32)
    if n == 0:
        return images.new_empty(0, C, out_h, out_w, dtype=dtype)
    device = images.device
    sizes = torch.tensor([H, W]).expand(B, 2) if sizes is None else sizes
    source = torch.arange(n) if source is None else source
    top, left, h, w = boxes.to(torch.float64).unbind(1)
    taps_y, taps_x = _taps(h / out_h, interpolation), _taps(w / out_w, interpolation)
    photo_h, photo_w = sizes[source].to(torch.float64).unbind(1)
    params = torch.stack([top, h, photo_h, left, w, photo_w, source], 1)  # one copy to the device
    top, h, photo_h, left, w, photo_w, source = _to_device(params, device).to(dtype).unbind(1)
    iy, wy = resample_taps(top, h, photo_h, out_h, taps_y, interpolation)          # (n, out_h, taps_y)
    ix, wx = resample_taps(left, w, photo_w, out_w, taps_x, interpolation)         # (n, out_w, taps_x)
    if flip is not None:  # mirrored: output column x takes the taps of column out_w - 1 - x
        flip = _to_device(flip, device)[:, None, None]
        ix, wx = torch.where(flip, ix.flip(1), ix), torch.where(flip, wx.flip(1), wx)
    if not images.dtype.is_floating_point:
        wy = wy / 255  # uint8 -> [0, 1], folded into the weights
    rows = canvas_rows(images, dtype) if rows is None else rows                   # (B H, C W)
    index = source.long()[:, None, None] * H + iy                                 # (n, out_h, taps_y) table rows
    x = F.embedding_bag(index.view(-1, taps_y), rows, per_sample_weights=wy.view(-1, taps_y), mode="sum")
    Wx = torch.zeros(n, out_w, W, dtype=dtype, device=device).scatter_add_(2, ix, wx)  # (n, out_w, W)
    x = x.view(n, out_h * C, W) @ Wx.transpose(1, 2)                               # (n, out_h C, out_w)
    # -> (n, C, out_h, out_w); bicubic overshoots at edges and PIL clips too
    return x.view(n, out_h, C, out_w).transpose(1, 2).clamp(0, 1).contiguous()


def random_resized_crop(images, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None,
                        interpolation="bicubic", hflip_p=0.0):
    """Inception-style random crop of a batch (a tensor (B, 3, H, W), uint8 or float in [0, 1], or data.Photos)
    -> float (B, 3, size, size): a box of scale*area and aspect ratio in ratio of each photo's own H x W
    (random_crop_params), resampled to size as PIL would; mirrored with probability hflip_p (free: it reverses
    the horizontal weights)."""
    pixels, sizes = photo_batch(images)
    boxes, flip = random_crop_params(sizes, scale, ratio, hflip_p, generator)
    return crop_resize(pixels, boxes, size, interpolation, flip, sizes)


def horizontal_flip(images, p=0.5, generator=None):
    """Mirror each image left-right with probability p."""
    return _apply(images, _coin(p, images.shape[0], generator), lambda x: x.flip(-1))


def _grey(x):
    """(n, 3, H, W) -> (n, 1, H, W) luma."""
    return (x * _constant(LUMA, x).view(1, 3, 1, 1)).sum(1, keepdim=True)


def _rgb_to_hsv(x):
    """(n, 3, H, W) RGB in [0, 1] -> hue, saturation, value, each (n, H, W) in [0, 1]."""
    r, g, b = x.unbind(1)
    value, largest = x.max(1)
    chroma = value - x.min(1).values
    safe = torch.where(chroma > 0, chroma, 1)
    hue = torch.stack([(g - b) / safe, (b - r) / safe + 2, (r - g) / safe + 4], 1)  # sector by largest channel
    hue = torch.where(chroma > 0, (hue.gather(1, largest[:, None]).squeeze(1) / 6) % 1, 0)
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, 1), 0)
    return hue, saturation, value


def _hsv_to_rgb(hue, saturation, value):
    """The inverse of _rgb_to_hsv: channel n in (R, G, B) = (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 h) mod 6."""
    n = _constant([5.0, 3.0, 1.0], hue).view(1, 3, 1, 1)
    k = (n + 6 * hue[:, None]) % 6
    v, s = value[:, None], saturation[:, None]
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def _adjust_hue(x, shift):
    hue, saturation, value = _rgb_to_hsv(x)
    return _hsv_to_rgb((hue + shift[:, 0]) % 1, saturation, value)


# torchvision's adjust_* on float images: brightness scales, contrast blends with the mean grey level, saturation
# blends with the grey image, each clamped to [0, 1]; hue rotates the HSV hue by a fraction of the circle.
_JITTER_OPS = (
    lambda x, f: (x * f).clamp(0, 1),
    lambda x, f: (f * x + (1 - f) * _grey(x).mean((-2, -1), keepdim=True)).clamp(0, 1),
    lambda x, f: (f * x + (1 - f) * _grey(x)).clamp(0, 1),
    _adjust_hue,
)


def color_jitter(images, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8, generator=None):
    """torchvision's ColorJitter applied with probability p: brightness, contrast and saturation factors
    ~ U(max(0, 1 - a), 1 + a), a hue shift ~ U(-hue, hue) turns of the colour circle, in a random order drawn per
    image (as torchvision draws it per call). Defaults: DINO's values (0.4, 0.4, 0.2, 0.1, p=0.8)."""
    B = images.shape[0]
    chosen = _coin(p, B, generator)
    factors = [_uniform(max(0.0, 1 - a), 1 + a, B, generator) for a in (brightness, contrast, saturation)]
    factors.append(_uniform(-hue, hue, B, generator))
    order = torch.rand(B, 4, generator=generator).argsort(1)  # order[i, slot] = the op image i does at slot
    images = images.clone()  # ours now: the 16 subsets below are written into it in place, not into 16 copies
    for slot in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            images = _apply(images, chosen & (order[:, slot] == op), fn, factors[op], inplace=True)
    return images


def random_grayscale(images, p=0.2, generator=None):
    """Replace each image by its luma (ITU-R 601, copied to the 3 channels) with probability p."""
    return _apply(images, _coin(p, images.shape[0], generator), lambda x: _grey(x).expand_as(x))


def _blur_along(x, sigma, radius, dim):
    """1-D Gaussian blur of x (n, C, H, W) along dim (-1 or -2), one sigma (n, 1, 1, 1) per image."""
    n, C, H, W = x.shape
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma.view(n, 1)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (n C, 2 radius + 1)
    if dim == -1:
        shape, pad = (n * C, 1, 1, -1), (radius, radius, 0, 0)
    else:
        shape, pad = (n * C, 1, -1, 1), (0, 0, radius, radius)
    x = F.pad(x.reshape(1, n * C, H, W), pad, mode="reflect")
    return F.conv2d(x, kernel.view(shape), groups=n * C).view(n, C, H, W)  # one group per image channel


def gaussian_blur(images, p=0.5, sigma=(0.1, 2.0), generator=None):
    """Gaussian blur with probability p, sigma ~ U(sigma) per image (DINO's PIL GaussianBlur radius, which is
    sigma): a separable kernel over +-3 sigma_max pixels, one grouped convolution per axis, reflect padding."""
    B, _, H, W = images.shape
    chosen, sigmas = _coin(p, B, generator), _uniform(sigma[0], sigma[1], B, generator)
    radius = math.ceil(3 * sigma[1])  # a wider kernel only adds ~0 weights; reflect padding needs radius < side

    def blur(x, s):
        return _blur_along(_blur_along(x, s, min(radius, W - 1), -1), s, min(radius, H - 1), -2)
    return _apply(images, chosen, blur, sigmas)


def solarize(images, p=0.2, threshold=0.5, generator=None):
    """With probability p invert the pixels >= threshold (x -> 1 - x): PIL's ImageOps.solarize(img, 128) on
    uint8 images, whose pixels k/255 are >= 0.5 exactly when k >= 128."""
    return _apply(images, _coin(p, images.shape[0], generator), lambda x: torch.where(x >= threshold, 1 - x, x))


def min_pixels(crops):
    """The decoded size (pixels) that keeps every crop of a recipe from being enlarged: [(output side, smallest
    area fraction), ...] -> max side^2 / fraction. A photo with that many pixels gives even the smallest crop at
    least one source pixel per output pixel; data.load_photo decodes large photos down to it and no further."""
    return max(math.ceil(side ** 2 / scale) for side, scale in crops)


class SupervisedAugment:
    """Training views for supervised ViT / ResNet: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)) of the whole
    photo + flip + ImageNet normalisation (the Inception crop of the ViT/DeiT and torchvision recipes).
    __call__(uint8 (B, 3, S, S) or data.Photos, generator) -> float (B, 3, size, size)."""

    def __init__(self, size, scale=(0.08, 1.0), hflip=True, interpolation="bicubic"):
        self.size, self.scale, self.hflip, self.interpolation = size, scale, hflip, interpolation
        self.min_pixels = min_pixels([(size, scale[0])])  # 224^2 / 0.08 = 627,200 for ImageNet's recipe

    def __call__(self, images, generator=None):
        x = random_resized_crop(images, self.size, self.scale, generator=generator, interpolation=self.interpolation,
                                hflip_p=0.5 if self.hflip else 0.0)
        return normalize(x)


class EvalTransform:
    """Evaluation view: resize the shorter side to `resize` (bicubic, antialiased), centre-crop size x size,
    normalise. ImageNet protocol (DINO k-NN/linear eval): EvalTransform(224, resize=256). resize=None resizes the
    shorter side to size itself, cutting nothing off a square image (right for shapes, digits, CIFAR).
    __call__(uint8 (B, 3, H, W)) -> float (B, 3, size, size)."""

    def __init__(self, size, resize=None):
        if resize is not None and resize < size:
            raise ValueError(f"EvalTransform: resize={resize} is smaller than the crop size={size}")
        self.size, self.resize = size, resize or size

    def __call__(self, images, generator=None):
        if not isinstance(images, torch.Tensor):
            raise ValueError("EvalTransform takes square uint8 batches: build the evaluation data set without "
                             "min_pixels (data.load_image's Resize + centre square)")
        x = to_float(images)
        H, W = x.shape[-2:]
        if min(H, W) != self.resize:  # torchvision's Resize(int): shorter side -> resize, longer side in proportion
            new = (self.resize, int(self.resize * W / H)) if H <= W else (int(self.resize * H / W), self.resize)
            x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        H, W = x.shape[-2:]
        top, left = round((H - self.size) / 2), round((W - self.size) / 2)  # torchvision's center_crop
        return normalize(x[..., top:top + self.size, left:left + self.size])


class MultiCropAugment:
    """DINO's multi-crop (Caron et al. 2021, sec. 3.1 and appendix D; DataAugmentationDINO in the official
    main_dino.py): 2 global views of global_crop_size from global_crops_scale of the photo, and
    local_crops_number local views of local_crop_size from local_crops_scale, all bicubic, every box drawn over the
    whole photo at its own size and aspect. Every view is flipped (p=0.5), colour-jittered (0.4, 0.4, 0.2, 0.1;
    p=0.8), made grey (p=0.2), blurred (sigma U(0.1, 2); p=1.0 for global view 1, 0.1 for global view 2, 0.5 for
    local views), solarized (p=0.2, global view 2 only) and normalised with ImageNet statistics (color_jitter =
    (brightness, contrast, saturation, hue) and its probability color_jitter_p are DINO's unless given). The blur's
    sigma is in pixels of a 224 px global view: smaller crops get it scaled by global_crop_size / 224, so that a
    32 px view is blurred as much as a 224 px one, not 7x more.
    The crops of all global views, then of all local views, are cut in one crop_resize call each.
    __call__(uint8 (B, 3, S, S) or data.Photos, generator)
    -> [(B, 3, G, G)] * 2 + [(B, 3, L, L)] * local_crops_number, float32."""

    def __init__(self, global_crop_size=224, local_crop_size=96, local_crops_number=8,
                 global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), color_jitter=(0.4, 0.4, 0.2, 0.1),
                 color_jitter_p=0.8):
        self.color_jitter, self.color_jitter_p = tuple(color_jitter), color_jitter_p
        self.global_crop_size, self.local_crop_size = global_crop_size, local_crop_size
        self.local_crops_number = local_crops_number
        self.global_crops_scale, self.local_crops_scale = global_crops_scale, local_crops_scale
        self.blur_sigma = (0.1 * global_crop_size / 224, 2.0 * global_crop_size / 224)
        crops = [(global_crop_size, global_crops_scale[0])] + \
            [(local_crop_size, local_crops_scale[0])] * (local_crops_number > 0)
        self.min_pixels = min_pixels(crops)  # 96^2 / 0.05 = 184,320 for DINO's defaults (about 500 x 375)

    def _photometric(self, x, blur_p, solarize_p, generator):
        x = color_jitter(x, *self.color_jitter, p=self.color_jitter_p, generator=generator)
        x = random_grayscale(x, p=0.2, generator=generator)
        x = gaussian_blur(x, p=blur_p, sigma=self.blur_sigma, generator=generator)
        x = solarize(x, p=solarize_p, generator=generator)
        return normalize(x)

    def _crops(self, pixels, sizes, rows, size, scale, number, generator):
        """`number` views of every photo: (number B, 3, size, size), view k of photo b at row k B + b."""
        params = [random_crop_params(sizes, scale, hflip_p=0.5, generator=generator) for _ in range(number)]
        boxes, flip = (torch.cat(p) for p in zip(*params))
        return crop_resize(pixels, boxes, size, flip=flip, sizes=sizes, source=torch.arange(len(sizes)).repeat(number),
                           rows=rows)

    def __call__(self, images, generator=None):
        pixels, sizes = photo_batch(images)
        B, n = len(sizes), self.local_crops_number
        rows = canvas_rows(pixels) if B else None  # converted once for the global and the local crops
        views = self._crops(pixels, sizes, rows, self.global_crop_size, self.global_crops_scale, 2, generator)
        views = [self._photometric(views[:B], 1.0, 0.0, generator), self._photometric(views[B:], 0.1, 0.2, generator)]
        if n > 0:  # the local views share one photometric pass over (n B, 3, L, L)
            local = self._crops(pixels, sizes, rows, self.local_crop_size, self.local_crops_scale, n, generator)
            local = self._photometric(local, 0.5, 0.0, generator)
            views += list(local.view(n, B, *local.shape[1:]).unbind(0))
        return views
