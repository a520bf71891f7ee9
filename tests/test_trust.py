"""Trust in what minivit reads and writes: no code runs from a weight, checkpoint or CIFAR file; faults during a run
(SIGKILL mid-save, a full disk, an unwritable folder, a second run on the same folder) lose nothing; and the
numerics the official code gets right (SyncBatchNorm for any BatchNorm, fp32-accurate teacher targets under bf16
autocast, fp32 evaluation features)."""
import argparse
import os
import pickle
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from conftest import run_command, script_env
from minivit import checkpoint, distributed, training
from minivit.data import ImageFolderDataset, build_dataset
from minivit.dino import DINOHead, DINOLoss, MultiCropWrapper
from minivit.tools.knn import extract_features
from minivit.models import build_model, load_pretrained
from test_bad_input import Payload

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 px digits, 2 steps of 8 images per epoch: the smallest train_vit.py run (as tests/test_train_supervised.py)
TINY_VIT = ["train_vit.py", "--image_size", "8", "--load_size", "8", "--batch_size", "8", "--max_steps_per_epoch",
            "2", "--warmup_epochs", "0", "--log_every", "1", "--patch_size", "4"]


def run(args, timeout=600):
    """`python args...` from the repository root (conftest.run_command: a timeout names the command and its time)."""
    return run_command([sys.executable, *args], timeout=timeout, check=False, cwd=ROOT, env=script_env())


# ------------------------------------------------------------------------------------ no code runs from a file


def test_payload_is_refused_and_never_runs_and_trust_pickle_opts_in(tmp_path):
    marker = tmp_path / "ran"
    model = build_model("vit_ti16")
    zip_file, legacy = tmp_path / "evil.pth", tmp_path / "evil_legacy.pth"
    torch.save({"state_dict": model.state_dict(), "x": Payload(marker)}, zip_file)
    torch.save({"state_dict": model.state_dict(), "x": Payload(marker)}, legacy, _use_new_zipfile_serialization=False)
    for path in (zip_file, legacy):
        with pytest.raises(ValueError, match=r"holds pickled objects .*\(.*open.*\): refused.*--trust_pickle"):
            load_pretrained(model, path)
        with pytest.raises(ValueError, match="refused"):
            checkpoint.load_checkpoint(path)
    assert not marker.exists()
    with pytest.warns(UserWarning, match="trust_pickle"):
        report = load_pretrained(model, zip_file, trust_pickle=True)  # the user's explicit choice: it runs
    assert report.loaded == 150 and marker.exists()


def test_official_layout_with_its_argparse_namespace_still_loads(tmp_path):
    model = build_model("vit_ti16")
    path = tmp_path / "dino_official.pth"
    torch.save({"teacher": {"backbone." + k: v for k, v in model.state_dict().items()}, "epoch": 100,
                "args": argparse.Namespace(arch="vit_tiny", lr=0.0005, global_crops_scale=(0.4, 1.0))}, path)
    assert load_pretrained(build_model("vit_ti16"), path).source == "teacher"


def test_cifar_files_are_read_without_running_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    images = np.zeros((2, 3072), dtype=np.uint8)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": images, b"labels": [0, 1]}, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"a", b"b"]}, f, protocol=2)
    assert len(build_dataset(str(folder), "train")) == 10
    marker = tmp_path / "ran"
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": images, b"labels": Payload(marker)}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch is not an official CIFAR python file \(refused \w+\.open"):
        build_dataset(str(folder), "test")
    assert not marker.exists()


def test_an_empty_class_folder_is_refused_by_name(tmp_path):
    from PIL import Image
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "a.png")
    with pytest.raises(ValueError, match=f"class folder {tmp_path / 'cat'} has no"):
        ImageFolderDataset(str(tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "b.jpg")
    assert ImageFolderDataset(str(tmp_path)).classes == ["cat", "dog"]


# ------------------------------------------------------------------------------------ faults lose nothing

# train_vit.py whose second checkpoint save writes half a file and hangs there, to be killed in the middle of it
HANG_ON_SECOND_SAVE = """
import runpy, sys, time, torch
real_save, calls = torch.save, []
def save(obj, f, *args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        f.write(b"PK half a checkpoint")
        f.flush()
        print("SAVING", flush=True)
        time.sleep(600)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_during_save_keeps_the_last_checkpoint_and_resume_continues(tmp_path):
    args = [*TINY_VIT, "--epochs", "2", "--output_dir", str(tmp_path)]
    proc = subprocess.Popen([sys.executable, "-c", HANG_ON_SECOND_SAVE, *args], cwd=ROOT, env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start = time.perf_counter()
    try:
        for line in proc.stdout:  # epoch 1 trains and saves, epoch 2 trains and starts saving
            if line.startswith("SAVING"):
                break
        else:
            pytest.fail(f"no second save after {time.perf_counter() - start:.0f} s: {proc.stderr.read()[-2000:]}")
        proc.kill()  # SIGKILL: no cleanup code of ours runs
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(tmp_path.glob(".checkpoint.pt.*.tmp")), "the killed save left no partial file (test broken)"
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pt", kind="vit")["epoch"] == 1
    resumed = run([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed {tmp_path / 'checkpoint.pt'} after epoch 1" in resumed.stdout
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 2
    assert not list(tmp_path.glob(".checkpoint.pt.*.tmp"))  # the next save cleared the partial file
    assert [r["epoch"] for r in training.read_jsonl(tmp_path / "log.jsonl")] == [1, 2]


def test_a_full_disk_stops_in_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_checkpoint(path, {"kind": "vit", "epoch": 1})
    real_mkstemp = tempfile.mkstemp

    def onto_full_disk(dir=None, prefix=None, suffix=None):  # the temp file's name, but its writes hit /dev/full
        fd, name = real_mkstemp(dir=dir, prefix=prefix, suffix=suffix)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", onto_full_disk)
    with pytest.raises(SystemExit, match=r"^error: could not write .*No space left on device; the last good "
                                         r"checkpoint is kept at .*--resume$"):
        checkpoint.save_checkpoint(path, {"kind": "vit", "epoch": 2, "weights": torch.zeros(10000)})
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_an_unwritable_output_folder_is_one_line_before_training(tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ValueError, match="is not writable"):
        checkpoint.make_output_dir(tmp_path / "a_file" / "run")

    def read_only(*args, **kwargs):  # root may write anywhere; a read-only mount refuses like this
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checkpoint.tempfile, "TemporaryFile", read_only)
    with pytest.raises(ValueError, match=r"--output_dir .* is not writable \(Permission denied\)"):
        checkpoint.make_output_dir(tmp_path / "run")
    monkeypatch.undo()
    gone = tmp_path / "gone"  # the folder vanished mid-run: the save stops in one line
    with pytest.raises(SystemExit, match="^error: could not write .*no checkpoint was saved yet"):
        checkpoint.save_checkpoint(gone / "checkpoint.pt", {"kind": "vit"})


def test_two_runs_on_one_output_folder(tmp_path):
    checkpoint.lock_output_dir(tmp_path)
    checkpoint.lock_output_dir(tmp_path)  # the same process again (a second main() call): allowed
    other = tmp_path / "other"
    other.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from minivit import checkpoint; "
                               "checkpoint.lock_output_dir(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
                               str(other)], cwd=ROOT, env=script_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run([*TINY_VIT, "--epochs", "1", "--output_dir", str(other)])
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert proc.stderr.strip() == (f"error: --output_dir {other} is in use by another run (pid {holder.pid}): "
                                       "wait for it to end, or pick another --output_dir")
        assert not (other / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    checkpoint.lock_output_dir(other)  # the lock ends with its process, even a killed one


# ------------------------------------------------------------------------------------ numerics


def test_every_batchnorm_becomes_sync_batchnorm_on_several_gpus():
    head = MultiCropWrapper(nn.Flatten(), DINOHead(12, 32, use_bn=True))
    several_gpus = distributed.DistInfo(0, 0, 2, torch.device("cuda", 0), True, True)
    converted = distributed.sync_batchnorm(head, several_gpus)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in converted.modules())
    assert not any(type(m) is nn.BatchNorm1d for m in converted.modules())
    one_process = distributed.DistInfo(0, 0, 1, torch.device("cpu"), True, False)
    assert distributed.sync_batchnorm(head, one_process) is head


def total_variation(p, q):
    return 0.5 * (p.double() - q.double()).abs().sum(-1).mean().item()


def test_teacher_targets_keep_fp32_accuracy_under_bf16_autocast():
    """K = 65536 at teacher temperature 0.04: a bf16 head moves the targets by ~0.3% in total variation (bf16 logits
    alone ~0.2%); the head in fp32 leaves only the rounding of its bf16 input, ~0.1% (the official fp16: ~0.1%)."""
    torch.manual_seed(0)
    head, loss = DINOHead(384, 65536), DINOLoss(65536, 2, 0.04, 0.04, 0, 1)
    features = torch.randn(32, 384).bfloat16()  # what a bf16 backbone hands the head
    with torch.no_grad():
        exact = loss.teacher_targets(head.double()(features.double()), 0)
        head.float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(features)
        assert logits.dtype == torch.float32
        assert total_variation(loss.teacher_targets(logits, 0), exact) < 1e-5
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the same head had autocast reached it: 100x worse
            bf16_logits = head.last_layer(F.normalize(head.mlp(features), dim=-1))
        assert total_variation(loss.teacher_targets(bf16_logits, 0), exact) > 1e-3


def test_evaluation_features_are_fp32_even_inside_autocast():
    torch.manual_seed(0)
    model = build_model("vit_ti16", img_size=32, patch_size=8).eval()
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    loader = [(images, torch.arange(4))]
    transform = lambda x: x.float() / 255  # noqa: E731
    with torch.no_grad():
        expected = F.normalize(model(transform(images)), dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # e.g. a caller in the middle of a bf16 training step
        features, labels = extract_features(model, loader, "cpu", transform)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
