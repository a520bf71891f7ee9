"""Batched image augmentations in plain PyTorch, on the CPU or the GPU.

Every function takes a batch and a CPU `torch.Generator`: it draws each image's random parameters on the CPU (so a
seed makes the same random choices on any device), moves them to the images' device and transforms the whole batch
in a few tensor ops, with no Python loop over images. The crops take a uint8 tensor (B, 3, H, W) or a data.Photos
batch of whole photos of different sizes (a padded canvas + each photo's size): boxes are drawn in each photo's own
pixels (torchvision's RandomResizedCrop rule over the whole photo) and resampled as torchvision's resized_crop does
with PIL (crop the box, then resize it with PIL's bicubic filter, antialiased when shrinking): on a GPU as two
batched gathers for the whole batch, on a CPU with torch's own uint8 resampler per box (crop_resize). The
photometric ops then take the float crops (B, 3, S, S) in [0, 1]. This is how DINO's multi-crop (2 global + 8 local
views of every image) runs from the decoded photos; the official code makes each view with PIL on the CPU, one
image at a time (`python bench/bench.py --only data` measures both).

The recipes are those of torchvision/PIL that DINO uses, with these deliberate differences:
  - PIL rounds to uint8 after every operation; we round once, when the crops are cut on the CPU (to 1 level of
    PIL's there), and not at all on the GPU, whose batched crops are computed in float from PIL's own coefficients
    (to 1 level of PIL once PIL's uint8 rounding between its two passes is replayed; PIL also clips that
    intermediate to 0..255, so where the bicubic overshoots, at grain and sharp edges, a GPU crop may differ by up
    to ~3%, < 0.5 levels on average: tests/test_augment.py);
  - photos larger than a recipe needs are decoded smaller, through the JPEG DCT (data.load_photo), never below
    the size at which its smallest crop would be enlarged (min_pixels); the official code decodes every photo
    whole, so it resamples once where we may, in effect, resample twice;
  - Gaussian blur is an exact separable Gaussian (radius 3 sigma) where PIL approximates it with three box blurs;
    both repeat the edge pixels beyond the border (replicate padding; PIL's BoxBlur.c extends each line with its
    first and last pixel), so on noise the border is ~1-2 levels of 255 from PIL's on average, as the inside
    (tests/test_official_eval.py); torchvision's float hue shift (exact HSV) where the official PIL path shifts a
    uint8 hue channel.
"""
import functools
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
    """A few Python numbers -> a tensor on x's device and dtype, without a sync (see _to_device); made once per
    (values, dtype, device) and shared, so never to be changed in place."""
    return _cached_constant(tuple(values), x.dtype, x.device)


@functools.lru_cache(maxsize=64)
def _cached_constant(values, dtype, device):
    return _to_device(torch.tensor(values, dtype=dtype), device)


def _per_image(values, x):
    """CPU parameters (n,) -> (n, 1, 1, 1) on x's device and dtype, to broadcast over an image batch."""
    return _to_device(values, x.device).to(x.dtype).view(-1, 1, 1, 1)


def _apply(images, chosen, fn, *params, inplace=False):
    """images with fn applied to the chosen images only: fn(x_subset, *params_subset) -> same shape. inplace: write
    the results into images itself (for a caller that owns it) rather than into a copy. The subset is gathered
    and written back with one kernel each on a GPU; on a CPU image by image (one memcpy each: index_select and
    index_copy_ copy whole-image rows several times slower there), and a lone image is worked on where it is."""
    index = chosen.nonzero().flatten()
    if len(index) == 0:
        return images
    if len(index) == len(images):  # all of them: no gather / scatter
        result = fn(images, *(_per_image(p, images) for p in params))
        return images.copy_(result) if inplace and result is not images else result
    subset_params = [_per_image(p[index], images) for p in params]
    if images.device.type == "cpu":
        rows = index.tolist()
        out = images if inplace else images.clone()
        subset = out[rows[0]:rows[0] + 1] if len(rows) == 1 else torch.stack([out[i] for i in rows])
        result = fn(subset, *subset_params)
        if len(rows) == 1:
            if result is not subset:
                subset.copy_(result)
        else:
            for i, image in zip(rows, result):
                out[i].copy_(image)
        return out
    index_dev = _to_device(index, images.device)
    subset = fn(images.index_select(0, index_dev), *subset_params)
    return images.index_copy_(0, index_dev, subset) if inplace else images.index_copy(0, index_dev, subset)


def to_float(images, dtype=torch.float32):
    """uint8 images (B, 3, H, W) in 0..255 -> float (B, 3, H, W) in [0, 1]."""
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}; the loaders yield uint8")
    return images.to(dtype) / 255


def normalize(images, mean=IMAGENET_MEAN, std=IMAGENET_STD, inplace=False):
    """(B, 3, H, W) in [0, 1] -> (x - mean) / std per channel (ImageNet statistics, as all the official models).
    inplace: overwrite images (a caller that owns them; the multi-crop views are made so)."""
    mean, std = _constant(mean, images).view(1, -1, 1, 1), _constant(std, images).view(1, -1, 1, 1)
    if inplace:  # one pass: x * (1 / std) - mean / std
        return torch.addcmul(-mean / std, images, 1 / std, out=images)
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


def resample_taps(start, length, out_size, taps, interpolation="bicubic"):
    """PIL's resampling coefficients (Resample.c, precompute_coeffs) for n boxes along one axis, on start's device
    and in its float dtype: -> source pixel index int64 (n, out_size, taps), weight (n, out_size, taps).

    Box i covers source pixels [start_i, start_i + length_i); output pixel x samples at its centre
    start + (x + 0.5) length / out_size. Shrinking by s = length / out_size > 1 widens the filter s times (PIL's
    antialiasing: the kernel then averages ~s source pixels per tap instead of skipping them). Taps stop at the
    box's own edges, as when PIL resizes the cropped image (torchvision's resized_crop: crop, then resize), and
    each output's weights sum to 1. start, length: float (n,), whole pixels; taps: an int >= every box's tap count
    (_taps); unused taps weigh 0 (and point at the box's last pixel)."""
    support, kernel = PIL_FILTERS[interpolation]
    scale = length / out_size                                                    # (n,) source px per output px
    filterscale = scale.clamp(min=1.0)[:, None, None]
    x = torch.arange(out_size, device=start.device, dtype=start.dtype)
    centre = ((x + 0.5) * scale[:, None])[..., None]                            # (n, out, 1), in the box
    radius = support * filterscale
    first = (centre - radius + 0.5).trunc().clamp(min=0)                        # PIL's int() truncates
    last = torch.minimum((centre + radius + 0.5).trunc(), length[:, None, None])
    j = first + torch.arange(taps, device=start.device, dtype=start.dtype)      # (n, out, taps)
    w = torch.where(j < last, kernel((j - centre + 0.5) / filterscale), 0)
    j = torch.minimum(j, length[:, None, None] - 1) + start[:, None, None]
    return j.long(), w / w.sum(-1, keepdim=True)


def _taps(scale, interpolation):
    """How many taps cover the widest filter of these boxes (scale: source px per output px, CPU (n,)) -> int."""
    return math.ceil(2 * PIL_FILTERS[interpolation][0] * max(1.0, float(scale.max()))) + 2


CANVAS_TILE = 64  # columns per row of the batched crops' table: a crop reads only the tiles under its box


def canvas_table(images, dtype=torch.float32, tile=CANVAS_TILE):
    """A batch (B, C, H, W), uint8 or float, as the table that the batched crops sample from: float (B H T, C tile)
    with T = ceil(W / tile); row (b H + y) T + t holds columns [t tile, (t + 1) tile) of row y of image b (the last
    tile zero-padded). One strided copy; uint8 stays 0..255 (the crops fold the 1/255 into their weights)."""
    B, C, H, W = images.shape
    T = -(-W // tile)
    dtype = torch.promote_types(images.dtype if images.dtype.is_floating_point else dtype, torch.float32)
    padded = images if W == T * tile else F.pad(images, (0, T * tile - W))
    table = torch.empty(B, H, T, C, tile, dtype=dtype, device=images.device)
    return table.copy_(padded.view(B, C, H, T, tile).permute(0, 2, 3, 1, 4)).view(B * H * T, C * tile)


def _cut_per_box(images):
    """Whether crop_resize cuts these images box by box (uint8 on a CPU) rather than as one batch."""
    return images.device.type == "cpu" and images.dtype == torch.uint8


def crop_resize(images, boxes, size, interpolation="bicubic", flip=None, source=None, dtype=torch.float32,
                table=None):
    """Cut boxes out of a batch and resample each to size x size (an int or (h, w)) as torchvision's resized_crop
    does with PIL (crop, then resize: antialiased when shrinking), mirrored where flip is True.

    images: uint8 (B, 3, H, W) (-> values in [0, 1]) or float (same values); boxes: int64 (n, 4: top, left, h, w)
    on the CPU, each inside photo source[i] (default: i) of the batch (a data.Photos canvas: inside its true size);
    flip: bool (n,) or None; table: canvas_table(images), to share it between calls of the batched path.
    -> float (n, 3, h, w), in images' float dtype (at least float32), or `dtype` for uint8 images.

    Two ways, one result (tests/test_augment.py: both equal PIL's to 1 level of uint8):
      - uint8 images on the CPU: torch's own antialiased resampler (F.interpolate(antialias=True), PIL's
        filters in PIL's fixed point, vectorised for uint8 channels-last images) once per box, on a view of the
        box: the fastest a CPU does it, ~4x PIL itself; the loop costs ~20 us per box, against ~0.2-1 ms of work.
      - anything else (a GPU): the whole batch in a fixed handful of kernels (_crop_resize_batched)."""
    n = len(boxes)
    B, C, H, W = images.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    dtype = torch.promote_types(images.dtype if images.dtype.is_floating_point else dtype, torch.float32)
    if n == 0:
        return images.new_empty(0, C, out_h, out_w, dtype=dtype)
    source = torch.arange(n) if source is None else source
    if _cut_per_box(images):
        images = images.contiguous(memory_format=torch.channels_last)  # a no-op for the loader's canvas
        crops = torch.empty(n, out_h, out_w, C, dtype=torch.uint8).permute(0, 3, 1, 2)
        flips = [False] * n if flip is None else flip.tolist()
        for crop, i, (top, left, h, w), mirror in zip(crops, source.tolist(), boxes.tolist(), flips):
            box = images[i:i + 1, :, top:top + h, left:left + w]
            out = F.interpolate(box, (out_h, out_w), mode=interpolation, antialias=True)[0]
            crop.copy_(out.flip(-1) if mirror else out)
        return torch.empty(n, C, out_h, out_w, dtype=dtype).copy_(crops).div_(255)  # -> float in [0, 1]
    return _crop_resize_batched(images, boxes, out_h, out_w, interpolation, flip, source, dtype, table)


def _crop_resize_batched(images, boxes, out_h, out_w, interpolation, flip, source, dtype, table):
    """crop_resize for a whole batch in a fixed handful of kernels, whatever the batch (the GPU's way).

    Separable, as PIL, and each pass a weighted sum of table rows (F.embedding_bag: the gathered rows are never
    materialised, work ~ outputs x taps). Vertical: output row r of crop i, for each of the few column tiles under
    the box, sums the source rows under its filter (resample_taps) -> (n, out_h, tiles, C, tile). That is
    transposed so that each source column of the box is one row, and the horizontal pass sums, for each output
    column, the columns under its filter. The canvas outside a box is never read, and no dense (out_w, W) matrix
    is multiplied. No device sync: every size is known on the CPU."""
    n, (B, C, H, W), device = len(boxes), images.shape, images.device
    table = canvas_table(images, dtype) if table is None else table
    tile = table.shape[1] // C
    T = table.shape[0] // (B * H)                                                 # tiles per canvas row
    top, left, h, w = boxes.to(torch.float64).unbind(1)
    taps_y, taps_x = _taps(h / out_h, interpolation), _taps(w / out_w, interpolation)
    first_tile = boxes[:, 1] // tile
    tiles = int(((boxes[:, 1] + boxes[:, 3] - 1) // tile - first_tile).max()) + 1   # the most any box spans
    params = torch.stack([top, h, left, w, source, first_tile], 1)                  # one copy to the device
    top, h, left, w, source, first_tile = _to_device(params, device).to(dtype).unbind(1)
    source, first_tile = source.long(), first_tile.long()
    iy, wy = resample_taps(top, h, out_h, taps_y, interpolation)                   # (n, out_h, taps_y)
    ix, wx = resample_taps(left, w, out_w, taps_x, interpolation)                  # (n, out_w, taps_x)
    if flip is not None:  # mirrored: output column x takes the taps of column out_w - 1 - x
        flip = _to_device(flip, device)[:, None, None]
        ix, wx = torch.where(flip, ix.flip(1), ix), torch.where(flip, wx.flip(1), wx)
    if not images.dtype.is_floating_point:
        wy = wy / 255  # uint8 -> [0, 1], folded into the weights
    # vertical pass: table row (source H + y) T + t for the `tiles` tiles from first_tile on (clamped at the
    # canvas edge: a tile past it belongs to no box and gets weight 0 in the horizontal pass)
    tile_index = (first_tile[:, None] + torch.arange(tiles, device=device)).clamp(max=T - 1)  # (n, tiles)
    index = (source[:, None, None] * H + iy)[:, :, None, :] * T + tile_index[:, None, :, None]
    weight = wy[:, :, None, :].expand(n, out_h, tiles, taps_y)
    x = F.embedding_bag(index.reshape(-1, taps_y), table, per_sample_weights=weight.reshape(-1, taps_y), mode="sum")
    # (n, out_h, tiles, C, tile) -> one row per source column of the window: (n tiles tile, out_h C)
    x = x.view(n, out_h, tiles, C, tile).permute(0, 2, 4, 1, 3).reshape(n * tiles * tile, out_h * C)
    # horizontal pass: photo column ix is row ix - first_tile tile of crop i's window
    window = tiles * tile
    index = torch.arange(n, device=device)[:, None, None] * window + ix - first_tile[:, None, None] * tile
    x = F.embedding_bag(index.view(-1, taps_x), x, per_sample_weights=wx.reshape(-1, taps_x), mode="sum")
    # (n, out_w, out_h, C) -> (n, C, out_h, out_w); bicubic overshoots at edges and PIL clips too
    return x.view(n, out_w, out_h, C).permute(0, 3, 2, 1).clamp(0, 1).contiguous()


def random_resized_crop(images, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None,
                        interpolation="bicubic", hflip_p=0.0):
    """Inception-style random crop of a batch (a tensor (B, 3, H, W), uint8 or float in [0, 1], or data.Photos)
    -> float (B, 3, size, size): a box of scale*area and aspect ratio in ratio of each photo's own H x W
    (random_crop_params), resampled to size as PIL would; mirrored with probability hflip_p (free: it reverses
    the horizontal weights)."""
    pixels, sizes = photo_batch(images)
    boxes, flip = random_crop_params(sizes, scale, ratio, hflip_p, generator)
    return crop_resize(pixels, boxes, size, interpolation, flip)


def horizontal_flip(images, p=0.5, generator=None):
    """Mirror each image left-right with probability p."""
    return _apply(images, _coin(p, images.shape[0], generator), lambda x: x.flip(-1))


def _grey(x):
    """(n, 3, H, W) -> (n, 1, H, W) luma: one matrix product over the channels (a single read of x)."""
    n, _, H, W = x.shape
    return torch.matmul(_constant(LUMA, x).view(1, 3), x.reshape(n, 3, H * W)).view(n, 1, H, W)


def _adjust_hue(x, shift):
    """torchvision's adjust_hue: RGB -> HSV, hue + shift (turns of the colour circle, mod 1) -> RGB, for x
    (n, 3, H, W) in [0, 1] and shift (n, 1, 1, 1). Computed without forming H, S and V: with v = max(r, g, b),
    m = min(r, g, b), c = v - m (= v s) and the hue in sixths h6 = (g - b) / c if r is the largest, 2 + (b - r) / c
    if g is, else 4 + (r - g) / c, HSV -> RGB gives each channel n = 5, 3, 1 (R, G, B) as
    v - c clamp(min(k, 4 - k), 0, 1) = m + c clamp(|k - 2| - 1, 0, 1), k = (n + h6 + 6 shift) mod 6.
    A grey pixel (c = 0) stays as it is. Written as few whole-tensor passes as it can be, most of them in place."""
    r, g, b = x.unbind(1)
    v, m = x.amax(1), x.amin(1)
    c = v - m
    h6 = torch.where(r == v, g - b, torch.where(g == v, (b - r).add_(c, alpha=2), (r - g).add_(c, alpha=4)))
    h6 = h6.div_(c.clamp(min=1e-12)).add_(6 * shift[:, 0])                                       # (n, H, W)
    k = (h6[:, None] + _constant([5.0, 3.0, 1.0], x).view(1, 3, 1, 1)).remainder_(6)         # (n, 3, H, W)
    # m + c clamp(|k - 2| - 1, 0, 1) = (m - c) + c clamp(|k - 2|, 1, 2): four passes over k
    return torch.addcmul((m - c)[:, None], k.sub_(2).abs_().clamp_(1, 2), c[:, None])


def _brightness(x, f):
    return x.mul_(f).clamp_(0, 1)


def _contrast(x, f):  # blend with the image's mean grey level: mean of the luma = luma . mean colour
    mean = torch.matmul(x.mean((-2, -1)), _constant(LUMA, x)).view(-1, 1, 1, 1)
    return x.mul_(f).add_((1 - f) * mean).clamp_(0, 1)


def _saturation(x, f):  # blend with the grey image
    return torch.lerp(_grey(x).expand_as(x), x, f.expand_as(x), out=x).clamp_(0, 1)  # grey + f (x - grey)


# torchvision's adjust_* on float images: brightness scales, contrast blends with the mean grey level, saturation
# blends with the grey image, each clamped to [0, 1]; hue rotates the HSV hue by a fraction of the circle. The
# first three work in place on x, which color_jitter owns (a copy of its input, or a subset gathered from it).
_JITTER_OPS = (_brightness, _contrast, _saturation, _adjust_hue)


def color_jitter(images, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, p=0.8, generator=None,
                 inplace=False):
    """torchvision's ColorJitter applied with probability p: brightness, contrast and saturation factors
    ~ U(max(0, 1 - a), 1 + a), a hue shift ~ U(-hue, hue) turns of the colour circle, in a random order drawn per
    image (as torchvision draws it per call). Defaults: DINO's values (0.4, 0.4, 0.2, 0.1, p=0.8). inplace: work
    in images itself (a caller that owns it) instead of a copy."""
    B = images.shape[0]
    chosen = _coin(p, B, generator)
    factors = [_uniform(max(0.0, 1 - a), 1 + a, B, generator) for a in (brightness, contrast, saturation)]
    factors.append(_uniform(-hue, hue, B, generator))
    order = torch.rand(B, 4, generator=generator).argsort(1)  # order[i, slot] = the op image i does at slot
    images = images if inplace else images.clone()  # the subsets below are written into it in place
    jitter = _jitter_in_groups if images.device.type == "cpu" else _jitter_in_subsets
    return jitter(images, chosen, torch.stack(factors, 1), order)


def _jitter_in_subsets(images, chosen, factors, order):
    """color_jitter's ops on a GPU, where kernel launches cost more than copies: 16 subsets (the images doing
    op k at slot s), each gathered, changed and written back in a few kernels. images (B, 3, H, W), owned;
    chosen (B,); factors (B, 4); order (B, 4): order[i, slot] = the op image i does at that slot."""
    for slot in range(4):
        for op, fn in enumerate(_JITTER_OPS):
            images = _apply(images, chosen & (order[:, slot] == op), fn, factors[:, op].contiguous(), inplace=True)
    return images


def _jitter_in_order(ops, x, *factors):
    """The jitter ops `ops` (indices into _JITTER_OPS) in that order, in place on x (n, 3, H, W); factors: the
    four (n, 1, 1, 1) factors, one per op."""
    for op in ops:
        out = _JITTER_OPS[op](x, factors[op])
        if out is not x:  # the hue shift makes a new tensor
            x.copy_(out)
    return x


def _jitter_in_groups(images, chosen, factors, order):
    """color_jitter's ops on a CPU, where copies cost more than kernel calls: the chosen images that drew the same
    order form a group, gathered once (_apply), given its four ops in place and written back, instead of gathering
    and scattering 16 subsets. The same result as _jitter_in_subsets (tests/test_augment.py). Arguments as there."""
    group = torch.where(chosen, (order * torch.tensor([64, 16, 4, 1])).sum(1), -1)  # the order as one number
    for key in group.unique().tolist():
        if key >= 0:  # -1: not chosen, left as they are
            ops = [(key >> shift) & 3 for shift in (6, 4, 2, 0)]  # ops (key >> 6) & 3, ..., key & 3, in order
            _apply(images, group == key, functools.partial(_jitter_in_order, ops), *factors.unbind(1), inplace=True)
    return images


def random_grayscale(images, p=0.2, generator=None, inplace=False):
    """Replace each image by its luma (ITU-R 601, copied to the 3 channels) with probability p. inplace: write
    the chosen images into images itself (a caller that owns it), as the functions below."""
    return _apply(images, _coin(p, images.shape[0], generator), lambda x: _grey(x).expand_as(x).contiguous(),
                  inplace=inplace)


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
    # replicate, as PIL's GaussianBlur (what DINO calls): reflect padding mirrored the pixels next to the edge and
    # left the border 9-11 levels of 255 away from PIL's on noise, against ~2.6 with replicate (sigma 1)
    x = F.pad(x.reshape(1, n * C, H, W), pad, mode="replicate")
    return F.conv2d(x, kernel.view(shape), groups=n * C).view(n, C, H, W)  # one group per image channel


# torch's CPU convolution slows down several-fold once the blurred batch outgrows the caches (measured on one core,
# 224 px crops: 0.8 ms a crop two at a time, 5.7 ms in one batch of 64), and is slow for one image alone (1.4 ms):
# on a CPU the chosen images are blurred in chunks of about this many values, at least two images each.
CPU_BLUR_CHUNK = 300_000


def gaussian_blur(images, p=0.5, sigma=(0.1, 2.0), generator=None, inplace=False):
    """Gaussian blur with probability p, sigma ~ U(sigma) per image (DINO's PIL GaussianBlur radius, which is
    sigma): a separable kernel over +-3 sigma_max pixels, one grouped convolution per axis, edge pixels repeated
    beyond the border (replicate padding, as PIL); on a GPU over all the chosen images at once, on a CPU in chunks
    (CPU_BLUR_CHUNK)."""
    B, C, H, W = images.shape
    chosen, sigmas = _coin(p, B, generator), _uniform(sigma[0], sigma[1], B, generator)
    radius = math.ceil(3 * sigma[1])  # a wider kernel only adds ~0 weights; replicate padding allows any side

    def blur(x, s):
        return _blur_along(_blur_along(x, s, radius, -1), s, radius, -2)
    if images.device.type != "cpu":
        return _apply(images, chosen, blur, sigmas, inplace=inplace)
    out = images if inplace else images.clone()
    rows, per_chunk = chosen.nonzero().flatten().tolist(), max(2, CPU_BLUR_CHUNK // (C * H * W))
    for k in range(0, len(rows), per_chunk):
        first, end = rows[k], rows[min(k + per_chunk, len(rows)) - 1] + 1  # images first..end-1: this chunk's
        _apply(out[first:end], chosen[first:end], blur, sigmas[first:end], inplace=True)
    return out


def solarize(images, p=0.2, threshold=0.5, generator=None, inplace=False):
    """With probability p invert the pixels >= threshold (x -> 1 - x): PIL's ImageOps.solarize(img, 128) on
    uint8 images, whose pixels k/255 are >= 0.5 exactly when k >= 128."""
    return _apply(images, _coin(p, images.shape[0], generator), lambda x: torch.where(x >= threshold, 1 - x, x),
                  inplace=inplace)


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
        """The views' colour chain, in place on x (fresh crops that nobody else holds)."""
        x = color_jitter(x, *self.color_jitter, p=self.color_jitter_p, generator=generator, inplace=True)
        x = random_grayscale(x, p=0.2, generator=generator, inplace=True)
        x = gaussian_blur(x, p=blur_p, sigma=self.blur_sigma, generator=generator, inplace=True)
        x = solarize(x, p=solarize_p, generator=generator, inplace=True)
        return normalize(x, inplace=True)

    def _crops(self, pixels, sizes, table, size, scale, number, generator):
        """`number` views of every photo: (number B, 3, size, size), view k of photo b at row k B + b."""
        params = [random_crop_params(sizes, scale, hflip_p=0.5, generator=generator) for _ in range(number)]
        boxes, flip = (torch.cat(p) for p in zip(*params))
        return crop_resize(pixels, boxes, size, flip=flip, source=torch.arange(len(sizes)).repeat(number), table=table)

    def __call__(self, images, generator=None):
        pixels, sizes = photo_batch(images)
        B, n = len(sizes), self.local_crops_number
        # made once for the global and the local crops: channels-last pixels for the CPU's per-box crops (a no-op
        # for the loader's canvas), or the batched crops' table
        table = None
        if _cut_per_box(pixels):
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        elif B:
            table = canvas_table(pixels)
        views = self._crops(pixels, sizes, table, self.global_crop_size, self.global_crops_scale, 2, generator)
        views = [self._photometric(views[:B], 1.0, 0.0, generator), self._photometric(views[B:], 0.1, 0.2, generator)]
        if n > 0:  # the local views share one photometric pass over (n B, 3, L, L)
            local = self._crops(pixels, sizes, table, self.local_crop_size, self.local_crops_scale, n, generator)
            local = self._photometric(local, 0.5, 0.0, generator)
            views += list(local.view(n, B, *local.shape[1:]).unbind(0))
        return views
