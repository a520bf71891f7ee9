"""Batched image augmentations in plain PyTorch, on the CPU or the GPU.

Every function takes a float batch (B, 3, H, W) in [0, 1] and a CPU `torch.Generator`: it draws each image's random
parameters on the CPU (so a seed makes the same random choices on any device), moves them to the images' device and
transforms the whole batch in a few tensor ops, with no Python loop over images. This is how DINO's multi-crop (2
global + 8 local views of every image) runs on the GPU from the decoded uint8 batch; the official code makes each
view with PIL on the CPU, one image at a time.

The recipes are those of torchvision/PIL that DINO uses, with these deliberate differences:
  - crops are resampled by F.grid_sample, which does not low-pass first: a crop shrunk by more than ~2x aliases a
    little where PIL would antialias (EvalTransform's single resize does antialias);
  - the crop boxes are drawn inside the load_size square of minivit/data.py, not inside the full photo;
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


def _per_image(values, x):
    """CPU parameters (n,) -> (n, 1, 1, 1) on x's device and dtype, to broadcast over an image batch."""
    return values.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1)


def _apply(images, chosen, fn, *params):
    """images with fn applied to the chosen images only: fn(x_subset, *params_subset) -> same shape."""
    index = chosen.nonzero().flatten()
    if len(index) == 0:
        return images
    if len(index) == len(images):  # all of them: no gather / scatter
        return fn(images, *(_per_image(p, images) for p in params))
    index_dev = index.to(images.device)
    subset = images.index_select(0, index_dev)
    return images.index_copy(0, index_dev, fn(subset, *(_per_image(p[index], subset) for p in params)))


def to_float(images, dtype=torch.float32):
    """uint8 images (B, 3, H, W) in 0..255 -> float (B, 3, H, W) in [0, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}; the loaders yield uint8")
    return images.to(dtype) / 255


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """(B, 3, H, W) in [0, 1] -> (x - mean) / std per channel (ImageNet statistics, as all the official models)."""
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def sample_crop_boxes(n, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None):
    """torchvision's RandomResizedCrop boxes for n images of height x width -> int64 (n, 4): top, left, h, w.

    Up to 10 tries per image: area ~ U(scale) * H * W and log aspect ratio ~ U(log ratio); the first box that fits
    is kept at a uniform position; if none fits, the central crop clipped to the ratio range (torchvision's rule).
    """
    tries = 10
    area = height * width * _uniform(scale[0], scale[1], (n, tries), generator)
    aspect = torch.exp(_uniform(math.log(ratio[0]), math.log(ratio[1]), (n, tries), generator))
    w = torch.sqrt(area * aspect).round().long()
    h = torch.sqrt(area / aspect).round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # index of the first box that fits (0 when none does)
    found = fits.any(1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    # fallback: the whole image, cut to the nearest allowed aspect ratio
    fallback_w, fallback_h = width, height
    if width / height < min(ratio):
        fallback_h = round(width / min(ratio))
    elif width / height > max(ratio):
        fallback_w = round(height * max(ratio))
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    top = (torch.rand(n, generator=generator, dtype=torch.float64) * (height - h + 1)).floor().long()
    left = (torch.rand(n, generator=generator, dtype=torch.float64) * (width - w + 1)).floor().long()
    top = torch.where(found, top, (height - h) // 2)
    left = torch.where(found, left, (width - w) // 2)
    return torch.stack([top, left, h, w], 1)


def crop_resize(images, boxes, size, interpolation="bicubic", flip=None):
    """Cut boxes (n, 4: top, left, h, w in pixels) out of images (n, 3, H, W) and resample each to size (int or
    (h, w)), mirrored where flip (n,) bool is True: one F.grid_sample with a per-image affine grid."""
    n, C, H, W = images.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    if n == 0:  # an empty batch (every file of it unreadable): affine_grid refuses zero sizes
        return images.new_empty(0, C, out_h, out_w)
    top, left, h, w = boxes.to(torch.float64).unbind(1)
    # grid_sample coordinates (align_corners=False): -1 and +1 are the outer edges of the first and last pixel
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = w / W if flip is None else torch.where(flip, -w / W, w / W)  # half-width; negative = mirror
    theta[:, 0, 2] = (2 * left + w) / W - 1  # centre x
    theta[:, 1, 1] = h / H
    theta[:, 1, 2] = (2 * top + h) / H - 1
    grid = F.affine_grid(theta.to(images.device, images.dtype), [n, C, out_h, out_w], align_corners=False)
    out = F.grid_sample(images, grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out.clamp(0, 1) if interpolation == "bicubic" else out  # bicubic overshoots at edges


def random_resized_crop(images, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None,
                        interpolation="bicubic", hflip_p=0.0):
    """Inception-style random crop of (B, 3, H, W) -> (B, 3, size, size): a box of scale*area and aspect ratio in
    ratio per image (sample_crop_boxes), resampled to size; mirrored with probability hflip_p (free: it is the
    sign of the sampling grid)."""
    B, _, H, W = images.shape
    boxes = sample_crop_boxes(B, H, W, scale, ratio, generator)
    flip = _coin(hflip_p, B, generator)
    return crop_resize(images, boxes, size, interpolation, flip)


def horizontal_flip(images, p=0.5, generator=None):
    """Mirror each image left-right with probability p."""
    return _apply(images, _coin(p, images.shape[0], generator), lambda x: x.flip(-1))


def _grey(x):
    """(n, 3, H, W) -> (n, 1, H, W) luma."""
    return (x * torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


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
    n = torch.tensor([5.0, 3.0, 1.0], dtype=hue.dtype, device=hue.device).view(1, 3, 1, 1)
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
    for slot in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            images = _apply(images, chosen & (order[:, slot] == op), fn, factors[op])
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


class SupervisedAugment:
    """Training views for supervised ViT / ResNet: RandomResizedCrop (scale (0.08, 1), ratio (3/4, 4/3)) + flip +
    ImageNet normalisation (the Inception crop of the ViT/DeiT and torchvision recipes).
    __call__(uint8 (B, 3, S, S), generator) -> float (B, 3, size, size)."""

    def __init__(self, size, scale=(0.08, 1.0), hflip=True, interpolation="bicubic"):
        self.size, self.scale, self.hflip, self.interpolation = size, scale, hflip, interpolation

    def __call__(self, images, generator=None):
        x = to_float(images)
        x = random_resized_crop(x, self.size, self.scale, generator=generator, interpolation=self.interpolation,
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
    main_dino.py): 2 global views of global_crop_size from global_crops_scale of the image, and
    local_crops_number local views of local_crop_size from local_crops_scale, all bicubic. Every view is flipped
    (p=0.5), colour-jittered (0.4, 0.4, 0.2, 0.1; p=0.8), made grey (p=0.2), blurred (sigma U(0.1, 2); p=1.0 for
    global view 1, 0.1 for global view 2, 0.5 for local views), solarized (p=0.2, global view 2 only) and
    normalised with ImageNet statistics (color_jitter = (brightness, contrast, saturation, hue) and its
    probability color_jitter_p are DINO's unless given). The blur's sigma is in pixels of a 224 px global view:
    smaller crops get it scaled by global_crop_size / 224, so that a 32 px view is blurred as much as a 224 px one,
    not 7x more.
    __call__(uint8 (B, 3, S, S), generator) -> [(B, 3, G, G)] * 2 + [(B, 3, L, L)] * local_crops_number."""

    def __init__(self, global_crop_size=224, local_crop_size=96, local_crops_number=8,
                 global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), color_jitter=(0.4, 0.4, 0.2, 0.1),
                 color_jitter_p=0.8):
        self.color_jitter, self.color_jitter_p = tuple(color_jitter), color_jitter_p
        self.global_crop_size, self.local_crop_size = global_crop_size, local_crop_size
        self.local_crops_number = local_crops_number
        self.global_crops_scale, self.local_crops_scale = global_crops_scale, local_crops_scale
        self.blur_sigma = (0.1 * global_crop_size / 224, 2.0 * global_crop_size / 224)

    def _photometric(self, x, blur_p, solarize_p, generator):
        x = color_jitter(x, *self.color_jitter, p=self.color_jitter_p, generator=generator)
        x = random_grayscale(x, p=0.2, generator=generator)
        x = gaussian_blur(x, p=blur_p, sigma=self.blur_sigma, generator=generator)
        x = solarize(x, p=solarize_p, generator=generator)
        return normalize(x)

    def __call__(self, images, generator=None):
        x = to_float(images)
        crop = lambda size, scale: random_resized_crop(x, size, scale, generator=generator, hflip_p=0.5)  # noqa: E731
        views = [self._photometric(crop(self.global_crop_size, self.global_crops_scale), 1.0, 0.0, generator),
                 self._photometric(crop(self.global_crop_size, self.global_crops_scale), 0.1, 0.2, generator)]
        if self.local_crops_number > 0:  # the local views share one photometric pass over (n B, 3, L, L)
            local = torch.cat([crop(self.local_crop_size, self.local_crops_scale)
                               for _ in range(self.local_crops_number)])
            local = self._photometric(local, 0.5, 0.0, generator)
            views += list(local.view(self.local_crops_number, *x.shape[:2], *local.shape[-2:]).unbind(0))
        return views
