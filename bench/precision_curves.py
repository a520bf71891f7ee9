"""DINO's loss curve in bf16 against fp16 autocast, next to the run-to-run noise of two bf16 seeds (issue 24).

minivit trains in bf16 autocast (fp32's exponent range: no loss scaling); the official main_dino.py defaults to fp16
with a GradScaler (--use_fp16 True), and its authors trained the patch-8 models in fp32 because fp16 was unstable
there. This runs train_dino.py several times as it is (a subprocess each, the offline preset unless --train_args
says otherwise) and prints the loss curves side by side: the reference precision with two seeds, whose difference
is the run-to-run noise (initial weights, data order, crops and drop path all change with the seed), and every
other precision with the first seed. A precision is as good as the reference when its curve stays within that
noise. The points are train_dino.py's progress lines (the mean loss of every --log_every steps). Each run is a
whole short run of --steps steps in --epochs epochs: the preset's warm-ups, counted in epochs, shrink with it.

    python bench/precision_curves.py                        # GPU: 300 steps of ViT-S/8, bf16 seeds 0, 1 and fp16
    python bench/precision_curves.py --jobs 3 --out out/precision.md   # the three at once (bench/gpu_check.sh)
    python bench/precision_curves.py --quick                # CPU, ~7 s a run: tiny ViT, bf16 against fp32

fp16 needs a CUDA GPU (train_dino.py refuses it elsewhere: its loss scaling is CUDA's), so --quick compares bf16
with fp32; the script and its table are the same.
"""
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the repository root
from minivit import cli  # noqa: E402

# The GPU measurement (bench/gpu_check.sh's `precision` part): the offline GPU preset's ViT-S/8 (64 px global and
# 32 px local crops, batch 128), 300 steps; ~40 s a run on an H100 at ~1000 img/s, plus start-up and 10 checkpoints.
GPU = dict(device="cuda", arch="vit_s8", steps=300, epochs=10, log_every=10, precisions=["bf16", "fp16"])
# --quick: the smallest run train_dino.py makes on a CPU (one 16 px patch per view, no local crops), 2 steps; its
# ~7 s are mostly start-up (imports, drawing the shapes).
QUICK = dict(device="cpu", arch="vit_ti16", steps=2, epochs=2, log_every=1, precisions=["bf16", "fp32"],
             train_args="--global_crop_size 16 --local_crop_size 16 --local_crops_number 0 --out_dim 64 "
                        "--batch_size_per_gpu 4")
# train_dino.py's progress line (minivit.training.Progress): "ep 3/10 it 20/30 loss 6.1234 lr ..."
PROGRESS = re.compile(r"^ep (\d+)/(\d+) it (\d+)/(\d+) loss (\S+)")


def run_command(precision, seed, args, folder):
    """The train_dino.py command line of one run -> list of str."""
    return [sys.executable, os.path.join(ROOT, "train_dino.py"), "--arch", args.arch, "--precision", precision,
            "--seed", str(seed), "--epochs", str(args.epochs), "--iters_per_epoch", str(args.steps // args.epochs),
            "--log_every", str(args.log_every), "--knn_data", "none", "--no-baselines", "--eval_every", "0",
            "--saveckp_freq", "0", "--device", args.device, "--output_dir", folder, *shlex.split(args.train_args)]


def parse_curve(output):
    """train_dino.py's output -> [(global step, mean loss since the previous point)], steps counted from 1."""
    curve = []
    for line in output.splitlines():
        m = PROGRESS.match(line)
        if m:
            epoch, it, iters = int(m[1]), int(m[3]), int(m[4])
            curve.append(((epoch - 1) * iters + it, float(m[5])))
    return curve


def train(name, precision, seed, args):
    """One train_dino.py run -> dict(name, curve [(step, loss)], seconds, error: None, or the line it stopped with
    (a NaN loss stops train_dino.py: that is a result, not a failure of this script)). Its output goes to
    output_dir/<name with _ for spaces>.log."""
    folder = os.path.join(args.output_dir, name.replace(" ", "_"))
    shutil.rmtree(folder, ignore_errors=True)  # only the folders this script names: a fresh run, not a resume
    start = time.perf_counter()
    proc = subprocess.run(run_command(precision, seed, args, folder), capture_output=True, text=True, cwd=ROOT,
                          timeout=args.timeout)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    with open(folder + ".log", "w") as f:
        f.write(output)
    error = None
    if proc.returncode != 0:
        lines = [line for line in output.strip().splitlines() if line.strip()]
        error = next((line for line in reversed(lines) if line.startswith("error")), lines[-1] if lines else "?")
    return dict(name=name, curve=parse_curve(proc.stdout), seconds=seconds, error=error)


def mean_abs_difference(a, b):
    """Mean |a - b| over the steps both curves reached (dicts step -> loss), or None when they share none."""
    steps = sorted(set(a) & set(b))
    return sum(abs(a[s] - b[s]) for s in steps) / len(steps) if steps else None


def report(runs, args):
    """The markdown table and its summary lines: runs = [reference seed 0, reference seed 1, other precisions...]."""
    ref, other_seed, *others = runs
    curves = [dict(r["curve"]) for r in runs]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (platform.processor() or "CPU")
    lines = [f"## DINO loss: {' vs '.join(args.precisions)} autocast ({args.arch}, {args.steps} steps in "
             f"{args.epochs} epochs of train_dino.py; {device}, torch {torch.__version__})", "",
             f"Mean loss of every {args.log_every} steps. Noise: {args.precisions[0]} seed {args.seeds[1]} minus "
             f"seed {args.seeds[0]} (another initialisation, data order and crops).", "",
             "| step | " + " | ".join(r["name"] for r in runs) + " | "
             + " | ".join(f"{r['name']} - {ref['name']}" for r in others) + " | noise |",
             "|---:|" + "---:|" * (len(runs) + len(others) + 1)]
    for step in sorted(set().union(*curves)):
        base = curves[0].get(step)
        cells = [f"{c[step]:.4f}" if step in c else "" for c in curves]
        cells += [f"{c[step] - base:+.4f}" if base is not None and step in c else ""
                  for c in curves[2:] + curves[1:2]]                              # each other precision, the noise
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    noise = mean_abs_difference(curves[0], curves[1])
    lines += ["", f"run-to-run noise: mean |{other_seed['name']} - {ref['name']}| = "
                  + (f"{noise:.4f}" if noise is not None else "n/a")]
    for run, curve in zip(others, curves[2:]):
        gap = mean_abs_difference(curves[0], curve)
        if run["error"]:
            verdict = f"stopped after step {max(curve, default=0)}: {run['error']}"
        elif gap is None or noise is None:
            verdict = "no common points"
        else:  # the rule: the precision's gap to the reference is no larger than two seeds' gap
            verdict = f"{gap / noise:.2f}x the noise: " + ("within" if gap <= noise else "beyond") + \
                      " the run-to-run noise of two seeds"
        lines.append(f"{run['name']}: mean |{run['name']} - {ref['name']}| = "
                     + (f"{gap:.4f}" if gap is not None else "n/a") + f"; {verdict}")
    lines.append("wall time per run: " + ", ".join(f"{r['name']} {r['seconds']:.0f} s" for r in runs)
                 + (f" ({args.jobs} at a time)" if args.jobs > 1 else ""))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny ViT, 2 steps, bf16 against fp32: proves "
                        "the script works without a GPU (flags given still win)")
    parser.add_argument("--device", default=None, help="cuda (default) or cpu; fp16 needs cuda")
    parser.add_argument("--arch", default=None, help="train_dino.py's --arch (default vit_s8: patch 8, where the "
                        "official fp16 runs were unstable)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default 300)")
    parser.add_argument("--epochs", type=int, default=None, help="the steps are split into this many epochs "
                        "(default 10); the preset's lr and temperature warm-ups count epochs")
    parser.add_argument("--log_every", type=int, default=None, help="one point of the curve per this many steps "
                        "(default 10)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=("bf16", "fp16", "fp32"),
                        help="the first is the reference, run with both --seeds; the others with the first seed "
                        "(default bf16 fp16)")
    parser.add_argument("--seeds", nargs=2, type=int, default=[0, 1], help="the reference's two seeds")
    parser.add_argument("--train_args", default=None, help="more train_dino.py flags, one quoted string, e.g. "
                        "\"--batch_size_per_gpu 64\"")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (3 on one H100: the small preset does not "
                        "fill it)")
    parser.add_argument("--timeout", type=int, default=None, help="seconds one run may take (default: no limit)")
    parser.add_argument("--output_dir", default="runs/precision_curves", help="one folder and one .log per run")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else GPU).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.train_args = args.train_args or ""
    try:
        shlex.split(args.train_args)
    except ValueError as e:
        cli.fail(f"--train_args {args.train_args!r}: {e}; quote it as one string of train_dino.py flags")
    cli.check_args(parser, args, positive=("steps", "epochs", "log_every", "jobs", "timeout"),
                   non_negative=("seeds",))
    if args.steps % args.epochs:
        cli.fail(f"--steps {args.steps} is not a multiple of --epochs {args.epochs}; pick a multiple")
    if args.seeds[0] == args.seeds[1]:
        cli.fail(f"--seeds {args.seeds[0]} {args.seeds[1]}: the noise needs two different seeds")
    if len(set(args.precisions)) != len(args.precisions) or len(args.precisions) < 2:
        cli.fail(f"--precisions {' '.join(args.precisions)}: give two or more different ones, the reference first")
    if "fp16" in args.precisions and not args.device.startswith("cuda"):
        cli.fail(f"--precisions fp16 needs --device cuda (train_dino.py's loss scaling is CUDA's); on a CPU "
                 f"compare bf16 with fp32 (--quick)")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        cli.fail("--device cuda: no CUDA GPU here; use --quick (or --device cpu) on a CPU")
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as e:
        cli.fail(f"--output_dir {args.output_dir}: {e.strerror or e}; pick another folder")

    ref = args.precisions[0]
    plan = [(f"{ref} seed {args.seeds[0]}", ref, args.seeds[0]), (f"{ref} seed {args.seeds[1]}", ref, args.seeds[1])]
    plan += [(f"{p} seed {args.seeds[0]}", p, args.seeds[0]) for p in args.precisions[1:]]
    print(f"{len(plan)} runs of train_dino.py, {args.jobs} at a time: " + "; ".join(name for name, _, _ in plan),
          flush=True)
    try:
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = list(pool.map(lambda job: train(*job, args), plan))
    except subprocess.TimeoutExpired as e:
        cli.fail(f"a run took more than --timeout {args.timeout} s: {' '.join(e.cmd[-2:])}; raise it or fewer --steps")
    for run in runs[:2]:  # the reference must finish: without it there is nothing to compare with
        if run["error"] or not run["curve"]:
            cli.fail(f"the reference run '{run['name']}' failed: {run['error'] or 'no progress lines'} "
                     f"(its output: {os.path.join(args.output_dir, run['name'].replace(' ', '_'))}.log)")
    table = report(runs, args)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return runs


if __name__ == "__main__":
    main()
