"""Evaluation tools: weighted k-NN, linear probe, attention maps (DINO sec. 4), and their command lines."""
import math

import pytest
import torch
from hypothesis import given, strategies as st
from torch import nn

from minivit.tools.attention_maps import (cls_attention_maps, load_image, mass_threshold_masks, save_attention_figure,
                                    upsample)
from minivit.models import load_backbone
from minivit.tools.knn import extract_features, knn_classifier
from minivit.tools.linear import (LinearClassifier, dino_probe_recipe, evaluate, feature_dim, image_batches, make_optimizer,
                            probe_features, tensor_batches, train_one_epoch)

pytestmark = pytest.mark.usefixtures("reference_kernels")


def unit(*angles):
    """Points on the unit circle at the given angles (radians): (n, 2) float32."""
    a = torch.tensor(angles, dtype=torch.float32)
    return torch.stack([a.cos(), a.sin()], dim=1)


# ---------------------------------------------------------------------------------------------------- k-NN
def knn_reference(train_f, train_y, test_f, k, T, num_classes):
    """Straightforward per-sample weighted k-NN: returns the predicted class of each test row."""
    preds = []
    for f in test_f:
        sims = train_f @ f
        order = sims.argsort(descending=True)[:k]
        votes = [0.0] * num_classes
        for i in order.tolist():
            votes[train_y[i]] += math.exp(sims[i].item() / T)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return torch.tensor(preds)


def test_knn_weights_decide_the_vote():
    # one class-0 neighbour right on the test point (sim 1) against two class-1 neighbours at sim 0.5:
    # a plain majority of 3 says 1, the exp(sim / 0.07) weights say 0 (exp(14.3) >> 2 exp(7.1)).
    train = unit(0.0, math.acos(0.5), -math.acos(0.5), math.pi)
    labels = torch.tensor([0, 1, 1, 0])
    test, test_labels = unit(0.0), torch.tensor([0])
    assert knn_classifier(train, labels, test, test_labels, k=1, T=0.07)[0] == 100.0
    assert knn_classifier(train, labels, test, test_labels, k=3, T=0.07)[0] == 100.0
    assert knn_classifier(train, labels, test, test_labels, k=3, T=1e6)[0] == 0.0  # ~equal weights: majority wins


def test_knn_two_clusters_known_answer():
    train = unit(0.0, 0.1, -0.1, 1.5, 1.6, 1.7)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    test = unit(0.05, 1.55, 0.9)          # the last point, labelled 0, is nearer cluster 1 (0.6 vs 0.8 rad away)
    test_labels = torch.tensor([0, 1, 0])
    top1, top5 = knn_classifier(train, labels, test, test_labels, k=1)
    assert top1 == pytest.approx(200 / 3) and top5 is None      # fewer than 5 classes: no top-5
    assert knn_classifier(train, labels, test[:2], test_labels[:2], k=3)[0] == 100.0


def random_features(n, d, num_classes, seed):
    g = torch.Generator().manual_seed(seed)
    feats = nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    return feats, torch.randint(0, num_classes, (n,), generator=g)


@given(k=st.integers(1, 40), chunk=st.integers(1, 50), seed=st.integers(0, 100))
def test_knn_chunked_equals_unchunked_and_reference(k, chunk, seed):
    train_f, train_y = random_features(60, 8, 7, seed)
    test_f, test_y = random_features(45, 8, 7, seed + 1)
    full = knn_classifier(train_f, train_y, test_f, test_y, k=k, num_classes=7, chunk_size=1024)
    assert knn_classifier(train_f, train_y, test_f, test_y, k=k, num_classes=7, chunk_size=chunk) == full
    preds = knn_reference(train_f, train_y, test_f, k, 0.07, 7)
    assert full[0] == pytest.approx(100.0 * (preds == test_y).float().mean().item())
    assert full[1] >= full[0]


def test_knn_perfect_separation_and_bad_input():
    centres = nn.functional.normalize(torch.randn(6, 16, generator=torch.Generator().manual_seed(0)), dim=1) * 10
    labels = torch.arange(6).repeat_interleave(10)
    train = nn.functional.normalize(centres[labels] + torch.randn(60, 16) * 0.1, dim=1)
    test = nn.functional.normalize(centres[labels] + torch.randn(60, 16) * 0.1, dim=1)
    for k in (1, 5, 10):
        assert knn_classifier(train, labels, test, labels, k=k) == (100.0, 100.0)
    with pytest.raises(ValueError, match="k=61"):
        knn_classifier(train, labels, test, labels, k=61)
    with pytest.raises(ValueError, match="length"):
        knn_classifier(train, labels[:-1], test, labels, k=3)


def test_extract_features_shapes_norms_order():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.9), nn.Linear(3 * 4 * 4, 10))   # dropout: eval mode matters
    images = torch.randint(0, 256, (23, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(23) % 5
    loader = [(images[i:i + 8], labels[i:i + 8]) for i in range(0, 23, 8)]    # batches of 8, 8, 7
    transform = lambda x: (x.float() / 255 - 0.5) / 0.25                       # noqa: E731
    feats, ys = extract_features(model, loader, "cpu", transform, chunk_size=3)
    assert feats.shape == (23, 10) and feats.dtype == torch.float32 and ys.tolist() == labels.tolist()
    assert torch.allclose(feats.norm(dim=1), torch.ones(23), atol=1e-5)
    assert model.training                                # eval mode inside (below), handed back as it came
    with torch.no_grad():  # one image at a time, in dataset order
        model.eval()
        expected = torch.cat([nn.functional.normalize(model(transform(images[i:i + 1])), dim=1) for i in range(23)])
    torch.testing.assert_close(feats, expected)


# ---------------------------------------------------------------------------------------------------- linear probe
def tiny_vit(**kw):
    from minivit.vit import VisionTransformer
    return VisionTransformer(**{"img_size": 32, "patch_size": 8, "embed_dim": 24, "depth": 5, "num_heads": 3, **kw})


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g) * 3
    train_y = torch.arange(5).repeat(40)
    test_y = torch.arange(5).repeat(10)
    train_x = centres[train_y] + torch.randn(200, 32, generator=g)
    test_x = centres[test_y] + torch.randn(50, 32, generator=g)
    clf = LinearClassifier(32, 5)
    assert clf.linear.bias.abs().max() == 0 and 0.005 < clf.linear.weight.std() < 0.015   # official init
    optimizer, scheduler = make_optimizer(clf, epochs=20, batch_size=32, base_lr=0.5 * 256 / 32)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5)
    first, _ = evaluate(clf, tensor_batches(test_x, test_y, 64))
    for _ in range(20):
        loss = train_one_epoch(clf, optimizer, tensor_batches(train_x, train_y, 32, generator=g))
        scheduler.step()
    top1, top5 = evaluate(clf, tensor_batches(test_x, test_y, 64))
    assert top1 >= 98.0 > first + 30 and top5 == 100.0 and loss < 0.1
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)               # cosine reached 0


def test_probe_features_n_last_blocks_and_avgpool():
    torch.manual_seed(0)
    model = tiny_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = probe_features(model, x, n_last_blocks=4)
    assert feats.shape == (2, 4 * 24) == (2, feature_dim(model, 4))
    blocks = model.get_intermediate_layers(x, 4)
    torch.testing.assert_close(feats[:, -24:], model(x))          # the last block's CLS token is the usual feature
    torch.testing.assert_close(feats[:, :24], blocks[0][:, 0])
    pooled = probe_features(model, x, n_last_blocks=1, avgpool_patchtokens=True)   # the ViT-B recipe
    assert pooled.shape == (2, 48) == (2, feature_dim(model, 1, True))
    torch.testing.assert_close(pooled[:, 24:], blocks[-1][:, 1:].mean(1))
    # DINO: 4 CLS tokens for ViT-S (384), 1 CLS + mean patch token for ViT-B (768)
    assert dino_probe_recipe(tiny_vit(depth=1, embed_dim=384, num_heads=6)) == (4, False)
    assert dino_probe_recipe(tiny_vit(depth=1, embed_dim=768, num_heads=12)) == (1, True)


class TinyConvNet(nn.Module):
    """A stand-in ResNet: conv + BatchNorm + pooled feature, `num_features` wide."""
    num_features = 8

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                  nn.Flatten())

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("make_backbone", [tiny_vit, TinyConvNet])
def test_linear_probe_keeps_backbone_frozen(make_backbone):
    torch.manual_seed(0)
    backbone = make_backbone()
    backbone.train()                                   # image_batches must switch it to eval (BN stats, drop path)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(12) % 3
    loader = [(images[:6], labels[:6]), (images[6:], labels[6:])]
    dim = feature_dim(backbone, n_last_blocks=2)
    clf = LinearClassifier(dim, 3)
    w0 = clf.linear.weight.clone()
    optimizer, _ = make_optimizer(clf, epochs=2, batch_size=6, base_lr=1.0)
    for _ in range(2):
        train_one_epoch(clf, optimizer, image_batches(backbone, loader, "cpu", lambda x: x.float() / 255,
                                                      n_last_blocks=2))
    assert not torch.equal(clf.linear.weight, w0)     # the probe learned ...
    for k, v in backbone.state_dict().items():        # ... and no backbone weight or BN statistic moved
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in backbone.parameters())


# ---------------------------------------------------------------------------------------------------- attention maps
class FakeViT(nn.Module):
    """get_last_selfattention whose CLS row over the patches reads 1, 2, ..., N in patch (row-major) order."""
    patch_size = 4

    def get_last_selfattention(self, x):
        B, _, H, W = x.shape
        N = (H // 4) * (W // 4)
        attn = torch.rand(B, 2, 1 + N, 1 + N)
        attn[:, :, 0, 1:] = torch.arange(1, N + 1, dtype=torch.float32)
        return attn


def test_cls_attention_maps_layout_and_errors():
    maps = cls_attention_maps(FakeViT(), torch.zeros(3, 3, 8, 12))
    assert maps.shape == (3, 2, 2, 3)
    assert maps[0, 0].tolist() == [[1, 2, 3], [4, 5, 6]]     # patch n sits at row n // w, column n % w
    with pytest.raises(ValueError, match="multiple of the patch size"):
        cls_attention_maps(FakeViT(), torch.zeros(1, 3, 8, 10))


@pytest.mark.parametrize("H, W", [(32, 32), (24, 40)])
def test_cls_attention_maps_of_a_vit(H, W):
    torch.manual_seed(0)
    model = tiny_vit().eval()
    maps = cls_attention_maps(model, torch.randn(2, 3, H, W))
    assert maps.shape == (2, 3, H // 8, W // 8)
    cls_self = model.get_last_selfattention(torch.zeros(1, 3, H, W))  # rows are softmaxes: maps sum to 1 - CLS->CLS
    assert (maps >= 0).all() and (maps.sum((-2, -1)) <= 1 + 1e-5).all() and cls_self.shape[-1] == 1 + H * W // 64
    assert upsample(maps, 8).shape == (2, 3, H, W)


@given(seed=st.integers(0, 10_000), h=st.integers(1, 9), w=st.integers(1, 9), mass=st.floats(0.05, 0.95))
def test_masks_hold_the_mass_and_are_minimal(seed, h, w, mass):
    attn = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed)) ** 4   # skewed, like attention
    masks = mass_threshold_masks(attn, mass)
    assert masks.shape == attn.shape and masks.dtype == torch.bool
    total = attn.sum((-2, -1))
    kept = (attn * masks).sum((-2, -1))
    assert (kept >= mass * total * (1 - 1e-6)).all()
    smallest_kept = torch.where(masks, attn, torch.inf).amin((-2, -1))
    assert (kept - smallest_kept < mass * total).all()          # minimal: one less and the mass is not reached
    assert (torch.where(masks, -torch.inf, attn).amax((-2, -1)) <= smallest_kept).all()   # the largest are kept


def test_masks_uniform_and_one_hot():
    uniform = torch.full((1, 1, 10, 10), 0.01)
    assert abs(int(mass_threshold_masks(uniform).sum()) - 60) <= 1
    one_hot = torch.zeros(1, 2, 5, 7)
    one_hot[0, 0, 3, 4] = one_hot[0, 1, 0, 0] = 1.0
    masks = mass_threshold_masks(one_hot)
    assert masks.sum().item() == 2 and masks[0, 0, 3, 4] and masks[0, 1, 0, 0]
    with pytest.raises(ValueError, match="mass"):
        mass_threshold_masks(uniform, mass=1.5)


def test_upsample_is_nearest_by_patch():
    maps = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    up = upsample(maps, 3)
    assert up.shape == (6, 6) and up[:3, 3:].eq(2).all() and up[3:, :3].eq(3).all()
    assert upsample(torch.ones(2, 1, 2, dtype=torch.bool), 2).dtype == torch.bool


def test_save_attention_figure_writes_a_png(tmp_path):
    from PIL import Image

    torch.manual_seed(0)
    attn = torch.rand(3, 4, 6).softmax(-1)
    path = save_attention_figure(torch.rand(3, 32, 48), attn, mass_threshold_masks(attn), tmp_path / "a.png")
    with Image.open(path) as im:
        im.verify()
        assert im.format == "PNG" and im.width > im.height > 100
    with pytest.raises(ValueError, match="does not tile"):
        save_attention_figure(torch.rand(3, 30, 48), attn, None, tmp_path / "b.png")


# ---------------------------------------------------------------------------------------------------- command lines
def run_module(module, *args, cwd=None):
    """python -m module args... in a subprocess -> its stdout; fails the test with the output on error."""
    import os
    import subprocess
    import sys

    from conftest import script_env

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env=script_env(PYTHONPATH=root), cwd=cwd or root, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_knn_cli_random_init_baseline():
    out = run_module("minivit.tools.knn", "--arch", "vit_ti16", "--weights", "none", "--data", "digits",
                     "--image_size", "16", "--k", "1", "20", "--batch_size", "512", "--num_workers", "0")
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["20"])]
    assert [r[0] for r in rows] == ["1", "20"], out
    top1 = float(rows[1][1])
    assert 20.0 < top1 <= float(rows[1][2]) <= 100.0, out      # far above chance (10%) even at random init


def test_linear_cli_with_and_without_augmentation():
    # 16 px = one patch per image with vit_ti16: the cheapest ViT forward there is
    common = ["--arch", "vit_ti16", "--data", "digits", "--image_size", "16", "--lr", "0.05", "--num_workers", "0"]
    out = run_module("minivit.tools.linear", *common, "--epochs", "3", "--no_aug", "--batch_size", "256")
    assert "CLS tokens of the last 4 blocks" in out and "epoch   3/3" in out, out
    assert 50.0 < float(out.split("best top-1:")[1].strip().rstrip("%")) <= 100.0, out
    out = run_module("minivit.tools.linear", *common, "--epochs", "1", "--batch_size", "512")   # with augmentation
    assert "epoch   1/1" in out and "best top-1" in out, out


def test_attention_maps_cli_any_image_size(tmp_path):
    import numpy as np
    from PIL import Image

    from minivit.models import build_model

    torch.manual_seed(0)
    torch.save(build_model("vit_ti16", patch_size=8).state_dict(), tmp_path / "vit_ti8.pth")   # a small-image run
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    out = run_module("minivit.tools.attention_maps", "--arch", "vit_ti16", "--patch_size", "8", "--weights",
                     tmp_path / "vit_ti8.pth", "--image", tmp_path / "x.png", "--image_size", "40",
                     "--output_dir", tmp_path / "maps")
    path = out.strip().splitlines()[-1]
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width > im.height
    # 50x70 -> shorter side 40: 40x56 -> centre crop to multiples of 16: 32x48
    assert load_image(tmp_path / "x.png", 40, 16).shape == (3, 32, 48)
    with pytest.raises(SystemExit, match="patch_size"):        # a ResNet has no patches
        load_backbone("resnet18", patch_size=8)
    with pytest.raises(SystemExit, match="missing|shape"):     # patch 8 weights into a patch 16 model
        load_backbone("vit_ti16", tmp_path / "vit_ti8.pth")
