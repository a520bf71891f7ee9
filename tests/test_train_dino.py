"""train_dino.py end to end, in subprocesses with tiny settings (ViT-Ti/16 on 16 px crops, 64 prototypes, 2 steps
an epoch): smoke runs for a ViT and a ResNet, the official checkpoint layout, a 2-process torchrun run against a
1-process run with the same global batch, exact resume, and one-line errors."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_dino
from conftest import run_command, script_env
from minivit.tools.dino_figure import attention_pair, knn_curve, main as dino_main
from minivit.models import build_model, load_pretrained

pytestmark = pytest.mark.usefixtures("reference_kernels")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_ti16", "--global_crop_size", "16", "--local_crop_size", "16", "--out_dim", "64",
        "--warmup_teacher_temp_epochs", "0", "--local_crops_number", "2", "--batch_size_per_gpu", "4",
        "--iters_per_epoch", "2", "--epochs", "1", "--warmup_epochs", "0", "--log_every", "1"]
OFFICIAL_KEYS = {"student", "teacher", "optimizer", "epoch", "args", "dino_loss", "fp16_scaler"}


def run(args, launcher=(sys.executable,), timeout=300):
    """Run train_dino.py with args; fail the test with the command, its run time and its output if it does not exit
    0 in time."""
    cmd = [*launcher, str(ROOT / "train_dino.py"), *map(str, args)]
    return run_command(cmd, timeout=timeout, cwd=ROOT, env=script_env()).stdout


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory):
    """One 2-step ViT run with the offline k-NN, both baselines, the attention maps and the KoLeo term."""
    out = tmp_path_factory.mktemp("vit")
    stdout = run([*TINY, "--output_dir", out, "--eval_every", "1", "--koleo_weight", "0.3"])
    return out, stdout


def test_vit_smoke_run_writes_the_official_layout(vit_run):
    out, stdout = vit_run
    state = load(out / "checkpoint.pth")
    assert OFFICIAL_KEYS <= set(state) and state["kind"] == "dino" and state["epoch"] == 1
    assert all(k.startswith(("module.backbone.", "module.head.")) for k in state["student"])
    assert all(k.startswith(("backbone.", "head.")) for k in state["teacher"])
    assert {"head.last_layer.weight_g", "head.last_layer.weight_v", "head.mlp.0.weight"} <= set(state["teacher"])
    assert state["dino_loss"]["center"].shape == (1, 64) and state["dino_loss"]["center"].abs().sum() > 0
    assert state["args"]["arch"] == "vit_ti16" and state["optimizer"]["state"]
    # the teacher moved away from the student (EMA of 2 steps), so the two are told apart below
    assert not torch.equal(state["teacher"]["backbone.cls_token"], state["student"]["module.backbone.cls_token"])
    record = [json.loads(line) for line in open(out / "log.jsonl")][-1]
    assert {"train_loss", "knn_top1", "teacher_entropy", "kl_to_uniform", "attn_jaccard"} <= set(record)
    assert (out / "curves.png").stat().st_size > 0 and len(list((out / "attention").glob("*.png"))) == 4
    assert sorted(p.name for p in (out / "attention").glob("*.pt")) == ["ep0000.pt", "ep0001.pt"]  # before, after
    assert "random-init vit_ti16" in stdout and "raw pixels" in stdout and "the CPU preset" in stdout
    # epoch 0, one record: the random-init teacher's k-NN and Jaccard beside raw pixels' k-NN
    start = [json.loads(line) for line in open(out / "log.jsonl")][0]
    assert start["epoch"] == 0 and {"knn_top1", "knn_raw_pixels", "attn_jaccard"} <= set(start)
    assert 0 < start["attn_jaccard"] <= 100 and f"random-init vit_ti16 Jaccard {start['attn_jaccard']:.1f}" in stdout
    assert torch.load(out / "checkpoint.pth", weights_only=True)["knn_baselines"]["random_init_jaccard"] == \
        start["attn_jaccard"]
    assert any(line.startswith("ep 1/1 it 1/2") and " koleo " in line for line in stdout.splitlines())


def test_dino_figure_from_the_run_folder(vit_run, tmp_path):
    out, _ = vit_run
    points, baselines = knn_curve(out)
    assert points[0] == (0.0, baselines["random_init"]) and len(points) == 2 and set(baselines) == {
        "random_init", "raw_pixels"}
    images, start, end, epochs = attention_pair(out, images=2)
    assert images.shape == (2, 3, 64, 64) and start.shape == end.shape == (2, 64, 64) and epochs == [0, 1]
    dino_main([f"{out}:tiny", str(out), "--out", str(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_teacher_backbone_file_loads_strictly(vit_run):
    out, _ = vit_run
    backbone = load(out / "teacher_backbone.pth")
    assert not any(k.startswith(("module.", "backbone.", "head.")) for k in backbone)  # plain backbone names
    model = build_model("vit_ti16", img_size=16)
    report = load_pretrained(model, out / "teacher_backbone.pth")
    assert report.loaded == len(model.state_dict()) and not report.dropped and not report.head_kept_init
    teacher = load(out / "checkpoint.pth")["teacher"]
    assert torch.equal(model.pos_embed, teacher["backbone.pos_embed"])
    # the default 224 px model loads it too, its position table resized
    assert load_pretrained(build_model("vit_ti16"), out / "teacher_backbone.pth").resized
    # the same tensors as safetensors (no pickle)
    again = build_model("vit_ti16", img_size=16)
    assert load_pretrained(again, out / "teacher_backbone.safetensors").loaded == report.loaded
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_load_pretrained_picks_the_teacher_of_our_checkpoint(vit_run):
    out, _ = vit_run
    model = build_model("vit_ti16", img_size=16)
    report = load_pretrained(model, out / "checkpoint.pth")
    assert report.source == "teacher"
    state = load(out / "checkpoint.pth")
    assert torch.equal(model.cls_token, state["teacher"]["backbone.cls_token"])


def test_resnet_smoke_run(tmp_path):
    run(["--arch", "resnet18", *TINY[2:], "--global_crop_size", "32", "--knn_data", "none", "--output_dir", tmp_path])
    state = load(tmp_path / "checkpoint.pth")
    assert OFFICIAL_KEYS <= set(state)
    assert "module.backbone.layer1.0.bn1.running_mean" in state["student"]
    model = build_model("resnet18")
    report = load_pretrained(model, tmp_path / "teacher_backbone.pth")
    assert report.loaded == len(model.state_dict()) and not report.dropped and not report.head_kept_init


def test_two_processes_match_one_process_on_the_same_global_batch(tmp_path):
    """1 step, global batch 8: torchrun 2 x 4 against 1 x 8. Equal only if the processes shard the same 8 images,
    crop each image alike (--seed_per_image seeds the crops per image, not per process), start from the same weights
    and all-reduce the centre and the gradients. No drop path (its masks are drawn per process) and SGD (AdamW's
    first step is lr * sign(g): a sign flip of a ~0 gradient element would move a weight by a whole lr)."""
    common = [*TINY[:TINY.index("--batch_size_per_gpu")], "--iters_per_epoch", "1", "--epochs", "1",
              "--warmup_epochs", "0", "--seed_per_image", "--drop_path_rate", "0", "--optimizer", "sgd",
              "--lr", "0.5", "--knn_data", "none"]
    run([*common, "--batch_size_per_gpu", 8, "--output_dir", tmp_path / "one"])
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")
    run([*common, "--batch_size_per_gpu", 4, "--output_dir", tmp_path / "two"], launcher=torchrun)
    one, two = load(tmp_path / "one" / "checkpoint.pth"), load(tmp_path / "two" / "checkpoint.pth")
    assert len(two["rng"]) == 2  # really two processes
    torch.testing.assert_close(two["dino_loss"]["center"], one["dino_loss"]["center"], rtol=1e-5, atol=1e-6)
    for key, value in one["student"].items():
        torch.testing.assert_close(two["student"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    losses = [next(r["train_loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl")) if "train_loss" in r)
              for d in ("one", "two")]  # after the epoch-0 record of the random-init attention
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_resume_is_exact(tmp_path):
    """2 epochs uninterrupted == epoch 1 (its checkpoint0000.pth, what an interrupted run leaves) + resume: the
    resumed process restores weights, optimizer, centre and every random state, k-NN evaluations included."""
    assert_resume_is_exact(tmp_path, [*TINY, "--epochs", 2, "--saveckp_freq", 1, "--eval_every", 1, "--knn_data",
                                      "digits", "--koleo_weight", 0.1])


def test_resume_is_exact_on_a_folder_of_photos(tmp_path):
    """The same on whole photos of mixed sizes and orientations (data.Photos batches, crops over each photo)."""
    from minivit.tools.photo_folder import photo
    for k, size in enumerate([(40, 30), (30, 40), (50, 33), (24, 24)] * 2):
        (tmp_path / "photos" / f"c{k % 2}").mkdir(parents=True, exist_ok=True)
        photo(0, k, size).save(tmp_path / "photos" / f"c{k % 2}" / f"{k}.jpg", quality=90)
    assert_resume_is_exact(tmp_path, [*TINY, "--epochs", 2, "--saveckp_freq", 1, "--data", tmp_path / "photos",
                                      "--knn_data", "none", "--num_workers", 0])


def assert_resume_is_exact(tmp_path, args):
    """Run args for 2 epochs, and again from the first epoch's checkpoint with --resume: the same final state."""
    run([*args, "--output_dir", tmp_path / "full"])
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint0000.pth", tmp_path / "resumed" / "checkpoint.pth")
    run([*args, "--output_dir", tmp_path / "resumed", "--resume"])
    full, resumed = load(tmp_path / "full" / "checkpoint.pth"), load(tmp_path / "resumed" / "checkpoint.pth")
    assert full["epoch"] == resumed["epoch"] == 2
    for part in ("student", "teacher", "dino_loss"):
        for key, value in full[part].items():
            assert torch.equal(resumed[part][key], value), f"{part}.{key}"


def test_defaults_follow_the_official_recipe():
    args = train_dino.parse_args(["--data", "/path/to/imagenet/train"])
    official = dict(out_dim=65536, norm_last_layer=True, use_bn_in_head=False, momentum_teacher=0.996,
                    warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0, lr=0.0005,
                    min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0,
                    freeze_last_layer=1, drop_path_rate=0.1, batch_size_per_gpu=64, epochs=100, optimizer="adamw",
                    global_crop_size=224, local_crop_size=96, local_crops_number=8, koleo_weight=0.0)
    assert {k: getattr(args, k) for k in official} == official
    assert tuple(args.global_crops_scale) == (0.4, 1.0) and tuple(args.local_crops_scale) == (0.05, 0.4)


@pytest.mark.parametrize("cuda, device, preset", [(False, "auto", "cpu"), (True, "auto", "gpu"), (True, "cpu", "cpu"),
                                                  (False, "cuda", "gpu"), (True, "cuda:1", "gpu")])
def test_offline_preset_follows_the_machine_and_flags_win(monkeypatch, cuda, device, preset):
    """No --data: the GPU preset when the run is on CUDA (auto with CUDA present, or asked for), else the CPU one;
    every preset value becomes a default, a flag given still wins, and the printed line names both."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = train_dino.parse_args(["--arch", "vit_s8", "--device", device, "--out_dim", "300", "--knn_images", "9", "8"])
    values = train_dino.PRESETS[preset]
    assert args.preset == preset and args.out_dim == 300 and args.knn_images == [9, 8]
    assert all(getattr(args, k) == v for k, v in values.items() if k not in ("out_dim", "knn_images"))
    line = train_dino.preset_line(args)
    assert f"the {preset.upper()} preset" in line and f"CUDA {'present' if cuda else 'absent'}" in line
    assert f"global_crop_size={values['global_crop_size']}" in line and f"lr={values['lr']}," in line
    assert "out_dim" not in line and "knn_images" not in line  # given on the command line: not the preset's
    assert train_dino.parse_args(["--data", "digits"]).preset is None  # data given: no preset


def test_gpu_preset_is_bigger_than_the_cpu_one():
    cpu, gpu = train_dino.OFFLINE_CPU, train_dino.OFFLINE_GPU
    assert gpu["global_crop_size"] >= 2 * cpu["global_crop_size"] and gpu["global_crop_size"] % 8 == 0
    assert gpu["batch_size_per_gpu"] * gpu["epochs"] * gpu["iters_per_epoch"] > \
        10 * cpu["batch_size_per_gpu"] * cpu["epochs"] * cpu["iters_per_epoch"]


@pytest.mark.parametrize("argv, message", [
    (["--arch", "vit_q7"], "unknown arch 'vit_q7'; choose one of: vit_ti16"),
    (["--data", "/no/such/folder"], "is not a folder"),
    (["--local_crop_size", "20"], "not a multiple of vit_s16's patch size 16"),
])
def test_bad_input_is_a_one_line_error(argv, message, tmp_path):
    with pytest.raises(SystemExit) as error:
        train_dino.main([*argv, "--output_dir", str(tmp_path)])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_resume_with_another_models_checkpoint_is_refused(vit_run, tmp_path):
    out, _ = vit_run
    shutil.copy(out / "checkpoint.pth", tmp_path / "checkpoint.pth")
    with pytest.raises(SystemExit, match="holds a vit_ti16 model but --arch is resnet18; pass --arch vit_ti16"):
        train_dino.main([*TINY[2:], "--arch", "resnet18", "--resume", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="--out_dim 64"):
        train_dino.main([*TINY[:TINY.index("--out_dim")], "--resume", "--output_dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="exists: add --resume"):
        train_dino.main([*TINY, "--output_dir", str(tmp_path)])


def test_bad_arch_from_the_command_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train_dino.py"), "--arch", "vit_q7", "--output_dir",
                           str(tmp_path)], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and proc.stderr.strip().count("\n") == 0 and "vit_s8" in proc.stderr
