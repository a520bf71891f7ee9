"""Emergent-property tools: segmentation from attention, copy detection, ViT vs CNN (issue 7).

Every metric is checked on cases with answers known by hand; each command runs end to end on tiny inputs.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st
from PIL import Image

from conftest import script_env
from minivit.tools import compare, copydetect, segmentation
from minivit.tools.attention_maps import mass_threshold_masks, upsample
from minivit.tools.copydetect import average_precision, gem, retrieval_metrics
from minivit.models import build_model
from minivit.tools.segmentation import attention_jaccard, jaccard, segmentation_scores

pytestmark = pytest.mark.usefixtures("reference_kernels")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--arch", "vit_ti16", "--patch_size", "8", "--image_size", "32"]  # 4x4 patches, 12 blocks of width 192


def tiny_vit(num_classes=0):
    torch.manual_seed(0)
    return build_model("vit_ti16", num_classes=num_classes, img_size=32, patch_size=8).eval()


# ---------------------------------------------------------------------------------------------------- Jaccard

def test_jaccard_known_values():
    gt = torch.zeros(4, 4, dtype=torch.bool)
    gt[:, :2] = True                                            # left half, 8 pixels
    top = torch.zeros(4, 4, dtype=torch.bool)
    top[:2] = True                                              # top half, 8 pixels; 4 shared
    assert jaccard(gt, gt).item() == 1.0                        # a perfect mask
    assert jaccard(torch.zeros_like(gt), gt).item() == 0.0      # an empty one
    assert jaccard(~gt, gt).item() == 0.0                       # the complement
    assert jaccard(top, gt).item() == pytest.approx(4 / 12)     # partial overlap: 4 / (8 + 8 - 4)
    assert jaccard(torch.zeros_like(gt), torch.zeros_like(gt)).item() == 1.0  # two empty masks agree
    assert jaccard(torch.stack([gt, top]), torch.stack([gt, gt])).tolist() == pytest.approx([1.0, 1 / 3])
    with pytest.raises(ValueError, match="different shapes"):
        jaccard(gt, gt[:3])


@given(st.integers(0, 2 ** 16 - 1), st.integers(0, 2 ** 16 - 1))
def test_jaccard_symmetric_and_bounded(a, b):
    bits = lambda n: torch.tensor([(n >> i) & 1 for i in range(16)], dtype=torch.bool).view(4, 4)  # noqa: E731
    p, g = bits(a), bits(b)
    j = jaccard(p, g).item()
    assert j == jaccard(g, p).item() and 0.0 <= j <= 1.0
    assert (j == 1.0) == bool((p == g).all())


def test_attention_jaccard_per_head():
    masks = torch.zeros(2, 3, 2, 2, dtype=torch.bool)           # (B, heads, h, w) at the patch grid
    masks[:, 0, 0, 0] = True                                    # head 0: the top-left patch
    masks[:, 1] = True                                          # head 1: everything
    gt = upsample(masks[:, 0], 4)                               # (B, 8, 8): the object is head 0's patch
    iou = attention_jaccard(masks, gt, patch_size=4)
    assert iou.shape == (2, 3)
    assert iou[:, 0].tolist() == [1.0, 1.0] and iou[:, 2].tolist() == [0.0, 0.0]  # head 2 keeps nothing
    assert iou[:, 1].tolist() == pytest.approx([1 / 4, 1 / 4])  # 16 object pixels of 64
    with pytest.raises(ValueError, match="does not match"):
        attention_jaccard(masks, gt[:, :7], patch_size=4)


def test_attention_on_the_object_segments_it():
    attn = torch.full((1, 2, 4, 4), 0.001)                      # (B, heads, h, w): two heads
    attn[0, 0, 1:3, 1:3] = 1.0                                  # head 0 looks at the object, head 1 at a corner
    attn[0, 1, 0, 0] = 1.0
    gt = torch.zeros(1, 16, 16, dtype=torch.bool)
    gt[0, 4:12, 4:12] = True                                    # the object: the 2x2 central patches of 4 px
    iou = attention_jaccard(mass_threshold_masks(attn, 0.6), gt, patch_size=4)[0]
    assert iou[0].item() == 3 / 4 and iou[1].item() == 0.0      # 4 equal weights: 60% of the mass takes 3 of them
    iou = attention_jaccard(mass_threshold_masks(attn, 0.8), gt, patch_size=4)[0]
    assert iou[0].item() == 1.0 and iou[1].item() == 0.0


def test_segmentation_scores_by_hand():
    # image 0 has two objects, image 1 one; two heads
    scores = segmentation_scores(torch.tensor([[0.2, 0.8], [0.6, 0.4], [0.5, 0.1]]), torch.tensor([0, 0, 1]))
    assert scores["dino"] == pytest.approx(((0.8 + 0.6) / 2 + 0.5) / 2)  # best head per object
    assert scores["per_head"] == pytest.approx([((0.2 + 0.6) / 2 + 0.5) / 2, ((0.8 + 0.4) / 2 + 0.1) / 2])
    assert scores["best_head"] == 0 and scores["best_head_jaccard"] == pytest.approx(0.45)
    assert scores["mean_heads"] == pytest.approx(0.4)
    with pytest.raises(ValueError):
        segmentation_scores(torch.zeros(0, 2), torch.zeros(0))


def test_voc_folder_pairs_and_geometry(tmp_path):
    (tmp_path / "JPEGImages").mkdir(), (tmp_path / "SegmentationObject").mkdir()
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(tmp_path / "JPEGImages" / "a.jpg")
    Image.fromarray(np.full((40, 60, 3), 128, np.uint8)).save(tmp_path / "JPEGImages" / "no_mask.jpg")
    ids = np.zeros((40, 60), np.uint8)
    ids[0:20, 0:30], ids[20:40, 30:60], ids[19:21, :] = 1, 2, 255  # two objects, a void border
    mask = Image.fromarray(ids, mode="P")
    mask.putpalette([0, 0, 0, 128, 0, 0, 0, 128, 0] + [224, 224, 192] * 253)
    mask.save(tmp_path / "SegmentationObject" / "a.png")
    pairs = segmentation.voc_pairs(str(tmp_path))
    assert [os.path.basename(p) for pair in pairs for p in pair] == ["a.jpg", "a.png"]
    image, labels = segmentation.load_pair(*pairs[0], image_size=20, patch_size=8)
    assert image.shape == (3, 16, 24) and labels.shape == (16, 24)  # 20 x 30 cropped to multiples of 8
    assert set(labels.unique().tolist()) == {0, 1, 2, 255}
    with pytest.raises(ValueError, match="VOC layout"):
        segmentation.voc_pairs(str(tmp_path / "JPEGImages"))


def test_segmentation_on_a_voc_folder(tmp_path, capsys):
    (tmp_path / "JPEGImages").mkdir(), (tmp_path / "SegmentationClass").mkdir()
    for name in ("x", "y"):
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 48, 3), np.uint8)).save(
            tmp_path / "JPEGImages" / f"{name}.jpg")
        ids = np.zeros((32, 48), np.uint8)
        ids[8:24, 8:40] = 3
        Image.fromarray(ids).save(tmp_path / "SegmentationClass" / f"{name}.png")
    scores = segmentation.main(TINY + ["--data", str(tmp_path), "--output_dir", str(tmp_path / "out")])
    assert 0 <= scores["random"]["dino"] <= 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["setup"]["objects"] == 2


def test_parse_weights(tmp_path):
    path = tmp_path / "teacher_backbone.pth"
    path.write_bytes(b"")
    assert segmentation.parse_weights(["dino=" + str(path), "random=none", str(path)]) == [
        ("dino", str(path)), ("random", None), ("teacher_backbone", str(path))]
    assert segmentation.parse_weights(["none"]) == [("random", None)]  # no label: named after the file
    with pytest.raises(SystemExit, match="twice"):
        segmentation.parse_weights(["a=none", "a=none"])
    with pytest.raises(SystemExit, match="no such file"):
        segmentation.parse_weights(["a=" + str(tmp_path / "missing.pth")])


def test_backbones_load_a_supervised_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    state = tiny_vit(num_classes=10).state_dict()
    torch.save({"model": state}, path)                          # train_vit.py's layout, with a classifier head
    models = segmentation.build_backbones("vit_ti16", [("sup", str(path))], "cpu", img_size=32, patch_size=8)
    loaded = models["sup"].state_dict()
    assert set(state) - set(loaded) == {"head.weight", "head.bias"}
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


# ------------------------------------------------------------------------------------------------ copy detection

def test_average_precision_by_hand():
    sims = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    assert average_precision(sims, torch.tensor([1, 1, 0, 0, 0]).bool()) == 1.0   # a perfect ranking
    assert average_precision(sims, torch.tensor([0, 1, 0, 1, 0]).bool()) == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert average_precision(sims, torch.tensor([0, 0, 1, 0, 0]).bool()) == pytest.approx(1 / 3)
    assert average_precision(sims.flip(0), torch.tensor([1, 0, 0, 0, 0]).bool()) == pytest.approx(1 / 5)
    ties = torch.ones(3)
    assert average_precision(ties, torch.tensor([0, 1, 0]).bool()) == pytest.approx(1 / 2)  # database order
    with pytest.raises(ValueError, match="no positive"):
        retrieval_metrics(sims[None], torch.zeros(1, 5, dtype=torch.bool))


def test_retrieval_metrics():
    similarity = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.4, 0.8]])
    positives = torch.tensor([[1, 0, 0], [0, 1, 0]]).bool()                 # ranks 1 and 2
    assert retrieval_metrics(similarity, positives) == pytest.approx({"mAP": (1 + 1 / 2) / 2, "top1": 0.5})


def test_gem():
    x = torch.rand(2, 7, 5) + 0.1                                           # (B, N, D), positive
    assert gem(x, p=1).shape == (2, 5)
    torch.testing.assert_close(gem(x, p=1), x.mean(1))                      # p=1: average pooling
    torch.testing.assert_close(gem(x, p=200), x.max(1).values, rtol=2e-2, atol=0)  # p -> inf: max pooling
    assert (gem(-x, p=4) <= 1e-6 + 1e-9).all()                               # negatives clamp to eps


def test_edits_are_deterministic_and_change_the_image():
    from minivit.data import ShapesDataset

    originals = torch.stack([ShapesDataset("test", 32)[i][0] for i in range(2)])
    queries, source, names = copydetect.make_queries(originals, seed=3)
    assert queries.shape == (2 * len(copydetect.EDITS), 3, 32, 32) and queries.dtype == torch.uint8
    assert source.tolist() == [0] * 7 + [1] * 7 and names[:7] == list(copydetect.EDITS)
    assert torch.equal(queries, copydetect.make_queries(originals, seed=3)[0])
    changed = (queries.float() - originals[source].float()).abs().mean((1, 2, 3))
    assert (changed > 2).all(), dict(zip(names, changed.tolist()))


def test_exact_copy_is_retrieved_first():
    from minivit.data import ShapesDataset

    database = torch.stack([ShapesDataset("test", 32)[i][0] for i in range(12)])
    model = tiny_vit()
    for feats in (copydetect.copy_features(model, database, "cpu"),):
        assert set(feats) == {"cls", "cls+gem"} and feats["cls+gem"].shape == (12, 384)
        for f in feats.values():
            metrics = retrieval_metrics(f[:4] @ f.T, torch.eye(4, 12, dtype=torch.bool))  # queries = exact copies
            assert metrics == {"mAP": 1.0, "top1": 1.0}


# ---------------------------------------------------------------------------------------------- ViT versus CNN

FAKE_TRAIN = """import argparse, json, os
p = argparse.ArgumentParser()
for a in ("--data", "--train_fraction", "--epochs", "--eval_every", "--output_dir", "--arch"):
    p.add_argument(a)
a = p.parse_args()
os.makedirs(a.output_dir, exist_ok=True)
f = float(a.train_fraction)
json.dump({{"arch": a.arch or "{arch}", "test_top1": {slope} * f + 10, "test_top5": None, "params": 1e6,
           "train_images_per_s": 100.0, "epochs": int(a.epochs), "train_fraction": f, "data": a.data,
           "train_images": int(1000 * f)}}, open(os.path.join(a.output_dir, "results.json"), "w"))
"""


def test_compare_budget_and_command():
    assert compare.epochs_for(0.1, 20, "steps") == 200 and compare.epochs_for(0.1, 20, "epochs") == 20
    assert compare.epochs_for(1.0, 20, "steps") == 20
    cmd = compare.train_command("train_vit.py", "digits", 0.3, 67, "out/vit_f0.3", ["--arch", "vit_ti16"])
    assert cmd[1:] == ["train_vit.py", "--data", "digits", "--train_fraction", "0.3", "--epochs", "67",
                       "--eval_every", "67", "--output_dir", "out/vit_f0.3", "--arch", "vit_ti16"]


def test_compare_trains_then_loads(tmp_path):
    for model, slope in (("vit", 80), ("resnet", 40)):
        (tmp_path / f"{model}.py").write_text(FAKE_TRAIN.format(arch=model, slope=slope))
    out = tmp_path / "cmp"
    args = ["--fractions", "0.1", "1.0", "--epochs", "3", "--output_dir", str(out), "--vit_script",
            str(tmp_path / "vit.py"), "--resnet_script", str(tmp_path / "resnet.py"), "--vit_args", "--arch vit_x"]
    run = subprocess.run([sys.executable, "-m", "minivit.tools.compare", *args], cwd=REPO, env=script_env(),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert json.loads((out / "vit_f0.1" / "results.json").read_text())["epochs"] == 30  # same steps as 3 at 100%
    rows = compare.main(args + ["--load"])                                  # the report from the saved runs
    assert [(r["model"], r["arch"], r["test_top1"]) for r in rows] == [
        ("vit", "vit_x", 18.0), ("resnet", "resnet", 14.0), ("vit", "vit_x", 90.0), ("resnet", "resnet", 50.0)]
    report = (out / "report.md").read_text()
    assert "| vit | vit_x | 10% | 100 | 30 | 18.0 | n/a | 100 | 1.00M |" in report
    assert (out / "data_fraction.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="missing"):
        compare.main(args[:-6] + ["--fractions", "0.5", "--output_dir", str(out), "--load"])


# ------------------------------------------------------------------------------------------- the CLIs, end to end

def run_tool(module, *args, timeout=120):
    run = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=script_env(), capture_output=True,
                         text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def test_segmentation_cli(tmp_path):
    path = tmp_path / "vit.pth"
    torch.save({"model": tiny_vit(num_classes=10).state_dict()}, path)
    out = tmp_path / "seg"
    stdout = run_tool("minivit.tools.segmentation", *TINY, "--weights", f"trained={path}", "random=none",
                      "--num_images", "6", "--batch_size", "4", "--num_figures", "2", "--output_dir", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["images"] == 6 and set(results["scores"]) == {"trained", "random"}
    assert "| trained |" in (out / "report.md").read_text() and "| random |" in stdout
    for png in ("segmentation.png", "attention_trained_0.png", "attention_random_1.png"):
        assert (out / png).stat().st_size > 0


def test_copydetect_cli(tmp_path):
    out = tmp_path / "cd"
    run_tool("minivit.tools.copydetect", *TINY, "--weights", "random=none", "--num_originals", "3",
             "--num_distractors", "9", "--edits", "crop", "jpeg", "strong", "--output_dir", str(out))
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["queries"] == 9 and set(results["results"]["random"]) == {"cls", "cls+gem"}
    assert set(results["results"]["random"]["cls"]) == {"all", "crop", "jpeg", "strong"}
    assert "| random |" in (out / "report.md").read_text() and (out / "matches_random.png").stat().st_size > 0


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="no self-attention"):
        segmentation.main(["--arch", "resnet18", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown arch"):
        copydetect.main(["--arch", "vit_zz", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a multiple"):
        copydetect.main(TINY[:4] + ["--image_size", "36", "--output_dir", str(tmp_path)])
