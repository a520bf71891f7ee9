"""Ctrl-C and SIGTERM during training, with a real process: a tiny train_vit.py run is stopped once it has saved a
checkpoint; it must exit with 128 + the signal, print one line naming the saved epoch and the command that resumes
it (no traceback), leave no temporary file in its folder, and that very command must continue from that epoch.
The three train scripts share the handler (checkpoint.stop_cleanly), so one script stands for all."""
import shlex
import signal
import subprocess
import sys
import time

import pytest

from conftest import script_env
from minivit import checkpoint
from test_trust import ROOT, TINY_VIT

# long enough that the signal always lands mid-run; --eval_every 0: no test pass until the (never reached) end
LONG = [*TINY_VIT, "--epochs", "500", "--eval_every", "0"]


def start(argv, stdout):
    """`python argv...` from the repository root, its stdout into the file `stdout` (a pipe could fill and block)."""
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=script_env(), stdout=open(stdout, "w"),
                            stderr=subprocess.PIPE, text=True)


def stop_after_a_save(proc, ckpt, signum, newer_than=0.0):
    """Wait until `ckpt` is (re)written after `newer_than`, send `signum` -> (exit status, stderr)."""
    deadline = time.time() + 240
    while not (ckpt.exists() and ckpt.stat().st_mtime > newer_than):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f"no checkpoint (exit {proc.poll()}): {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    proc.send_signal(signum)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def check_stop_line(code, err, signum, ckpt, out):
    """The exit status, the one line, no traceback, no temp file -> (saved epoch, the resume command as argv)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 128 + signum, (code, err[-2000:])
    assert "Traceback" not in err and len(lines) == 1, err[-2000:]
    name = "SIGINT" if signum == signal.SIGINT else "SIGTERM"
    assert lines[0].startswith(f"error: stopped by ") and name in lines[0], lines[0]
    assert f"{ckpt} holds epoch " in lines[0] and "continue from there with: python train_vit.py" in lines[0]
    epoch = int(lines[0].split("holds epoch ")[1].split()[0])
    assert checkpoint.load_checkpoint(ckpt)["epoch"] == epoch  # what the line says is what is on disk
    assert not [p.name for p in out.iterdir() if "tmp" in p.name], list(out.iterdir())
    command = shlex.split(lines[0].split("with: ", 1)[1])
    assert command[:2] == ["python", "train_vit.py"] and command.count("--resume") == 1
    return epoch, [sys.executable, *command[1:]]


def test_ctrl_c_then_sigterm_say_the_saved_epoch_and_their_command_resumes_it(tmp_path):
    out = tmp_path / "run"
    ckpt = out / "checkpoint.pt"
    first = start([*LONG, "--output_dir", str(out)], tmp_path / "first.out")
    epoch, resume = check_stop_line(*stop_after_a_save(first, ckpt, signal.SIGINT), signal.SIGINT, ckpt, out)
    assert epoch >= 1
    # the printed command continues from that epoch; SIGTERM (SLURM's time limit) stops it the same way
    code, err = stop_after_a_save(start(resume[1:], tmp_path / "second.out"), ckpt, signal.SIGTERM,
                                  newer_than=ckpt.stat().st_mtime)
    assert f"resumed {ckpt} after epoch {epoch}" in (tmp_path / "second.out").read_text()
    epoch2, resume2 = check_stop_line(code, err, signal.SIGTERM, ckpt, out)
    assert epoch2 > epoch and resume2 == resume  # the same command (--resume not added twice), shown to continue


def test_a_stop_before_the_first_checkpoint_says_there_is_nothing_to_resume():
    run = checkpoint.RunOnDisk("train_dino.py", ["--arch", "vit_s8"])
    line = run.message(signal.SIGTERM)
    assert line.startswith("error: stopped by SIGTERM before this run saved a checkpoint")
    assert line.endswith("start again with: python train_dino.py --arch vit_s8")
    run.saved("runs/dino/checkpoint.pth", 3)
    assert run.message(signal.SIGINT).endswith("holds epoch 3 (saved whole), continue from there with: python "
                                               "train_dino.py --arch vit_s8 --resume")


def test_out_of_memory_mid_run_is_one_line_naming_what_resume_starts_from(tmp_path):
    """An allocation that fails inside the training loop (a batch or image size beyond the machine) ends the run in one
    line with the fix and the saved epoch, not a traceback from deep inside autograd; other errors still propagate."""
    from minivit import checkpoint

    too_big = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 68719476736 bytes.\nmore lines")
    with pytest.raises(SystemExit) as stop:
        with checkpoint.stop_cleanly("train_vit.py", ["--batch_size", "4096"]):
            raise too_big
    assert str(stop.value).startswith("error: out of memory (") and "\n" not in str(stop.value)
    assert "lower --batch_size" in str(stop.value) and "no checkpoint was saved yet" in str(stop.value)
    with pytest.raises(SystemExit) as stop:
        with checkpoint.stop_cleanly("train_vit.py", ["--batch_size", "4096"]) as run:
            run.saved(tmp_path / "checkpoint.pt", 3)
            raise MemoryError()
    assert "holds epoch 3" in str(stop.value) and "train_vit.py --batch_size 4096 --resume" in str(stop.value)
    with pytest.raises(RuntimeError, match="shape mismatch"):  # not an allocation: a real bug keeps its traceback
        with checkpoint.stop_cleanly("train_vit.py", []):
            raise RuntimeError("shape mismatch")
