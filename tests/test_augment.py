"""Batched augmentations (minivit/augment.py) against PIL and colorsys as references, plus their invariants."""
import colorsys
import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

import torch.nn.functional as F

from minivit import augment
from minivit.augment import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, MultiCropAugment, SupervisedAugment,
                             color_jitter, crop_resize, gaussian_blur, horizontal_flip, normalize, random_grayscale,
                             random_crop_params, random_resized_crop, sample_crop_boxes, solarize, to_float)
from bench.bench import official_crop_box
from minivit.data import Photos, build_dataset, build_loader
from minivit.tools.photo_folder import photo

dtypes = st.sampled_from([torch.float32, torch.float64])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(B=3, H=24, W=20, dtype=torch.float32, seed=0):
    return torch.rand(B, 3, H, W, generator=gen(seed), dtype=dtype)


def smooth_uint8(H=32, W=40, seed=0):
    """A photo-like uint8 image (H, W, 3): smooth colour gradients, so resampling differences stay small."""
    low = torch.randint(0, 256, (1, 3, 4, 4), generator=gen(seed)).float()
    up = torch.nn.functional.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)
    return up[0].permute(1, 2, 0).round().to(torch.uint8).numpy()


def to_batch(array):  # (H, W, 3) uint8 -> (1, 3, H, W) float in [0, 1]
    return torch.from_numpy(np.asarray(array).copy()).permute(2, 0, 1)[None].double() / 255


def test_to_float_and_normalize():
    x = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 3, 1, 1)
    assert torch.equal(to_float(x).flatten(), torch.tensor([0.0, 1.0, 0.2]))
    with pytest.raises(ValueError, match="uint8"):
        to_float(x.float())
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1).expand(2, 3, 4, 4)
    assert torch.allclose(normalize(mean), torch.zeros(2, 3, 4, 4), atol=1e-6)
    one_std_up = mean + torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert torch.allclose(normalize(one_std_up), torch.ones(2, 3, 4, 4), atol=1e-6)


@given(B=st.integers(1, 4), H=st.integers(1, 40), W=st.integers(1, 40), size=st.integers(1, 24),
       interpolation=st.sampled_from(["bicubic", "bilinear"]), dtype=dtypes, seed=st.integers(0, 99))
def test_random_resized_crop_shape_range_dtype(B, H, W, size, interpolation, dtype, seed):
    x = images(B, H, W, dtype, seed)
    y = random_resized_crop(x, size, generator=gen(seed), interpolation=interpolation, hflip_p=0.5)
    assert y.shape == (B, 3, size, size) and y.dtype == dtype
    assert y.min() >= 0 and y.max() <= 1


@given(H=st.integers(1, 300), W=st.integers(1, 300), seed=st.integers(0, 99),
       scale=st.sampled_from([(0.08, 1.0), (0.4, 1.0), (0.05, 0.4), (0.3, 0.3)]))
def test_crop_boxes_inside_image_with_area_and_ratio_in_range(H, W, seed, scale):
    boxes = sample_crop_boxes(64, H, W, scale, generator=gen(seed))
    top, left, h, w = boxes.unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= H).all() and (left + w <= W).all()
    if min(H, W) >= 64:  # pixel rounding is then small against the box sides
        area = (h * w).double() / (H * W)
        fallback = ((h == H) | (w == W)) & ((area > scale[1] + 0.03) | (area < scale[0] - 0.03))
        ok = ~fallback
        assert (area[ok] >= scale[0] * 0.95 - 0.01).all() and (area[ok] <= scale[1] * 1.05 + 0.01).all()
        aspect = w[ok].double() / h[ok]
        assert (aspect > 3 / 4 * 0.9).all() and (aspect < 4 / 3 * 1.1).all()


@pytest.mark.parametrize("size, scale", [(224, (0.4, 1.0)), (96, (0.05, 0.4))])
def test_dino_crop_areas_fall_in_their_scale_ranges(size, scale):
    boxes = sample_crop_boxes(4000, 256, 256, scale, generator=gen(1))
    area = (boxes[:, 2] * boxes[:, 3]).double() / 256 ** 2
    assert area.min() >= scale[0] - 0.005 and area.max() <= scale[1] + 0.005
    assert area.min() < scale[0] + 0.02 and area.max() > scale[1] - 0.02  # the whole range is used


def test_crop_fallback_is_torchvisions_central_crop():
    # a full-area box with aspect ratio >= 2 never fits a square: the central crop cut to ratio 2 (w = 2 h)
    boxes = sample_crop_boxes(5, 40, 40, scale=(1.0, 1.0), ratio=(2.0, 3.0), generator=gen())
    assert torch.equal(boxes, torch.tensor([[10, 0, 20, 40]] * 5))


@given(H=st.integers(2, 30), dtype=dtypes, interpolation=st.sampled_from(["bicubic", "bilinear"]))
def test_full_crop_at_the_same_size_is_identity_and_flip_mirrors(H, dtype, interpolation):
    x = images(2, H, H, dtype)
    y = random_resized_crop(x, H, scale=(1, 1), ratio=(1, 1), generator=gen(), interpolation=interpolation)
    assert torch.allclose(y, x, atol=1e-5)
    full = torch.tensor([[0, 0, H, H]] * 2)
    flipped = crop_resize(x, full, H, interpolation, flip=torch.tensor([True, False]))
    assert torch.allclose(flipped[0], x[0].flip(-1), atol=1e-5) and torch.allclose(flipped[1], x[1], atol=1e-5)


def test_crop_resize_matches_pil_bilinear_upscaling():
    array = smooth_uint8(32, 40)
    top, left, h, w, size = 5, 7, 17, 21, 48  # upscaling, where PIL's resize needs no antialiasing filter
    expected = Image.fromarray(array).crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    ours = crop_resize(to_batch(array), torch.tensor([[top, left, h, w]]), size, "bilinear")
    assert (ours - to_batch(expected)).abs().max() < 2.5 / 255


def test_crop_resize_on_non_square_input_and_output():
    x = images(2, 30, 50)
    y = crop_resize(x, torch.tensor([[0, 10, 30, 30], [5, 0, 20, 50]]), (12, 20), "bilinear")
    assert y.shape == (2, 3, 12, 20)
    assert torch.allclose(y[0].mean(), x[0, :, :, 10:40].mean(), atol=0.03)


@given(B=st.integers(1, 6), dtype=dtypes, seed=st.integers(0, 99))
def test_flip_twice_is_identity_and_probabilities_are_exact_at_0_and_1(B, dtype, seed):
    x = images(B, 5, 7, dtype, seed)
    assert torch.equal(horizontal_flip(horizontal_flip(x, 1.0, gen(seed)), 1.0, gen(seed)), x)
    assert torch.equal(horizontal_flip(x, 1.0, gen(seed)), x.flip(-1))
    for fn in (horizontal_flip, color_jitter, random_grayscale, gaussian_blur, solarize):
        assert torch.equal(fn(x, p=0.0, generator=gen(seed)), x)


def test_flip_with_a_seed_mirrors_the_chosen_images_only():
    x = images(200, 4, 6)
    y = horizontal_flip(x, 0.5, gen(3))
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    kept = (y == x).flatten(1).all(1)
    assert (flipped ^ kept).all() and 70 < flipped.sum() < 130


@pytest.mark.parametrize("op, factor, pil", [
    (0, 1.3, ImageEnhance.Brightness), (0, 0.6, ImageEnhance.Brightness),
    (1, 1.4, ImageEnhance.Contrast), (1, 0.6, ImageEnhance.Contrast),
    (2, 1.2, ImageEnhance.Color), (2, 0.8, ImageEnhance.Color)])
def test_brightness_contrast_saturation_match_pil(op, factor, pil):
    array = smooth_uint8()
    expected = to_batch(pil(Image.fromarray(array)).enhance(factor))
    ours = augment._JITTER_OPS[op](to_batch(array), torch.tensor(factor).double().view(1, 1, 1, 1))
    assert (ours - expected).abs().max() < 2.5 / 255  # PIL rounds to uint8 (and the mean grey level for contrast)


@pytest.mark.parametrize("shift", [0.1, -0.07, 0.5])
def test_hue_shift_matches_colorsys(shift):
    x = images(1, 6, 5, torch.float64)
    x[0, :, 0, 0] = torch.tensor([0.5, 0.5, 0.5], dtype=torch.float64)  # grey: no hue
    x[0, :, 0, 1] = torch.tensor([0.0, 0.0, 0.0], dtype=torch.float64)  # black
    ours = augment._adjust_hue(x, torch.tensor(shift).double().view(1, 1, 1, 1))
    expected = torch.empty_like(x)
    for i in range(6):
        for j in range(5):
            h, s, v = colorsys.rgb_to_hsv(*x[0, :, i, j].tolist())
            expected[0, :, i, j] = torch.tensor(colorsys.hsv_to_rgb((h + shift) % 1, s, v))
    assert torch.allclose(ours, expected, atol=1e-9)


@given(B=st.integers(1, 8), H=st.integers(1, 12), W=st.integers(1, 12), dtype=dtypes, seed=st.integers(0, 99))
def test_color_jitter_stays_in_range_and_is_identity_without_strength(B, H, W, dtype, seed):
    x = images(B, H, W, dtype, seed)
    y = color_jitter(x, generator=gen(seed), p=1.0)
    assert y.shape == x.shape and y.dtype == dtype and y.min() >= 0 and y.max() <= 1
    same = color_jitter(x, brightness=0, contrast=0, saturation=0, hue=0, p=1.0, generator=gen(seed))
    assert torch.allclose(same, x, atol=1e-5)  # factor 1 for each op; hue 0 round-trips through HSV


@given(B=st.integers(1, 40), seed=st.integers(0, 99))
def test_color_jitter_in_groups_equals_in_subsets(B, seed):
    """The CPU's way (images of one op order as one slice) and the GPU's (16 per-op subsets) are the same ops."""
    x = images(B, 6, 5, torch.float64, seed)
    g = gen(seed)
    chosen, factors, order = torch.rand(B, generator=g) < 0.8, torch.rand(B, 4, generator=g) * 0.4 + 0.8, \
        torch.rand(B, 4, generator=g).argsort(1)
    grouped = augment._jitter_in_groups(x.clone(), chosen, factors.double(), order)
    subsets = augment._jitter_in_subsets(x.clone(), chosen, factors.double(), order)
    assert torch.allclose(grouped, subsets, atol=1e-12)
    assert torch.equal(grouped, x) == (not chosen.any())


def test_the_colour_ops_leave_their_input_alone_unless_told():
    """inplace=False (the default) returns new images; MultiCropAugment passes inplace=True for its fresh crops."""
    x = images(6, 8, 8, torch.float32, 1)
    before = x.clone()
    for fn in (color_jitter, random_grayscale, gaussian_blur, solarize):
        assert not torch.equal(fn(x, p=1.0, generator=gen()), before)
        assert torch.equal(x, before), fn.__name__
    assert not torch.equal(normalize(x), before) and torch.equal(x, before)
    assert torch.allclose(normalize(x.clone(), inplace=True), normalize(x), atol=1e-6)  # x / std vs x * (1 / std)
    grey = random_grayscale(x.clone(), p=1.0, generator=gen(), inplace=True)  # every image chosen: written back
    assert torch.equal(grey, random_grayscale(x, p=1.0, generator=gen())) and grey.is_contiguous()
    normalize(grey, inplace=True)  # an expanded (shared-memory) result would refuse this


def test_color_jitter_draws_per_image_factors():
    x = images(1, 8, 8).expand(16, -1, -1, -1)
    y = color_jitter(x, p=1.0, generator=gen())
    assert len({tuple(v) for v in y.mean((2, 3)).mul(1e4).round().tolist()}) == 16


def test_grayscale_has_equal_channels_and_matches_pil():
    array = smooth_uint8()
    y = random_grayscale(to_batch(array), p=1.0, generator=gen())
    assert torch.equal(y[:, 0], y[:, 1]) and torch.equal(y[:, 1], y[:, 2])
    expected = torch.from_numpy(np.array(Image.fromarray(array).convert("L"))).double() / 255
    assert (y[0, 0] - expected).abs().max() < 1 / 255


@given(H=st.integers(1, 30), W=st.integers(1, 30), dtype=dtypes, seed=st.integers(0, 99))
def test_blur_keeps_shape_range_and_constants(H, W, dtype, seed):
    x = images(3, H, W, dtype, seed)
    y = gaussian_blur(x, p=1.0, generator=gen(seed))
    assert y.shape == x.shape and y.dtype == dtype and y.min() >= -1e-6 and y.max() <= 1 + 1e-6
    constant = torch.full((2, 3, H, W), 0.3, dtype=dtype)
    assert torch.allclose(gaussian_blur(constant, p=1.0, generator=gen(seed)), constant, atol=1e-5)


def test_blur_preserves_the_mean_and_smooths():
    x = images(4, 48, 48)
    y = gaussian_blur(x, p=1.0, sigma=(1.0, 2.0), generator=gen())
    assert torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=3e-3)
    assert (y.std((1, 2, 3)) < 0.5 * x.std((1, 2, 3))).all()


def test_cpu_blur_in_chunks_equals_one_batch(monkeypatch):
    """On a CPU the chosen images are blurred a few at a time (CPU_BLUR_CHUNK values): the result of one batch,
    with the images left out untouched."""
    x = images(23, 20, 20, torch.float32, 3)
    chosen = augment._coin(0.6, 23, gen(5))  # the draws gaussian_blur makes first
    one_batch = gaussian_blur(x, p=0.6, generator=gen(5))  # 23 x 1200 values: one chunk
    monkeypatch.setattr(augment, "CPU_BLUR_CHUNK", 3 * 1200)  # 3 images a chunk: 5 chunks, most with gaps
    chunked = gaussian_blur(x, p=0.6, generator=gen(5))
    torch.testing.assert_close(chunked, one_batch, rtol=0, atol=1e-6)
    assert torch.equal(chunked[~chosen], x[~chosen]) and not torch.equal(chunked[chosen], x[chosen])


@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_blur_matches_pil_gaussian_blur(sigma):
    array = (smooth_uint8(40, 40).astype(np.float64) + np.random.default_rng(0).uniform(-40, 40, (40, 40, 3)))
    array = array.clip(0, 255).astype(np.uint8)
    expected = to_batch(Image.fromarray(array).filter(ImageFilter.GaussianBlur(sigma)))
    ours = gaussian_blur(to_batch(array), p=1.0, sigma=(sigma, sigma), generator=gen())
    inner = (slice(None), slice(None), slice(6, -6), slice(6, -6))  # PIL pads differently at the border
    assert (ours - expected)[inner].abs().mean() < 1.5 / 255  # PIL approximates the Gaussian by box blurs


def test_solarize_matches_pil_and_is_identity_above_one():
    array = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, 2)
    expected = to_batch(ImageOps.solarize(Image.fromarray(array), threshold=128))
    assert torch.allclose(solarize(to_batch(array), p=1.0, generator=gen()), expected, rtol=0, atol=1e-12)
    x = images()
    assert torch.equal(solarize(x, p=1.0, threshold=1.01, generator=gen()), x)


def test_supervised_and_eval_views():
    x = torch.randint(0, 256, (3, 3, 40, 56), dtype=torch.uint8, generator=gen())
    assert SupervisedAugment(32)(x, gen()).shape == (3, 3, 32, 32)
    assert EvalTransform(32)(x).shape == (3, 3, 32, 32)
    square = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8, generator=gen())
    # resize 256 + centre crop 224 of a 256 square is a plain centre crop
    expected = normalize(to_float(square)[..., 16:240, 16:240])
    assert torch.allclose(EvalTransform(224, resize=256)(square), expected)
    with pytest.raises(ValueError, match="resize"):
        EvalTransform(224, resize=200)


def test_eval_resize_keeps_the_centre():
    x = torch.zeros(1, 3, 30, 90, dtype=torch.uint8)
    x[..., 30:60] = 255  # a white centre third
    y = EvalTransform(10)(x) * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    assert y.shape == (1, 3, 10, 10) and y[..., 1:-1].min() > 0.99 and y.min() > 0.9  # antialiasing softens edges


def test_multicrop_default_recipe_is_dinos():
    m = MultiCropAugment()
    assert (m.global_crop_size, m.local_crop_size, m.local_crops_number) == (224, 96, 8)
    assert m.global_crops_scale == (0.4, 1.0) and m.local_crops_scale == (0.05, 0.4)
    assert m.blur_sigma == pytest.approx((0.1, 2.0))


def test_multicrop_views_shapes_and_per_view_probabilities(monkeypatch):
    calls = []
    for name in ("random_crop_params", "color_jitter", "random_grayscale", "gaussian_blur", "solarize"):
        original = getattr(augment, name)

        def spy(x, *args, _name=name, _original=original, **kwargs):
            calls.append((_name, args, {k: v for k, v in kwargs.items() if k != "generator"}))
            return _original(x, *args, **kwargs)
        monkeypatch.setattr(augment, name, spy)
    x = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8, generator=gen())
    views = MultiCropAugment(24, 12, local_crops_number=3)(x, gen())
    assert [tuple(v.shape) for v in views] == [(3, 3, 24, 24)] * 2 + [(3, 3, 12, 12)] * 3
    crops = [(args[0], kw["hflip_p"]) for name, args, kw in calls if name == "random_crop_params"]  # scale
    assert crops == [((0.4, 1.0), 0.5)] * 2 + [((0.05, 0.4), 0.5)] * 3
    p = {name: [kw["p"] for n, _, kw in calls if n == name] for name in ("gaussian_blur", "solarize")}
    assert p == {"gaussian_blur": [1.0, 0.1, 0.5], "solarize": [0.0, 0.2, 0.0]}  # global 1, global 2, locals
    sigmas = [kw["sigma"] for name, _, kw in calls if name == "gaussian_blur"]
    assert sigmas == [pytest.approx((0.1 * 24 / 224, 2.0 * 24 / 224))] * 3  # DINO's 0.1-2 px at 224, scaled
    jitter = [(args, kw) for name, args, kw in calls if name == "color_jitter"]
    assert jitter == [((0.4, 0.4, 0.2, 0.1), {"p": 0.8, "inplace": True})] * 3  # on the fresh crops
    assert [kw["p"] for name, _, kw in calls if name == "random_grayscale"] == [0.2] * 3


def test_multicrop_is_reproducible_and_seed_dependent():
    x = torch.randint(0, 256, (4, 3, 48, 36), dtype=torch.uint8, generator=gen())
    m = MultiCropAugment(32, 16, local_crops_number=2)
    a, b, c = m(x, gen(5)), m(x, gen(5)), m(x, gen(6))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, c))
    assert all(v.dtype == torch.float32 for v in a)
    assert a[0].min() < -1 and a[0].max() > 1  # normalised, no longer in [0, 1]


def test_empty_batch_passes_through():
    empty = torch.empty(0, 3, 32, 32, dtype=torch.uint8)
    views = MultiCropAugment(16, 8, 2)(empty, gen())
    assert [tuple(v.shape) for v in views] == [(0, 3, 16, 16)] * 2 + [(0, 3, 8, 8)] * 2
    assert SupervisedAugment(16)(empty, gen()).shape == (0, 3, 16, 16)


# ------------------------------------------------------------------------------ crops from whole photos (issue 12)

def photo_array(w, h, seed=0):
    """(h, w, 3) uint8 with photo-like detail (minivit.tools.photo_folder): grain and edges, not smooth gradients."""
    return np.asarray(photo(seed, 0, (w, h)))


def pil_crop_resize(array, box, size):
    """The official crop: torchvision's resized_crop on a PIL image (crop the box, then resize it, bicubic)."""
    top, left, h, w = box
    return Image.fromarray(array).crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)


def pil_two_pass(array, box, size):
    """PIL's bicubic resize of box (top, left, h, w) rebuilt from our coefficients in float64, with PIL's own
    rounding and clipping to uint8 between its horizontal and vertical passes -> float (size, size, 3) in 0..255."""
    top, left, h, w = box
    H, W = array.shape[:2]

    def weights(start, length, in_size):  # (size, in_size): the taps scattered into a dense matrix
        t = lambda v: torch.tensor([float(v)], dtype=torch.float64)  # noqa: E731
        index, weight = augment.resample_taps(t(start), t(length), size, 2 * length + 8)
        return torch.zeros(size, in_size, dtype=torch.float64).scatter_add_(1, index[0], weight[0]).numpy()
    rows = np.einsum("hwc,ow->hoc", array.astype(np.float64), weights(left, w, W)).round().clip(0, 255)
    return np.einsum("ph,hoc->poc", weights(top, h, H), rows)


BOXES = [((10, 20, 70, 90), 32), ((0, 0, 90, 120), 40), ((33, 51, 57, 69), 24), ((5, 7, 12, 9), 30),
         ((60, 90, 30, 30), 30)]  # shrinking 2-3x, whole photo, touching the far edges, enlarging, scale 1


@pytest.mark.parametrize("box, size", BOXES)
def test_resample_weights_are_pils_coefficients(box, size):
    """Our coefficients with PIL's uint8 rounding between passes give PIL's result to 1 level (its fixed point)."""
    array = photo_array(120, 90)
    top, left, h, w = box
    expected = np.asarray(pil_crop_resize(array, box, size)).astype(np.float64)
    assert np.abs(pil_two_pass(array, box, size).round().clip(0, 255) - expected).max() <= 1


@pytest.mark.parametrize("box, size", BOXES)
def test_crops_match_pils_antialiased_bicubic_resize(box, size):
    """The tolerance, and why. uint8 photos on the CPU (torch's own antialiased resampler, in PIL's fixed point)
    give PIL's crop-then-resize to 1 level. The batched path (float, the GPU's) differs by < 0.5 levels on average
    and < 8 levels (3%) at worst, only where PIL clipped its uint8 intermediate (bicubic overshoot at grain and
    edges) -- the test above pins the coefficients themselves. Without antialiasing (grid_sample, what the crops
    used before) a 2-3x shrink is off by several times more on average."""
    array = photo_array(120, 90)
    top, left, h, w = box
    expected = to_batch(pil_crop_resize(array, box, size))
    photo = torch.from_numpy(array.copy()).permute(2, 0, 1)[None]
    per_box = crop_resize(photo, torch.tensor([box]), size)                # uint8 on the CPU
    assert ((per_box.double() - expected).abs() * 255).max() < 1.001  # 1 level (+ float32 rounding of k / 255)
    batched = crop_resize(photo.double() / 255, torch.tensor([box]), size)  # float: the batched path
    error = (batched - expected).abs() * 255
    assert error.mean() < 0.5 and error.max() < 8
    if h / size > 2:  # shrinking: the old grid_sample crop aliases
        theta = torch.tensor([[[w / 120, 0, (2 * left + w) / 120 - 1], [0, h / 90, (2 * top + h) / 90 - 1]]])
        grid = F.affine_grid(theta.double(), [1, 3, size, size], align_corners=False)
        aliased = F.grid_sample(to_batch(array), grid, mode="bicubic", align_corners=False).clamp(0, 1)
        assert (aliased - expected).abs().mean() * 255 > 3 * error.mean()


def test_shrinking_a_fine_pattern_gives_its_average():
    checker = (torch.arange(96)[:, None] + torch.arange(96)) % 2 * 255  # 1-px checkerboard, mean 127.5
    images = checker.to(torch.uint8).expand(1, 3, 96, 96)
    out = crop_resize(images, torch.tensor([[0, 0, 96, 96]]), 32)  # 3x smaller: nothing of the pattern survives
    assert (out - 0.5).abs().max() < 0.02


def bordered_photos(n):
    """n photos alternating 60 x 40 (a red band in its 4 left columns) and 40 x 60 (red in its 4 top rows), grey
    elsewhere: the parts that the old centre square cut away."""
    wide, tall = torch.full((3, 40, 60), 128, dtype=torch.uint8), torch.full((3, 60, 40), 128, dtype=torch.uint8)
    wide[:, :, :4], tall[:, :4] = torch.tensor([255, 0, 0]).view(3, 1, 1), torch.tensor([255, 0, 0]).view(3, 1, 1)
    return Photos.stack([wide, tall] * (n // 2))


def test_crops_see_the_whole_photo_at_the_official_rate():
    """A local crop shows the red border band as often as torchvision's rule over the whole photo says (official
    rule written in plain Python in bench/bench.py), for a wide and a tall photo in one batch."""
    photos = bordered_photos(800)
    crops = random_resized_crop(photos, 8, (0.05, 0.4), generator=gen(), hflip_p=0.5)  # (800, 3, 8, 8)
    red = ((crops[:, 0] - crops[:, 1]) > 0.3).flatten(1).any(1)
    rng = random.Random(0)
    for k, (w, h) in enumerate([(60, 40), (40, 60)]):
        boxes = [official_crop_box(w, h, (0.05, 0.4), rng) for _ in range(4000)]
        official = np.mean([(left if w > h else top) < 4 for left, top, _, _ in boxes])
        assert official > 0.08  # ~11%: what the old 40 x 40 centre square never showed
        assert abs(red[k::2].float().mean().item() - official) < 0.06, (w, h)


def test_batched_crops_of_mixed_sizes_equal_each_photo_alone():
    """One crop_resize over a padded canvas of photos of different sizes and orientations == each photo cropped on
    its own; the padding (here poisoned with 255) never reaches a crop."""
    photos = [torch.from_numpy(photo_array(w, h, seed=k).copy()).permute(2, 0, 1) for k, (w, h) in
              enumerate([(50, 30), (30, 50), (23, 17), (41, 41)])]
    batch = Photos.stack(photos)
    for i, image in enumerate(photos):
        batch.pixels[i, :, image.shape[1]:], batch.pixels[i, :, :, image.shape[2]:] = 255, 255
    boxes, flip = random_crop_params(batch.sizes.repeat(3, 1), (0.05, 1.0), hflip_p=0.5, generator=gen(2))
    ours = crop_resize(batch.pixels, boxes, 12, flip=flip, source=torch.arange(4).repeat(3))
    for k in range(12):
        alone = crop_resize(photos[k % 4][None], boxes[k:k + 1], 12, flip=flip[k:k + 1])
        assert torch.allclose(ours[k], alone[0], atol=1e-5), k
    views = MultiCropAugment(24, 12, local_crops_number=2)(batch, gen())
    assert [tuple(v.shape) for v in views] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 2


def test_same_seed_same_crops_on_cpu_and_device():
    """Every random choice is drawn on the CPU from the photos' sizes and the generator, so any device makes the
    same views: each available device against the float64 CPU computation (a GPU machine runs this test for cuda
    too). Float photos take the batched path everywhere: equal to float32 rounding. uint8 photos take the per-box
    path on the CPU: equal within the crops' tolerance against PIL (test above: < 0.5 levels on average, < 8 at
    worst), here after the jitter and the normalisation (x 1 / (0.225 * 255) per level)."""
    batch = Photos.stack([torch.from_numpy(photo_array(w, h, seed=k).copy()).permute(2, 0, 1)
                          for k, (w, h) in enumerate([(50, 30), (30, 50), (40, 40)])])
    m = MultiCropAugment(24, 12, local_crops_number=2)
    reference = m(Photos(batch.pixels.double() / 255, batch.sizes), gen(7))
    level = 1 / (0.225 * 255)
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        floats = m(Photos(batch.pixels.float() / 255, batch.sizes).to(device), gen(7))
        views = m(batch.to(device), gen(7))
        assert all(v.device.type == device and v.dtype == torch.float32 for v in floats + views)
        assert max((v.cpu().double() - r).abs().max().item() for v, r in zip(floats, reference)) < 1e-3, device
        errors = [(v.cpu().double() - r).abs() for v, r in zip(views, reference)]
        assert max(e.mean().item() for e in errors) < 0.5 * level, device
        assert max(e.max().item() for e in errors) < 8 * level, device


def test_photo_batches_and_their_crops_replay_exactly_for_resume(tmp_path):
    """What --resume relies on, for a folder of whole photos: the loader's batches depend on (seed, epoch) only and
    the crops on the generator's seed only, so a resumed run sees exactly the views of an uninterrupted one."""
    for k, (w, h) in enumerate([(50, 30), (30, 50), (23, 17), (41, 41), (64, 20), (20, 64)]):
        os.makedirs(tmp_path / f"c{k % 2}", exist_ok=True)
        photo(0, k, (w, h)).save(tmp_path / f"c{k % 2}" / f"{k}.jpg", quality=90)
    m = MultiCropAugment(16, 8, local_crops_number=2)
    dataset = build_dataset(str(tmp_path), "train", min_pixels=m.min_pixels)

    def epoch_views(epoch):
        loader = build_loader(dataset, 3, shuffle=True, seed=1)
        loader.set_epoch(epoch)
        return [m(images, gen(100 * epoch + it)) for it, (images, _) in enumerate(loader)]
    first, again, other = epoch_views(1), epoch_views(1), epoch_views(2)
    assert all(torch.equal(u, v) for a, b in zip(first, again) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for a, b in zip(first, other) for u, v in zip(a, b))
