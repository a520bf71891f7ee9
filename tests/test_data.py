"""Datasets and loader (minivit/data.py): every source, odd image files, errors and the per-epoch order."""
import io
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image

from minivit.augment import MultiCropAugment, SupervisedAugment, random_crop_params
from minivit.data import Photos, ShapesDataset, build_dataset, build_loader, describe, load_image, load_photo
from minivit.tools import attention_maps


# ---------------------------------------------------------------------------------------------- shapes

def test_shapes_sizes_types_and_balance():
    train, test = build_dataset(None, "train"), build_dataset("shapes", "test")
    assert (len(train), len(test), train.num_classes, len(train.classes)) == (5000, 1000, 10, 10)
    image, label = train[3]
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and isinstance(label, int)
    assert np.bincount(test.targets).tolist() == [100] * 10
    assert describe(train) == "shapes/train: 5000 images, 10 classes, 64x64 px"


def test_shapes_are_deterministic_and_splits_differ():
    a, b = ShapesDataset("train"), ShapesDataset("train")
    assert torch.equal(a[7][0], b[7][0]) and torch.equal(a[7][0], a[7][0])
    assert torch.equal(a.mask(7), b.mask(7))
    assert not torch.equal(a[7][0], ShapesDataset("test")[7][0])
    assert not torch.equal(a[7][0], ShapesDataset("train", seed=1)[7][0])


def test_shapes_masks_are_the_object():
    ds = ShapesDataset("train")
    for i in range(20):
        image, label, mask = ds.render(i)
        assert mask.shape == (64, 64) and mask.dtype == torch.bool
        assert 0.01 < mask.float().mean() < 0.5
        pixels = image.float()
        # inside the mask: one flat colour plus the pixel noise (std 8); just outside: a clearly different colour
        around = F.max_pool2d(mask[None, None].float(), 5, 1, 2)[0, 0].bool() & ~mask
        inside, outside = pixels[:, mask], pixels[:, around]
        assert inside.std(1).max() < 10
        assert (inside.mean(1) - outside.mean(1)).norm() > 60


@pytest.mark.parametrize("data", ["shapes", "shapes_plain", "shapes_mono"])
def test_the_in_memory_shapes_cache_gives_the_rendered_images(data):
    cached, drawn = build_dataset(data, "test", cache=True), build_dataset(data, "test")
    assert cached.source == drawn.source == data and cached.targets == drawn.targets
    for i in (0, 1, 37, 999):
        assert torch.equal(cached.mask(i), drawn.mask(i))  # the mask first: it fills the image too
        assert torch.equal(cached[i][0], drawn[i][0]) and cached[i][1] == drawn[i][1]
        assert torch.equal(cached[i][0], drawn[i][0])      # the second time from memory
    assert cached.cache["drawn"].sum() == 4
    cached.render = None  # from here a drawing would fail: the loader's workers must find the images in memory
    loader = build_loader(cached, 2, shuffle=False, num_workers=2)
    batch, labels = next(iter(loader))
    assert torch.equal(batch, torch.stack([drawn[i][0] for i in range(2)])) and labels.tolist() == drawn.targets[:2]
    cached = build_dataset(data, "test", cache=True)
    list(build_loader(cached, 100, shuffle=False, num_workers=2))  # workers draw ...
    assert cached.cache["drawn"].all()                              # ... into the memory this process sees
    assert all(torch.equal(cached.cache["images"][i], drawn[i][0]) for i in (3, 500, 998))


def test_plain_shapes_are_larger_objects_on_one_colour():
    ds = ShapesDataset("train", look="plain")
    for i in range(10):
        image, _, mask = ds.render(i)
        assert 0.1 < mask.float().mean() < 0.65
        assert image.float()[:, ~mask].std(1).max() < 10  # the background: one colour plus the pixel noise


def test_mono_shapes_are_small_light_grey_objects_on_dark_grey_anywhere():
    ds = build_dataset("shapes_mono", "train")
    assert ds.source == "shapes_mono" and ds.classes == build_dataset("shapes_plain", "train").classes
    centres = []
    for i in range(40):
        image, label, mask = ds.render(i)
        assert label == i % 10 and 0.01 < mask.float().mean() < 0.3
        pixels = image.float()
        inside, outside = pixels[:, mask].mean(1), pixels[:, ~mask].mean(1)
        assert (inside.max() - inside.min()) < 25 and (outside.max() - outside.min()) < 5  # grey under the noise
        assert inside.min() > 140 and outside.max() < 110 and (inside - outside).min() > 60
        assert 25 < pixels[:, ~mask].std(1).min() < 70  # the strong noise (std 64 before clipping at 0 and 255)
        centres.append(torch.nonzero(mask).float().mean(0) / 64)
    centres = torch.stack(centres)
    assert (centres.min(0).values < 0.3).all() and (centres.max(0).values > 0.7).all()  # anywhere, not centred
    with pytest.raises(ValueError, match="look='bright'"):
        ShapesDataset("train", look="bright")


def test_shapes_render_at_any_load_size_with_aligned_masks():
    small, large = ShapesDataset("test", 64), ShapesDataset("test", 128)
    assert large[0][0].shape == (3, 128, 128) and large.mask(0).shape == (128, 128)
    for i in range(5):  # the same object, drawn at twice the resolution
        down = F.avg_pool2d(large.mask(i)[None].float(), 2)[0] > 0.5
        assert (down & small.mask(i)).sum() / (down | small.mask(i)).sum() > 0.85


def test_raw_pixels_are_useless_on_shapes():
    """1-nearest-neighbour on raw pixels: 12.5% with 1000 training images, 15.4% with all 5000 (1000 test
    images; chance is 10%), where a small CNN reaches 56-71%. Keeps the default set hard."""
    train, test = ShapesDataset("train", num_images=1000), ShapesDataset("test", num_images=500)
    x_train = torch.stack([train[i][0] for i in range(len(train))]).flatten(1).float()
    x_test = torch.stack([test[i][0] for i in range(len(test))]).flatten(1).float()
    nearest = torch.cdist(x_test, x_train).argmin(1)
    accuracy = (torch.tensor(train.targets)[nearest] == torch.tensor(test.targets)).float().mean().item()
    assert accuracy < 0.22


# ---------------------------------------------------------------------------------------------- digits

def test_digits_split_is_fixed_and_stratified():
    train, test = build_dataset("digits", "train"), build_dataset("digits", "test")
    assert (len(train), len(test), train.num_classes) == (1437, 360, 10)
    image, _ = test[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert min(np.bincount(test.targets)) >= 35 and max(np.bincount(test.targets)) <= 37
    assert torch.equal(build_dataset("digits", "test")[5][0], test[5][0])
    assert test.images.max() == 255 and test.images.min() == 0
    assert build_dataset("digits", "train", load_size=16)[0][0].shape == (3, 16, 16)


# ---------------------------------------------------------------------------------------------- image folders

def save(path, image, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, **kwargs)


def jpeg_bytes(size=(40, 30)):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
        buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def folder(tmp_path):
    """train/{cat,dog} with 8 readable images of every awkward kind and 2 broken ones; val/dog with 2 images."""
    root = tmp_path / "imagenet"
    cat, dog = root / "train" / "cat", root / "train" / "dog"
    save(str(cat / "rgb.jpg"), Image.new("RGB", (40, 30), (255, 0, 0)))
    save(str(cat / "grey.png"), Image.new("L", (30, 40), 128))
    save(str(cat / "cmyk.JPG"), Image.new("CMYK", (33, 33), (0, 255, 255, 0)))  # red in CMYK
    save(str(cat / "nested" / "alpha.png"), Image.new("RGBA", (20, 20), (0, 0, 255, 40)))
    palette = Image.new("RGB", (16, 16), (0, 255, 0)).convert("P")
    save(str(dog / "palette.png"), palette, transparency=0)
    save(str(dog / "deep.png"), Image.fromarray(np.full((10, 12), 65535, np.uint16)))  # 16-bit grey, white
    save(str(dog / "tiny.bmp"), Image.new("RGB", (5, 7), (10, 20, 30)))
    save(str(dog / "photo.webp"), Image.new("RGB", (50, 20), (0, 0, 0)))
    (dog / "truncated.jpg").write_bytes(jpeg_bytes()[:300])
    (dog / "broken.png").write_bytes(b"not an image at all")
    (dog / "notes.txt").write_text("ignored")
    (dog / ".hidden.jpg").write_bytes(b"ignored")
    save(str(root / "val" / "dog" / "a.jpg"), Image.new("RGB", (64, 48), (0, 0, 255)))
    save(str(root / "val" / "dog" / "b.png"), Image.new("RGB", (48, 64), (0, 0, 255)))
    return str(root)


def test_load_image_converts_every_mode_to_an_rgb_square(folder):
    cat, dog = os.path.join(folder, "train", "cat"), os.path.join(folder, "train", "dog")
    expected = {os.path.join(cat, "rgb.jpg"): (255, 0, 0), os.path.join(cat, "grey.png"): (128, 128, 128),
                os.path.join(cat, "cmyk.JPG"): (255, 0, 0), os.path.join(cat, "nested", "alpha.png"): (0, 0, 255),
                os.path.join(dog, "palette.png"): (0, 255, 0), os.path.join(dog, "deep.png"): (255, 255, 255),
                os.path.join(dog, "tiny.bmp"): (10, 20, 30), os.path.join(dog, "photo.webp"): (0, 0, 0)}
    for path, colour in expected.items():
        image = load_image(path, 24)
        assert image.shape == (3, 24, 24) and image.dtype == torch.uint8, path
        assert (image.float().mean((1, 2)) - torch.tensor(colour)).abs().max() <= 3, path


def test_load_image_keeps_the_centre(tmp_path):
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, 20:40] = (0, 255, 0)  # green centre third of a wide image
    save(str(tmp_path / "wide.png"), Image.fromarray(stripes))
    image = load_image(str(tmp_path / "wide.png"), 10)
    assert (image[1, :, 1:-1] > 250).all() and (image[1] > 200).all() and (image[0] < 5).all()


def test_folder_loader_skips_and_counts_unreadable_files(folder):
    ds = build_dataset(folder, "train", load_size=16)
    assert ds.classes == ["cat", "dog"] and len(ds) == 10 and ds.num_classes == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(build_loader(ds, batch_size=4, shuffle=False, drop_last=False))
    assert sorted(str(w.message).split(":")[0] for w in caught) == [
        f"skipping unreadable image {os.path.join(folder, 'train', 'dog', name)}" for name in
        ("broken.png", "truncated.jpg")]
    labels = torch.cat([y for _, y in batches])
    assert labels.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and labels.dtype == torch.int64
    assert all(x.shape[1:] == (3, 16, 16) and x.dtype == torch.uint8 for x, _ in batches)
    assert ds.num_skipped == 2 and "2 unreadable files skipped" in describe(ds)
    with warnings.catch_warnings(record=True) as caught:  # warned once per file, not every epoch
        warnings.simplefilter("always")
        list(build_loader(ds, batch_size=4, shuffle=False, drop_last=False))
    assert not caught


def test_folder_loader_with_workers_counts_across_processes(folder):
    ds = build_dataset(folder, "train", load_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = sum(len(y) for _, y in build_loader(ds, batch_size=3, shuffle=True, drop_last=False, num_workers=2))
    assert n == 8 and ds.num_skipped == 2
    assert sorted(os.path.basename(p) for p in ds.skipped_files()) == ["broken.png", "truncated.jpg"]


def test_a_batch_of_broken_files_comes_out_empty(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"broken")
    save(str(tmp_path / "a" / "y.png"), Image.new("RGB", (4, 4)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = [tuple(x.shape) for x, _ in build_loader(build_dataset(str(tmp_path), "train", 8), 1, False)]
    assert shapes == [(0, 3, 8, 8), (1, 3, 8, 8)]


def test_a_folder_where_nothing_decodes_is_one_error_naming_it_and_the_count(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "zero.jpg").write_bytes(b"")
    (tmp_path / "a" / "junk.png").write_text("junk")
    (tmp_path / "a" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")
    for min_pixels in (None, 100):  # the evaluation squares and the whole photos of training
        with pytest.raises(ValueError, match=f"^{tmp_path}: none of its 3 image files could be decoded"):
            build_dataset(str(tmp_path), "train", 8, min_pixels=min_pixels)


def test_high_bit_depth_is_scaled_and_bombs_and_float_pixels_are_refused_by_name(tmp_path):
    grey = np.arange(256, dtype=np.uint16).reshape(16, 16) * 257  # 16-bit 0..65535
    Image.fromarray(grey).save(tmp_path / "deep.png")
    Image.fromarray((grey >> 8).astype(np.uint8)).save(tmp_path / "byte.png")
    assert torch.equal(load_image(str(tmp_path / "deep.png"), 16), load_image(str(tmp_path / "byte.png"), 16))
    deep, byte = (attention_maps.load_image(str(tmp_path / name), 16, 8) for name in ("deep.png", "byte.png"))
    assert torch.equal(deep, byte)  # attention maps of the picture, not of a white square
    Image.fromarray(grey.astype(np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(ValueError, match="float.tif: 32-bit float pixels"):
        load_image(str(tmp_path / "float.tif"), 16)
    from test_bad_input import png_header
    for side in (10_000, 20_000):  # Pillow warns above its limit and raises above twice it: both refused here
        (tmp_path / "huge.png").write_bytes(png_header(side, side))
        with pytest.raises(ValueError, match="huge.png has more pixels than Pillow's limit of 89,478,485"):
            load_photo(str(tmp_path / "huge.png"), 100)


def test_num_workers_beyond_the_cores_is_capped_with_a_note(capsys):
    loader = build_loader(ShapesDataset("test", 16, num_images=4), 2, num_workers=1000)
    assert loader.num_workers == len(os.sched_getaffinity(0))
    assert "note: --num_workers 1000 is more than the" in capsys.readouterr().out


def test_whole_photo_loader_skips_and_counts_unreadable_files_and_pads_mixed_sizes(folder):
    ds = build_dataset(folder, "train", min_pixels=10 ** 6)  # whole photos, all smaller: kept at their own size
    assert "whole photos" in describe(ds)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = list(build_loader(ds, batch_size=4, shuffle=False, drop_last=False))
    assert len(caught) == 2 and ds.num_skipped == 2 and "2 unreadable files skipped" in describe(ds)
    photos = batches[0][0]
    assert isinstance(photos, Photos) and photos.pixels.dtype == torch.uint8
    # cat: cmyk.JPG 33x33, grey.png 30x40 (w x h), rgb.jpg 40x30, nested/alpha.png 20x20 -> a 40 x 40 canvas
    assert photos.sizes.tolist() == [[33, 33], [40, 30], [30, 40], [20, 20]] and photos.pixels.shape == (4, 3, 40, 40)
    assert (photos.pixels[2, 0, :30, :40] > 250).all() and (photos.pixels[2, :, 30:] == 0).all()  # red, then padding
    assert sum(len(p) for p, _ in batches) == 8 and len(photos[1:3]) == 2 and photos[2].sizes.tolist() == [[30, 40]]


def test_load_photo_decodes_big_photos_down_to_min_pixels_and_no_further(tmp_path):
    """DINO's recipe needs 96^2 / 0.05 = 184,320 pixels: a 1000 x 750 JPEG is decoded at 1/2 scale through the DCT
    (500 x 375 = 187,500), a 2000 x 1500 PNG averaged 4 x 4; a 400 x 300 photo is kept as it is, never enlarged.
    Then no crop of the recipe has fewer source pixels than output pixels (up to its rounding to whole pixels),
    where the old 256 x 256 square gave local crops of 57 x 57 pixels for 96 x 96 outputs."""
    augment = MultiCropAugment()
    assert augment.min_pixels == 184320 and SupervisedAugment(224).min_pixels == 627200
    rng = np.random.default_rng(0)
    for (w, h), ext, expected in [((1000, 750), "jpg", (375, 500)), ((2000, 1500), "png", (375, 500)),
                                  ((400, 300), "jpg", (300, 400)), ((750, 1000), "jpg", (500, 375))]:
        path = str(tmp_path / f"{w}x{h}.{ext}")
        Image.fromarray(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)).resize((w, h)).save(path)
        photo = load_photo(path, augment.min_pixels)
        assert photo.shape == (3, *expected) and photo.dtype == torch.uint8, path
        assert photo.shape[1] * photo.shape[2] < 4 * augment.min_pixels  # the cap: below 4x what is needed
        if w * h < augment.min_pixels:
            continue
        sizes = torch.tensor([photo.shape[1:]]).expand(4000, 2)
        for side, scale in [(224, augment.global_crops_scale), (96, augment.local_crops_scale)]:
            boxes, _ = random_crop_params(sizes, scale, generator=torch.Generator().manual_seed(0))
            assert (boxes[:, 2] * boxes[:, 3]).min() >= 0.98 * side ** 2, (path, side)
    old = torch.tensor([[256, 256]]).expand(4000, 2)  # the previous centre square
    boxes, _ = random_crop_params(old, augment.local_crops_scale, generator=torch.Generator().manual_seed(0))
    assert (boxes[:, 2] * boxes[:, 3]).float().quantile(0.2) < 96 ** 2  # enlarged local crops


def test_val_folder_is_the_test_split_with_the_train_classes(folder):
    test = build_dataset(folder, "test", load_size=16)
    assert test.classes == ["cat", "dog"] and test.targets == [1, 1] and len(test) == 2


def test_folder_errors_are_one_line_and_name_the_path(tmp_path, folder):
    def error(data, split="train"):
        with pytest.raises(ValueError) as info:
            build_dataset(data, split)
        message = str(info.value)
        assert "\n" not in message
        return message
    assert str(tmp_path / "missing") in error(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    assert "no class folders" in error(str(tmp_path / "empty"))
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    assert "has no" in error(str(tmp_path / "no_images"))
    save(str(tmp_path / "flat" / "x.jpg"), Image.new("RGB", (4, 4)))
    assert "no class folders" in error(str(tmp_path / "flat"))
    assert "no val/ folder" in error(os.path.join(folder, "train"), "test")
    (tmp_path / "only_val" / "val" / "cat").mkdir(parents=True)
    assert "no train/ folder" in error(str(tmp_path / "only_val"))
    assert "split" in error("shapes", "validation")


# ---------------------------------------------------------------------------------------------- CIFAR

def write_pickle(path, entries):
    with open(path, "wb") as f:
        pickle.dump(entries, f)


def cifar_images(n, offset):
    return (np.arange(n * 3072).reshape(n, 3072) + offset).astype(np.uint8)


def test_cifar10_python_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for k in range(1, 6):  # bytes keys, as the official Python 2 pickles load
        write_pickle(folder / f"data_batch_{k}", {b"data": cifar_images(2, k), b"labels": [k, 9 - k]})
    write_pickle(folder / "test_batch", {b"data": cifar_images(3, 0), b"labels": [0, 1, 2]})
    write_pickle(folder / "batches.meta", {b"label_names": [f"class{c}".encode() for c in range(10)]})
    train, test = build_dataset(str(tmp_path), "train"), build_dataset(str(folder), "test")
    assert (len(train), len(test), train.num_classes, train.classes[3]) == (10, 3, 10, "class3")
    assert train.targets == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4] and test.targets == [0, 1, 2]
    image, label = test[1]
    expected = torch.from_numpy(cifar_images(3, 0)[1].reshape(3, 32, 32))  # R plane, G plane, B plane; row-major
    assert torch.equal(image, expected) and label == 1 and describe(test).startswith("cifar10/test: 3 images")
    assert build_dataset(str(folder), "test", load_size=48)[0][0].shape == (3, 48, 48)


def test_cifar100_python_folder(tmp_path):
    write_pickle(tmp_path / "train", {"data": cifar_images(4, 0), "fine_labels": [0, 99, 5, 5],
                                      "coarse_labels": [0, 19, 1, 1]})
    write_pickle(tmp_path / "test", {"data": cifar_images(2, 7), "fine_labels": [3, 4], "coarse_labels": [0, 0]})
    write_pickle(tmp_path / "meta", {"fine_label_names": [f"c{c}" for c in range(100)]})
    train, test = build_dataset(str(tmp_path), "train"), build_dataset(str(tmp_path), "test")
    assert (len(train), len(test), train.num_classes) == (4, 2, 100) and train.targets == [0, 99, 5, 5]
    assert torch.equal(test[0][0], torch.from_numpy(cifar_images(2, 7)[0].reshape(3, 32, 32)))


# ---------------------------------------------------------------------------------------------- loader order

def epoch_labels(loader, epoch):
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader])


def test_order_is_fixed_by_seed_and_epoch():
    ds = build_dataset("digits", "test")
    a, b = build_loader(ds, 50, seed=0), build_loader(ds, 50, seed=0)
    first = epoch_labels(a, 0)
    assert len(first) == 350  # 360 images, drop_last
    assert torch.equal(epoch_labels(b, 0), first)  # a resumed run sees the same batches
    assert torch.equal(epoch_labels(b, 3), epoch_labels(a, 3))
    assert not torch.equal(epoch_labels(a, 1), first)
    assert not torch.equal(epoch_labels(build_loader(ds, 50, seed=1), 0), first)
    images, labels = next(iter(a))
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    whole = epoch_labels(build_loader(ds, 64, shuffle=True, drop_last=False), 2)
    assert sorted(whole.tolist()) == sorted(ds.targets)  # every image once per epoch
    in_order = epoch_labels(build_loader(ds, 64, shuffle=False, drop_last=False), 5)
    assert in_order.tolist() == ds.targets


def test_distributed_loader_with_one_process_matches_the_plain_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        ds = build_dataset("digits", "test")
        assert torch.equal(epoch_labels(build_loader(ds, 32, distributed=True, seed=4), 2),
                           epoch_labels(build_loader(ds, 32, seed=4), 2))
    finally:
        dist.destroy_process_group()


def test_batch_larger_than_the_dataset_is_an_error():
    with pytest.raises(ValueError, match="batch_size=400"):
        build_loader(build_dataset("digits", "test"), 400)
