"""bench/bench.py: its FLOP counts against torch's own counter, the plain-PyTorch swap against our build, and the
command line end to end (a reduced CPU run). Nothing here asserts a time."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import script_env

from minivit.kernels.attention import attention
from bench import bench
from minivit import vit
from minivit.dino import DINOHead, DINOLoss, MultiCropWrapper
from minivit.vit import VisionTransformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=32, depth=2, mlp_ratio=4.0)  # with 2 heads, a ViT small enough for the interpreter


def test_vit_flops_by_hand():
    # 16 px, patch 8, 1 channel, D 4, one block, MLP 8: n = 4 patches, N = 5 tokens
    counts = bench.vit_flops(16, 8, embed_dim=4, depth=1, mlp_ratio=2.0, num_classes=3, in_chans=1)
    assert counts["patch_embed"] == 2 * 4 * 64 * 4  # n x (C p p) x D multiply-adds
    assert counts["linear"] == 2 * 5 * (3 * 16 + 16 + 2 * 4 * 8)  # qkv, proj, fc1, fc2
    assert counts["attention"] == 2 * 2 * 5 * 5 * 4  # q k^T and P v
    assert counts["head"] == 2 * 4 * 3
    assert counts["total"] == 2048 + 1280 + 400 + 24


def test_dino_flops_match_the_issue():
    # issue 6: "ViT-S/8 DINO is about 518 GFLOP per image" (2x224 + 8x96 crops, K = 65536)
    assert bench.dino_flops(8)["total"] == pytest.approx(518e9, rel=0.005)
    s16 = bench.dino_flops(16)
    assert s16["student"] == 3 * (2 * s16["global_fwd"] + 8 * s16["local_fwd"])
    assert s16["teacher"] == 2 * s16["global_fwd"]
    assert bench.dino_head_flops(384, 65536) == 2 * (384 * 2048 + 2048 * 2048 + 2048 * 256 + 256 * 65536)


@pytest.mark.usefixtures("reference_kernels")
@pytest.mark.parametrize("img_size", [32, 48])  # 48: an input off the native grid (interpolated positions)
def test_vit_flops_equal_torch_flop_counter(img_size):
    model = VisionTransformer(img_size=32, patch_size=8, num_classes=10, num_heads=2, **TINY)
    x = torch.randn(3, 3, img_size, img_size)
    counted = bench.counted_flops(lambda: model(x))
    assert counted == 3 * bench.vit_flops(img_size, 8, num_classes=10, **TINY)["total"]


@pytest.mark.usefixtures("reference_kernels")
def test_dino_step_flops_equal_torch_flop_counter():
    """Forward + backward really is 3x the forward, except the images' own gradient, which nobody needs: the patch
    embedding's backward computes its weight gradient only."""
    torch.manual_seed(0)
    B, K, n_local = 2, 128, 2

    def network():
        return MultiCropWrapper(VisionTransformer(img_size=32, patch_size=8, num_heads=2, **TINY), DINOHead(32, K))

    student, teacher = network(), network()
    teacher.requires_grad_(False)
    loss_fn = DINOLoss(K, 2 + n_local, 0.04, 0.04, 0, 1)
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(n_local)]

    def step():
        loss_fn(student(crops), teacher(crops[:2]), epoch=0).backward()

    expected = bench.dino_flops(8, 32, 16, n_local, K, **TINY)
    patch_input_grads = 2 * bench.vit_flops(32, 8, **TINY)["patch_embed"] + \
        n_local * bench.vit_flops(16, 8, **TINY)["patch_embed"]
    assert bench.counted_flops(step) == B * (expected["total"] - patch_input_grads)


@pytest.mark.parametrize("mode", ["reference", "auto"])  # auto: Triton's interpreter on a CPU (conftest)
def test_plain_swap_gives_the_same_model(mode, monkeypatch):
    monkeypatch.setenv("MINIVIT_KERNELS", mode)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=8, num_classes=5, num_heads=2, **{**TINY, "depth": 1})
    x = torch.randn(2, 3, 16, 16)

    def outputs():
        model.zero_grad(set_to_none=True)
        logits = model(x)
        logits.square().sum().backward()
        return [logits.detach()] + [p.grad.clone() for p in model.parameters()]

    ours = outputs()
    with bench.plain_pytorch_kernels():
        assert vit.attention is bench._sdpa  # the model now calls the plain functions...
        plain = outputs()
    assert vit.attention is attention  # ...and gets its own back afterwards
    for a, b in zip(ours, plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_plain_swap_restores_after_an_error():
    with pytest.raises(KeyError), bench.plain_pytorch_kernels():
        raise KeyError("inside")
    assert vit.attention is attention


def test_measure_refills_before_every_step_and_guarded_reports_errors():
    calls = []
    timing = bench.measure(lambda: calls.append("step"), lambda: calls.append("refill"), torch.device("cpu"),
                           warmup=2, iters=3)
    assert calls == ["refill", "step"] * 5
    assert timing.low <= timing.median <= timing.high and timing.peak_bytes is None
    assert bench.guarded(lambda: 1 / 0).startswith("failed: ZeroDivisionError")


def test_bad_section_is_a_clear_error():
    with pytest.raises(SystemExit, match="choose from vit,resnet,dino,data"):
        bench.main(["--only", "vit,gpu"])


def test_quick_bench_prints_the_vit_table(tmp_path):
    out = tmp_path / "bench.md"
    cmd = [sys.executable, "bench/bench.py", "--quick", "--only", "vit", "--iters", "1", "--device", "cpu",
           "--out", str(out)]
    run = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    assert "failed" not in run.stdout
    assert "### ViT training step (forward + backward + AdamW), fp32, CPU, reduced sizes" in run.stdout
    for arch in ("vit_s16", "vit_s8"):
        for build in ("ours", "plain"):
            assert f"| {arch} | {build} | " in run.stdout
    assert "- command: `python bench/bench.py --quick --only vit" in run.stdout
    assert out.read_text().strip() == run.stdout.strip()  # the file holds exactly what was printed


def test_data_section_prints_the_yardstick_and_ours_on_a_photo_folder(tmp_path):
    """The data table end to end on 4 small photos (a reduced CPU plan): every row there, none failed."""
    from minivit.tools.photo_folder import photo
    for k, size in enumerate([(120, 90), (90, 120), (100, 66), (40, 30)]):
        (tmp_path / f"c{k % 2}").mkdir(exist_ok=True)
        photo(0, k, size).save(tmp_path / f"c{k % 2}" / f"{k}.jpg", quality=90)
    plan = bench.make_plan(torch.device("cpu"), quick=True)
    plan.data, plan.photos, plan.loader_batch, plan.workers, plan.iters = str(tmp_path), 4, 2, 0, 1
    table = "\n".join(bench.bench_data(plan))
    assert "failed" not in table and "4 photos of" in table
    for stage in ("official: Pillow decode + DataAugmentationDINO", "ours: decode (load_photo", "ours / official",
                  "ours: decode + MultiCropAugment on cpu", "ours: MultiCropAugment on cpu",
                  "ours: decode in the loader", "ours: loader + MultiCropAugment on cpu"):
        assert f"| {stage}" in table, stage


def test_official_views_are_dinos_recipe(tmp_path):
    import random

    from minivit.tools.photo_folder import photo
    photo(0, 0, (60, 40)).save(tmp_path / "a.jpg")
    views = bench.official_dino_views(str(tmp_path / "a.jpg"), random.Random(0), 32, 16, local_crops=3)
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and v.min() < 0 for v in views)  # normalised, as ToTensor + Normalize
