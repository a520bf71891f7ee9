"""train_vit.py, train_resnet.py and what they share (minivit/supervised.py): smoke runs of both scripts, an exact
resume, a 2-process torchrun run, one-line errors for bad input, and unit tests of mixup/cutmix, subset, evaluate and
the step loop."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_command, script_env
from minivit import checkpoint, cli, training
from minivit.data import build_dataset, describe
from minivit.supervised import cutmix, evaluate, mix_batch, mixup, subset, train_one_epoch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the smallest settings that still run every part of a script: 8 px digits, 2 steps of 8 images per epoch
TINY = ["--image_size", "8", "--load_size", "8", "--batch_size", "8", "--max_steps_per_epoch", "2",
        "--warmup_epochs", "0", "--log_every", "1"]
TINY_VIT = TINY + ["--patch_size", "4"]
RESULT_KEYS = {"arch", "test_top1", "test_top5", "train_images_per_s", "params", "epochs", "train_fraction", "data"}


def run(args, timeout=300):
    """Run `python args...` from the repository root; -> CompletedProcess with text stdout/stderr (a timeout fails
    the test with the command and its run time)."""
    return run_command([sys.executable, *args], timeout=timeout, check=False, cwd=ROOT, env=script_env())


def check_finished_run(proc, out, arch, epochs):
    """The files and the last line every finished run leaves behind."""
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("checkpoint.pt", "log.jsonl", "curves.png", "results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    assert RESULT_KEYS <= set(results)
    assert results["arch"] == arch and results["epochs"] == epochs and results["data"] == "digits"
    assert 0 <= results["test_top1"] <= results["test_top5"] <= 100 and results["train_images_per_s"] > 0
    log = training.read_jsonl(out / "log.jsonl")
    assert [r["epoch"] for r in log] == list(range(1, epochs + 1))
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"test top-1 \d+\.\d% top-5 \d+\.\d%", last), last
    assert last == f"test top-1 {results['test_top1']:.1f}% top-5 {results['test_top5']:.1f}%"
    return results


# ------------------------------------------------------------------------------------------------ script runs


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resnet")
    proc = run(["train_resnet.py", *TINY, "--epochs", "2", "--output_dir", str(out)])
    return proc, out


def test_resnet_smoke_run(resnet_run):
    proc, out = resnet_run
    results = check_finished_run(proc, out, "resnet18", epochs=2)
    assert results["params"] == 11_173_962  # ResNet-18 with a 10-class fc and the 3x3 stem
    assert "offline defaults:" in proc.stdout and "--small_stem " in proc.stdout
    state = checkpoint.load_checkpoint(out / "checkpoint.pt", kind="resnet", arch="resnet18")
    assert state["epoch"] == 2 and state["model"]["conv1.weight"].shape == (64, 3, 3, 3)


def test_vit_smoke_run(tmp_path):
    proc = run(["train_vit.py", *TINY_VIT, "--epochs", "2", "--output_dir", str(tmp_path),
                "--mixup", "0.8", "--cutmix", "1.0", "--clip_grad", "1.0", "--train_fraction", "0.5"])
    results = check_finished_run(proc, tmp_path, "vit_ti16", epochs=2)
    per_class = np.bincount(build_dataset("digits", "train", 8).targets)
    assert results["train_fraction"] == 0.5 and results["train_images"] == sum(round(n / 2) for n in per_class)
    state = checkpoint.load_checkpoint(tmp_path / "checkpoint.pt", kind="vit")
    assert state["model"]["patch_embed.proj.weight"].shape == (192, 3, 4, 4)


def test_vit_resume_is_exact(tmp_path):
    """2 epochs in one go == 1 epoch, stop, --resume for the 2nd: same weights and optimizer state, bit for bit.
    Drop path, mixup/cutmix and the crops all draw random numbers, so every random stream must be restored."""
    common = ["train_vit.py", *TINY_VIT, "--epochs", "2", "--drop_path", "0.1", "--mixup", "0.8", "--cutmix", "1.0"]
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert run([*common, "--output_dir", str(whole)]).returncode == 0
    first = run([*common, "--output_dir", str(split), "--stop_after", "1"])
    assert first.returncode == 0 and "continue with --resume" in first.stdout
    assert not (split / "results.json").exists()
    second = run([*common, "--output_dir", str(split), "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed" in second.stdout
    a, b = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (whole, split))
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for p, q in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(p[k], q[k]) for k in p)
    assert training.read_jsonl(whole / "log.jsonl") != [] and \
        [r["train_loss"] for r in training.read_jsonl(whole / "log.jsonl")] == \
        [r["train_loss"] for r in training.read_jsonl(split / "log.jsonl")]


def test_vit_torchrun_two_processes(tmp_path):
    proc = run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_vit.py", *TINY_VIT,
                "--epochs", "1", "--output_dir", str(tmp_path)], timeout=300)
    results = check_finished_run(proc, tmp_path, "vit_ti16", epochs=1)
    assert results["world_size"] == 2
    assert proc.stdout.count("test top-1") == 1  # rank 1 prints nothing
    log = training.read_jsonl(tmp_path / "log.jsonl")
    assert log[0]["train_images"] == 2 * 2 * 8  # 2 steps of 8 images on each of 2 processes


def test_vit_srun_two_processes_without_torchrun(tmp_path):
    """What `srun --ntasks=2 python train_vit.py` starts: two processes that know only SLURM's variables (rank, local
    rank, task count, node list) join one gloo group through MASTER_ADDR = the node list's first host."""
    with socket.socket() as s:  # a free port: MASTER_PORT's default (from the job id) could be taken here
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "train_vit.py", *TINY_VIT, "--epochs", "1", "--output_dir", str(tmp_path)]
    env = {k: v for k, v in script_env().items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")}
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**env, "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i), "SLURM_NTASKS": "2",
                                   "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "7", "MASTER_PORT": str(port)})
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"timed out after {time.perf_counter() - start:.0f} s: 2 x SLURM_PROCID=i {' '.join(cmd)}")
    seconds = time.perf_counter() - start
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, f"exit {p.returncode} after {seconds:.1f} s: {' '.join(cmd)}\n" \
            f"{out[-2000:]}\n{err[-2000:]}"
    proc = subprocess.CompletedProcess(cmd, 0, outputs[0][0], outputs[0][1])
    results = check_finished_run(proc, tmp_path, "vit_ti16", epochs=1)
    assert results["world_size"] == 2 and outputs[1][0] == ""  # rank 1 prints nothing
    log = training.read_jsonl(tmp_path / "log.jsonl")
    assert log[0]["train_images"] == 2 * 2 * 8  # 2 steps of 8 images on each of 2 processes


def one_line_error(proc):
    """The message of a script that stopped on bad input: exit code 1, one line on stderr, no traceback."""
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("script", ["train_vit.py", "train_resnet.py"])
def test_unknown_arch_lists_the_valid_names(script, tmp_path):
    line = one_line_error(run([script, "--arch", "vit_xxl", "--output_dir", str(tmp_path)]))
    assert "vit_xxl" in line and "vit_s16" in line and "resnet50" in line


def test_arch_of_the_other_family_is_refused(tmp_path):
    line = one_line_error(run(["train_vit.py", "--arch", "resnet18", "--output_dir", str(tmp_path)]))
    assert "train_resnet.py" in line


def test_missing_data_folder(tmp_path):
    line = one_line_error(run(["train_resnet.py", "--data", str(tmp_path / "nowhere"), "--output_dir",
                               str(tmp_path / "out")]))
    assert "nowhere" in line and "not a folder" in line


def test_resume_with_the_other_scripts_checkpoint(resnet_run):
    _, out = resnet_run
    line = one_line_error(run(["train_vit.py", *TINY_VIT, "--output_dir", str(out), "--resume"]))
    assert "'resnet' checkpoint" in line and "train_resnet.py" in line


def test_resume_with_other_model_flags(resnet_run):
    _, out = resnet_run
    line = one_line_error(run(["train_resnet.py", *TINY, "--epochs", "2", "--no-small_stem", "--output_dir",
                               str(out), "--resume"]))
    assert "--small_stem True (now False)" in line


# ------------------------------------------------------------------------------------------------ mixup / cutmix


@given(B=st.integers(1, 6), H=st.integers(1, 9), W=st.integers(1, 9), alpha=st.floats(0.1, 2.0),
       seed=st.integers(0, 2 ** 16))
def test_mixup_blends_images_and_labels_alike(B, H, W, alpha, seed):
    labels = torch.arange(B)  # every image its own class; its partner is image B - 1 - i
    images = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, H, W)  # image i is all i
    mixed, targets = mixup(images, labels, B, alpha, torch.Generator().manual_seed(seed))
    assert mixed.shape == images.shape and targets.shape == (B, B)
    torch.testing.assert_close(targets.sum(1), torch.ones(B))
    for i in range(B):  # image i = lam i + (1 - lam) (B - 1 - i), and its target puts lam on i
        expected = targets[i, i] * i + targets[i, B - 1 - i] * (B - 1 - i) if B - 1 - i != i else torch.tensor(i)
        torch.testing.assert_close(mixed[i], torch.full_like(mixed[i], float(expected)))
    again, _ = mixup(images, labels, B, alpha, torch.Generator().manual_seed(seed))
    assert torch.equal(mixed, again)  # the generator decides everything


@given(B=st.integers(2, 6), H=st.integers(1, 12), W=st.integers(1, 12), alpha=st.floats(0.1, 2.0),
       seed=st.integers(0, 2 ** 16))
def test_cutmix_label_weights_are_pixel_shares(B, H, W, alpha, seed):
    labels = torch.arange(B)  # every image its own class
    images = torch.arange(B, dtype=torch.float32).view(B, 1, 1, 1).expand(B, 3, H, W).contiguous()
    mixed, targets = cutmix(images, labels, B, alpha, torch.Generator().manual_seed(seed))
    torch.testing.assert_close(targets.sum(1), torch.ones(B))
    for i in range(B):
        own = (mixed[i] == i).float().mean()  # share of image i's own pixels
        torch.testing.assert_close(targets[i, i], own)
        if B - 1 - i != i:  # the middle image of an odd batch is its own partner
            torch.testing.assert_close(targets[i, B - 1 - i], 1 - own)
    assert torch.equal(images[:, :, 0, 0], torch.arange(B, dtype=torch.float32)[:, None].expand(B, 3))  # no in-place


def test_mix_batch_choices():
    images, labels, g = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(0)
    same_images, same_labels = mix_batch(images, labels, 4, 0.0, 0.0, g)
    assert same_images is images and same_labels is labels  # off: hard labels, untouched images
    _, targets = mix_batch(images, labels, 4, 0.8, 0.0, g)
    assert targets.shape == (4, 4) and torch.allclose(targets.sum(1), torch.ones(4))
    cuts = 0
    for _ in range(40):
        mixed, _ = mix_batch(images, labels, 4, 0.8, 1.0, g)
        cuts += bool(((mixed == images) | (mixed == images.flip(0))).all())  # cutmix copies pixels, mixup blends
    assert 5 < cuts < 35  # about half of the batches each


# ------------------------------------------------------------------------------------------------ subset


def test_subset_is_deterministic_balanced_and_sized():
    train = build_dataset("digits", "train", 8)
    part = subset(train, 0.1, seed=0)
    counts = np.bincount(train.targets, minlength=10)
    assert len(part) == sum(max(1, round(0.1 * n)) for n in counts)
    assert np.array_equal(np.bincount(part.targets, minlength=10), [max(1, round(0.1 * n)) for n in counts])
    assert part.indices == subset(train, 0.1, seed=0).indices  # same seed, same images
    assert part.indices != subset(train, 0.1, seed=1).indices
    assert part.indices == sorted(set(part.indices))
    image, label = part[3]
    assert label == train.targets[part.indices[3]] and torch.equal(image, train[part.indices[3]][0])
    assert describe(part).startswith(f"digits/train[10%]: {len(part)} images, 10 classes, 8x8 px")
    assert subset(train, 1.0) is train
    assert len(subset(train, 1e-6)) == 10  # at least one image of each class
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="train_fraction"):
            subset(train, bad)


# ------------------------------------------------------------------------------------------------ evaluate, steps


class Echo(torch.nn.Module):
    """A 'model' whose logits are written in its input: (B, 1, 1, K) -> (B, K)."""

    def forward(self, x):
        return x[:, 0, 0]


def test_evaluate_known_top1_top5_and_loss():
    K, ranks = 10, [0, 0, 1, 4, 5, 9, 0, 3, 7, 2, 0]  # where the true label sits in each image's ranking
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, K, (len(ranks),), generator=g)
    logits = torch.empty(len(ranks), K)
    for i, (y, r) in enumerate(zip(labels.tolist(), ranks)):
        order = [c for c in torch.randperm(K, generator=g).tolist() if c != y]
        order.insert(r, y)  # classes from best to worst
        logits[i, order] = torch.arange(K, 0, -1, dtype=torch.float32)
    batches = [(logits[:4, None, None], labels[:4]), (logits[4:, None, None], labels[4:])]  # two batches
    model = Echo().train()
    stats = evaluate(model, batches, lambda x: x, torch.device("cpu"), "fp32")
    assert stats["top1"] == pytest.approx(100 * 4 / 11) and stats["top5"] == pytest.approx(100 * 8 / 11)
    assert stats["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert stats["images"] == 11 and model.training  # the model's mode is restored


def test_train_one_epoch_follows_the_schedule_and_stops_at_steps(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    optimizer = torch.optim.SGD(training.param_groups(model, 0.1), lr=0.0)
    loader = [(torch.randint(0, 256, (4, 3, 2, 2), dtype=torch.uint8), torch.randint(0, 3, (4,))) for _ in range(5)]
    lr_schedule, wd_schedule = np.linspace(0.1, 0.0, 2 * 3), np.linspace(0.0, 0.5, 2 * 3)
    stats = train_one_epoch(model, loader, optimizer, training.make_grad_scaler("cpu", "fp32"),
                            lambda x, g: x.float() / 255, torch.Generator(), lr_schedule, wd_schedule, epoch=1,
                            steps=3, device=torch.device("cpu"), precision="fp32", num_classes=3,
                            checkpoint_path=tmp_path / "none.pt")
    assert stats["images"] == 12 and np.isfinite(stats["loss"])  # 3 of the 5 batches
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["decay"]["lr"] == lr_schedule[5] and groups["decay"]["weight_decay"] == wd_schedule[5]
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_train_one_epoch_stops_on_nan(tmp_path):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    with torch.no_grad():
        model[1].weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = [(torch.zeros(2, 3, 2, 2, dtype=torch.uint8), torch.tensor([0, 1]))]
    with pytest.raises(SystemExit, match="loss is nan at epoch 1 step 1"):
        train_one_epoch(model, loader, optimizer, training.make_grad_scaler("cpu", "fp32"),
                        lambda x, g: x.float(), None, [0.1], [0.0], 0, 1, device=torch.device("cpu"),
                        precision="fp32", num_classes=3, checkpoint_path=tmp_path / "none.pt")


def test_cli_errors_turn_value_errors_into_one_line_exits():
    with pytest.raises(SystemExit, match="^error: bad flag$"):
        with cli.errors():
            raise ValueError("bad flag")
    with pytest.raises(KeyError):  # programming errors keep their traceback
        with cli.errors():
            raise KeyError("x")
