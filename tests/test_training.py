"""The shared training helpers: schedules, parameter groups, precision, checkpoints, RNG state, logs, the progress line,
the NaN guard, the plot, and a real 2-process gloo run under torchrun."""
import json
import os
import random
import re
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_command, script_env
from minivit.checkpoint import load_checkpoint, make_output_dir, rng_state, save_checkpoint, set_rng_state, unwrap_model
from minivit.distributed import (all_reduce_mean, expand_nodelist, print0, seed_everything, setup_distributed,
                                 slurm_environment)
from minivit.training import (JsonlLogger, Progress, autocast_context, check_finite, cpu_has_fast_bf16,
                              cosine_schedule, count_parameters, format_time, make_grad_scaler, param_groups,
                              plot_curves, read_jsonl, resolve_precision, set_schedules)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------- schedules

@given(epochs=st.integers(1, 30), niter=st.integers(1, 40), warmup_frac=st.floats(0, 0.99),
       base=st.floats(1e-6, 1.0), final=st.floats(0.0, 1.0), start=st.floats(0.0, 1e-3))
def test_cosine_schedule_endpoints_and_monotone(epochs, niter, warmup_frac, base, final, start):
    warmup_epochs = int(warmup_frac * epochs)  # 0 .. epochs - 1
    s = cosine_schedule(base, final, epochs, niter, warmup_epochs, start)
    warmup_iters = warmup_epochs * niter
    assert s.shape == (epochs * niter,)
    assert s[-1] == final  # exactly, at the last iteration
    if warmup_iters:
        assert s[0] == start
        assert np.all(np.diff(s[:warmup_iters + 1]) * np.sign(base - start) >= -1e-12)  # warm-up moves toward base
    if epochs * niter - warmup_iters >= 2:
        assert s[warmup_iters] == base  # exactly, at the first iteration after warm-up
    cos = s[warmup_iters:]
    assert np.all(np.diff(cos) * np.sign(final - base) >= -1e-12)  # cosine part moves toward final, never back
    assert np.all((cos >= min(base, final) - 1e-12) & (cos <= max(base, final) + 1e-12))


def test_cosine_schedule_dino_momentum_and_bad_warmup():
    m = cosine_schedule(0.996, 1.0, 100, 50)  # DINO teacher momentum, sec. 3.1
    assert m[0] == 0.996 and m[-1] == 1.0 and np.all(np.diff(m) >= 0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_schedule(5e-4, 1e-6, 2, 10, warmup_epochs=10)


def test_param_groups_no_decay_on_biases_and_norms():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.cls_token = torch.nn.Parameter(torch.zeros(1, 1, 4))
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)
            self.fc = torch.nn.Linear(4, 4)
            self.norm = torch.nn.LayerNorm(4)
            self.frozen = torch.nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

    m = Tiny()
    decay, no_decay = param_groups(m, 0.04)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([m.cls_token, m.conv.weight, m.fc.weight]) and decay["weight_decay"] == 0.04
    assert ids(no_decay["params"]) == ids([m.conv.bias, m.bn.weight, m.bn.bias, m.fc.bias, m.norm.weight,
                                           m.norm.bias]) and no_decay["weight_decay"] == 0.0
    opt = torch.optim.AdamW(param_groups(m, 0.04))
    set_schedules(opt, lr=1e-3, weight_decay=0.3)
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(1e-3, 0.3), (1e-3, 0.0)]


# ----------------------------------------------------------------------------------------------- precision

def test_precision_path_on_cpu():
    a = torch.randn(4, 4)
    with autocast_context("cpu", "fp32"):
        assert (a @ a).dtype == torch.float32
    with autocast_context("cpu", "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    # the rule, not this machine: auto is bf16 on a CPU with AMX tiles, fp32 elsewhere (the test below pins both)
    assert resolve_precision("auto", torch.device("cpu")) == ("bf16" if cpu_has_fast_bf16() else "fp32")
    assert not make_grad_scaler("cpu", "bf16").is_enabled()
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        autocast_context("cpu", "fp16")
    with pytest.raises(ValueError, match="not one of"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("amx, expected", [(True, "bf16"), (False, "fp32"), (None, "fp32")])
def test_auto_precision_on_cpu_is_bf16_only_with_amx(monkeypatch, amx, expected):
    """auto: bf16 only on a CPU with AMX tiles (measured faster there); AVX2/AVX-512 without AMX emulate bf16 (15x
    slower on an AVX2 EPYC), and a torch without the probe (None) falls back to fp32. An explicit bf16 is kept."""
    if amx is None:
        monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    else:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16" and resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("auto", torch.device("mps")) == "fp32"


def test_single_process_setup_and_small_helpers(tmp_path, capsys):
    info = setup_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed, info.device_type) == (0, 1, True, False, "cpu")
    t = torch.tensor([1.5, 2.5])
    assert all_reduce_mean(t) is t
    with pytest.raises(ValueError, match="floating"):
        all_reduce_mean(torch.tensor([1]))
    print0("only rank 0")
    assert capsys.readouterr().out == "only rank 0\n"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use --device cpu"):
            setup_distributed("cuda")
    m = torch.nn.Linear(3, 2)
    assert count_parameters(m) == 8
    m.bias.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 6
    assert unwrap_model(torch.compile(m)) is m
    out = make_output_dir(tmp_path / "a" / "b")
    assert out.is_dir()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        make_output_dir(tmp_path / "f")
    assert format_time(3753.2) == "1:02:33" and format_time(0) == "0:00:00" and format_time(90061) == "25:01:01"


# ----------------------------------------------------------------------------------------------- SLURM

@pytest.mark.parametrize("nodelist, hosts", [
    ("node07", ["node07"]),
    ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
    ("gpu[8-10],cpu-a,login[1]", ["gpu8", "gpu9", "gpu10", "cpu-a", "login1"]),
    ("rack[1-2]-n[01,03]", ["rack1-n01", "rack1-n03", "rack2-n01", "rack2-n03"]),
    ("a[098-101].cluster", ["a098.cluster", "a099.cluster", "a100.cluster", "a101.cluster"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-04", "node]1[", "node[a-b]", "node[[1]]"])
def test_expand_nodelist_bad_input_names_the_list(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        expand_nodelist(bad)


def test_slurm_environment_maps_srun_variables_onto_torchruns():
    srun = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "gpu[03-06]",
            "SLURM_NODELIST": "ignored", "SLURM_JOB_ID": "1234567"}
    assert slurm_environment(srun) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "gpu03",
                                       "MASTER_PORT": str(10000 + 1234567 % 20000)}
    # what the user set wins; SLURM_NODELIST (older SLURM) when SLURM_JOB_NODELIST is absent; no job id: 29500
    mine = {**srun, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "4000"}
    assert slurm_environment(mine) == {"RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}
    old = {k: v for k, v in srun.items() if k not in ("SLURM_JOB_NODELIST", "SLURM_JOB_ID")}
    old["SLURM_NODELIST"] = "n[2-3]"
    assert slurm_environment(old)["MASTER_ADDR"] == "n2" and slurm_environment(old)["MASTER_PORT"] == "29500"
    # nothing to do: torchrun's variables already there (srun torchrun ...), no SLURM, or one task (sbatch alone)
    assert slurm_environment({**srun, "RANK": "0"}) == {}
    assert slurm_environment({"PATH": "/bin"}) == {}
    assert slurm_environment({**srun, "SLURM_NTASKS": "1"}) == {}
    with pytest.raises(ValueError, match="set MASTER_ADDR"):
        slurm_environment({k: v for k, v in srun.items() if "NODELIST" not in k})


# ----------------------------------------------------------------------------------------------- checkpoints

def _state(value=1.0, kind="vit", arch="vit_ti16"):
    return {"kind": kind, "model": {"w": torch.full((3,), value)}, "epoch": 2, "args": {"arch": arch, "lr": 5e-4}}


def test_atomic_save_survives_a_failure_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, _state(1.0))

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(SystemExit, match="^error: could not write .*: disk full; the last good checkpoint is kept"):
        save_checkpoint(path, _state(2.0))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))  # the old one, whole


def test_save_rejects_what_cannot_be_loaded_back(tmp_path):
    with pytest.raises(ValueError, match="'kind'"):
        save_checkpoint(tmp_path / "c.pt", {"model": {}})
    with pytest.raises(TypeError, match=r"state\['args'\]\['out'\] is a PosixPath"):
        save_checkpoint(tmp_path / "c.pt", {"kind": "vit", "args": {"out": tmp_path}})
    assert not os.listdir(tmp_path)


def test_a_real_training_state_round_trips(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = torch.optim.AdamW(param_groups(model, 0.04), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"kind": "dino", "model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
             "scaler": make_grad_scaler("cpu", "fp32").state_dict(), "args": {"arch": "vit_ti16", "crops": (2, 8)},
             "rng": rng_state()}
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt", kind="dino", arch="vit_ti16")  # weights_only=True accepts all of it
    opt2 = torch.optim.AdamW(param_groups(model, 0.04), lr=1e-3)
    opt2.load_state_dict(back["optimizer"])
    assert torch.equal(opt2.state[model[0].weight]["exp_avg"], opt.state[model[0].weight]["exp_avg"])
    assert back["args"]["crops"] == (2, 8) and back["epoch"] == 3


def test_load_errors_are_one_clear_line(tmp_path):
    good = tmp_path / "good.pt"
    save_checkpoint(good, _state())
    assert load_checkpoint(good, kind="vit", arch="vit_ti16")["epoch"] == 2
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:200])
    torch.save({"w": torch.zeros(2)}, tmp_path / "weights.pt")  # a bare state_dict
    cases = [
        (FileNotFoundError, tmp_path / "missing.pt", {}, "no checkpoint at"),
        (ValueError, tmp_path / "garbage.pt", {}, "not a readable PyTorch file"),
        (ValueError, tmp_path / "truncated.pt", {}, "not a readable PyTorch file"),
        (ValueError, tmp_path / "weights.pt", {}, "not a minivit training checkpoint"),
        (ValueError, good, {"kind": "dino"}, "is a 'vit' checkpoint .*train_vit.py"),
        (ValueError, good, {"arch": "vit_s16"}, "holds a vit_ti16 model but --arch is vit_s16"),
    ]
    for err, path, kw, msg in cases:
        with pytest.raises(err, match=msg) as info:
            load_checkpoint(path, **kw)
        assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_rng_round_trip_reproduces_the_same_numbers(tmp_path):
    seed_everything(7)
    g = torch.Generator().manual_seed(3)
    torch.randn(5), np.random.rand(3), random.random(), np.random.randn(), torch.rand(2, generator=g)  # move on a bit

    def draw():
        return (random.random(), np.random.rand(4).tolist(), np.random.randn(), torch.randn(6).tolist(),
                torch.rand(3, generator=g).tolist())

    save_checkpoint(tmp_path / "c.pt", {"kind": "dino", "rng": rng_state({"augment": g})})
    first = draw()
    seed_everything(123)  # a fresh process would start from some other state
    g.manual_seed(99)
    assert set_rng_state(load_checkpoint(tmp_path / "c.pt")["rng"], {"augment": g})
    assert draw() == first
    assert not set_rng_state(rng_state() * 2)  # saved by 2 processes: left alone, reported


# ----------------------------------------------------------------------------------------------- logs and progress

def test_jsonl_round_trip(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    log.log(epoch=0, train_loss=torch.tensor(2.5), lr=np.float64(1e-3))
    log.log({"epoch": 1, "knn_top1": 12.5}, note="resumed")
    assert read_jsonl(tmp_path / "log.jsonl") == [{"epoch": 0, "train_loss": 2.5, "lr": 1e-3},
                                                 {"epoch": 1, "knn_top1": 12.5, "note": "resumed"}]


def test_check_finite(tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    assert check_finite(torch.tensor(1.25), 0, 0, ckpt) == 1.25
    with pytest.raises(SystemExit, match=r"loss is nan at epoch 4 step 121; no checkpoint was saved yet"):
        check_finite(torch.tensor(float("nan")), 3, 120, ckpt)
    save_checkpoint(ckpt, _state())
    before = ckpt.read_bytes()
    with pytest.raises(SystemExit, match=rf"loss is inf .* kept at {re.escape(str(ckpt))}; try a lower lr"):
        check_finite(float("inf"), 0, 5, ckpt)
    assert ckpt.read_bytes() == before


def test_progress_line(capsys):
    p = Progress(epochs=3, iters_per_epoch=5, every=2)
    assert p.step(0, 0, loss=1.0, lr=1e-3, images=64) is None
    line = p.step(0, 1, loss=2.0, lr=1e-3, images=64)
    pattern = r"ep 1/3 it 2/5 loss 1\.5000 lr 1\.0e-03 \d+ img/s elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d"
    assert re.fullmatch(pattern, line)
    assert capsys.readouterr().out == line + "\n"
    assert p.step(0, 2, loss=3.0, lr=1e-3, images=64) is None
    assert p.step(0, 3, loss=3.0, lr=1e-3, images=64) is not None
    assert p.step(0, 4, loss=3.0, lr=1e-3, images=64, wd=0.04).endswith(" wd 0.04")  # the epoch's last iteration


def test_plot_curves_writes_a_png(tmp_path):
    log = JsonlLogger(tmp_path / "log.jsonl")
    for e in range(4):
        log.log(epoch=e, train_loss=3.0 - e * 0.5, **({"knn_top1": 10.0 * e} if e % 2 else {}))
    plot_curves(tmp_path / "log.jsonl", tmp_path / "curves.png", ["train_loss", "knn_top1"])
    from PIL import Image
    with Image.open(tmp_path / "curves.png") as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100


# ----------------------------------------------------------------------------------------------- torchrun

DIST_SCRIPT = """
import json, random, sys
import torch
from minivit.checkpoint import rng_state, set_rng_state
from minivit.distributed import all_reduce_mean, cleanup_distributed, print0, seed_everything, setup_distributed
from minivit.training import check_finite

info = setup_distributed("cpu")
seed_everything(0, info.rank)
mean = all_reduce_mean(torch.tensor([float(info.rank), 10.0 * info.rank])).tolist()
print0("hello from rank", info.rank)
states = rng_state()
first = torch.randn(3).tolist() + [random.random()]
restored = set_rng_state(states)
again = torch.randn(3).tolist() + [random.random()]
try:  # a NaN on rank 1 only must stop both ranks
    check_finite(torch.tensor(float("nan") if info.rank == 1 else 1.0), 0, 0, "nowhere.pt")
    stopped = False
except SystemExit:
    stopped = True
with open(f"{sys.argv[1]}/rank{info.rank}.json", "w") as f:
    json.dump({"mean": mean, "world": info.world_size, "dist": info.distributed, "main": info.is_main,
               "n_states": len(states), "restored": restored, "same": first == again, "first": first,
               "stopped": stopped}, f)
cleanup_distributed()
"""


def test_two_process_gloo_run(tmp_path):
    script = tmp_path / "dist_check.py"
    script.write_text(textwrap.dedent(DIST_SCRIPT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tmp_path)]
    proc = run_command(cmd, timeout=300, env=script_env(PYTHONPATH=ROOT))
    assert proc.stdout.count("hello from rank") == 1 and "hello from rank 0" in proc.stdout
    r = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for i in range(2):
        assert r[i]["mean"] == [0.5, 5.0] and r[i]["world"] == 2 and r[i]["dist"] and r[i]["main"] == (i == 0)
        assert r[i]["n_states"] == 2 and r[i]["restored"] and r[i]["same"] and r[i]["stopped"]
    assert r[0]["first"] != r[1]["first"]  # seed + rank: each process draws its own numbers


def test_keep_freed_memory_applies_on_linux_glibc_and_tensors_still_work():
    import platform
    import sys
    from minivit.training import keep_freed_memory
    applied = keep_freed_memory()
    assert applied == (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc")
    x = torch.ones(4_000_000)  # 16 MB: above glibc's default mmap threshold, now from the heap
    del x
    assert torch.ones(4_000_000).sum().item() == 4_000_000
