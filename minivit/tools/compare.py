"""ViT versus CNN on the same data with the same budget, at several fractions of the training set.

The ViT paper (Dosovitskiy et al. 2020, sec. 4.3 and Fig. 3-4) finds that a ViT lacks the convolution's inductive
biases (locality, translation equivariance) and must learn them from data: with little data a ResNet of similar
size wins, with a lot the ViT catches up and passes it. This command trains both (train_vit.py and train_resnet.py,
as subprocesses) on 10%, 30% and 100% of the training images and plots test accuracy against the fraction.

    python -m minivit.tools.compare                                    # offline: digits, ViT-Ti/4 vs ResNet-18 (CPU)
    python -m minivit.tools.compare --load                             # redo the report from the runs' results.json
    python -m minivit.tools.compare --data /data/cifar10 --epochs 100 --common_args "--image_size 32 --load_size 32" \\
        --vit_args "--arch vit_s16 --patch_size 4" --resnet_args "--arch resnet18 --small_stem"   # one GPU

Budget: with --budget steps (default) a run on a fraction f trains for epochs / f epochs, so every run takes the
same number of optimizer steps and only the amount of distinct data changes; --budget epochs keeps the epochs and
so gives small fractions fewer steps too. Both models get the same --epochs. Writes report.md, compare.json and
data_fraction.png to --output_dir, next to one folder per run (e.g. vit_f0.1/ with its checkpoint and results.json).
"""
import json
import os
import shlex
import subprocess
import sys

from minivit import checkpoint, cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = ("vit", "resnet")
REPORT_FILES = ("report.md", "compare.json", "data_fraction.png")  # what --output_dir gets, beside the runs
NEEDED = ("arch", "test_top1", "train_images_per_s", "params", "epochs", "train_fraction")  # in each results.json


def run_dir(output_dir, model, fraction):
    """The folder of one training run, e.g. runs/compare/vit_f0.1."""
    return os.path.join(output_dir, f"{model}_f{fraction:g}")


def epochs_for(fraction, epochs, budget):
    """Epochs of a run on `fraction` of the data: epochs itself, or epochs / fraction (rounded, >= 1) when the
    budget is a number of steps."""
    if budget not in ("steps", "epochs"):
        raise ValueError(f"budget={budget!r}: use 'steps' or 'epochs'")
    return epochs if budget == "epochs" else max(1, round(epochs / fraction))


def train_command(script, data, fraction, epochs, output_dir, extra=()):
    """The command line of one run: [python, script, --data D, --train_fraction F, --epochs E, --eval_every E
    (only the final accuracy is used, so test once), --output_dir OUT, *extra]."""
    return [sys.executable, script, "--data", data, "--train_fraction", f"{fraction:g}", "--epochs", str(epochs),
            "--eval_every", str(epochs), "--output_dir", output_dir, *extra]


def read_results(path):
    """A training script's results.json -> dict; a one-line error exit naming the file if it is missing, not JSON
    or incomplete (JSON only: nothing in it is run)."""
    if not os.path.isfile(path):
        cli.fail(f"{path} is missing: train that run (drop --load) or point --output_dir at the runs")
    try:
        with open(path) as f:
            results = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        cli.fail(f"{path} is not valid JSON ({e}); delete it and train that run again (drop --load)")
    missing = [k for k in NEEDED if k not in results] if isinstance(results, dict) else list(NEEDED)
    if missing:
        cli.fail(f"{path} lacks {', '.join(missing)}: was it written by train_vit.py / train_resnet.py?")
    return results


def format_report(rows, setup):
    """Markdown: the setup, then one table row per run (model, fraction, images, epochs, top-1/5, img/s, params)."""
    lines = ["# ViT vs ResNet: accuracy against the amount of training data", "",
             f"data {setup['data']}; budget: same {setup['budget']} for every run ({setup['epochs']} epochs at 100%).",
             "", "| model | arch | data fraction | train images | epochs | test top-1 | test top-5 | train img/s | "
             "params |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        top5 = r.get("test_top5")
        lines.append(f"| {r['model']} | {r['arch']} | {100 * r['train_fraction']:g}% | {r.get('train_images', '?')} "
                     f"| {r['epochs']} | {r['test_top1']:.1f} | {'n/a' if top5 is None else f'{top5:.1f}'} | "
                     f"{r['train_images_per_s']:.0f} | {r['params'] / 1e6:.2f}M |")
    return "\n".join(lines) + "\n"


def plot_fraction(rows, path, title=""):
    """PNG: test top-1 against the fraction of training data (log axis), one line per model. Returns path."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.6))
    ax = fig.subplots()
    for model in MODELS:
        points = sorted((r["train_fraction"], r["test_top1"], r["arch"]) for r in rows if r["model"] == model)
        if points:
            ax.plot([100 * f for f, _, _ in points], [t for _, t, _ in points], "o-", label=f"{points[0][2]}")
            for f, t, _ in points:
                ax.annotate(f"{t:.1f}", (100 * f, t), textcoords="offset points", xytext=(0, 6), ha="center",
                            fontsize=7)
    fractions = sorted({100 * r["train_fraction"] for r in rows})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}%" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of the training set")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    parser = cli.ArgumentParser(description="Train (or load) a ViT and a ResNet on fractions of the same data "
                                     "and report accuracy, speed and size (ViT paper sec. 4.3)")
    parser.add_argument("--data", default="digits", help="'digits' (offline, the training scripts' CPU recipe), "
                        "an ImageNet-style or a CIFAR folder; passed to both scripts")
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 1.0], help="fractions of the "
                        "training set (class-balanced, the same images every run)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs at 100%% for both models (10 keeps the six "
                        "offline runs to minutes; the ViT's own offline recipe is 20, the ResNet's 10). E.g. 90 for "
                        "ImageNet-size data")
    parser.add_argument("--budget", default="steps", choices=["steps", "epochs"], help="steps: every fraction "
                        "trains for as many steps as the full set (epochs / fraction); epochs: the same epochs, so "
                        "small fractions also train less")
    parser.add_argument("--common_args", default="", help="more flags for both scripts, e.g. \"--device cuda\"")
    parser.add_argument("--vit_args", default="", help="more flags for train_vit.py, e.g. \"--arch vit_s16\"")
    parser.add_argument("--resnet_args", default="", help="more flags for train_resnet.py, e.g. \"--arch resnet50\"")
    parser.add_argument("--vit_script", default=os.path.join(REPO, "train_vit.py"))
    parser.add_argument("--resnet_script", default=os.path.join(REPO, "train_resnet.py"))
    parser.add_argument("--load", action="store_true", help="do not train: read the results.json of earlier runs")
    parser.add_argument("--output_dir", default="runs/compare")
    args = parser.parse_args(argv)
    cli.check_args(parser, args, positive=("epochs",))
    for fraction in args.fractions:
        if not 0 < fraction <= 1:
            cli.fail(f"--fractions {fraction}: each fraction must lie in (0, 1]; e.g. --fractions 0.1 0.3 1")
    try:
        common, extra_args = shlex.split(args.common_args), {m: shlex.split(getattr(args, f"{m}_args")) for m in MODELS}
    except ValueError as e:  # an unclosed quote
        cli.fail(f"--common_args / --vit_args / --resnet_args: {e}; quote each flag list as one string")
    with cli.errors():  # every path written, checked before six trainings run
        checkpoint.make_output_dir(args.output_dir)
    for name in REPORT_FILES:
        cli.check_output_file(os.path.join(args.output_dir, name), "--output_dir")
    scripts = {"vit": args.vit_script, "resnet": args.resnet_script}
    rows = []
    for fraction in sorted(set(args.fractions)):
        for model in MODELS:
            out = run_dir(args.output_dir, model, fraction)
            if not args.load:
                script = scripts[model]
                if not os.path.isfile(script):
                    cli.fail(f"--{model}_script {script}: no such file")
                command = train_command(script, args.data, fraction, epochs_for(fraction, args.epochs, args.budget),
                                        out, common + extra_args[model])
                print("$ " + shlex.join(command), flush=True)
                if subprocess.run(command).returncode != 0:
                    cli.fail(f"{os.path.basename(script)} failed on {fraction:g} of the data (command above); "
                                     f"fix it, or rerun with --load once its results.json exists")
            rows.append({"model": model, **read_results(os.path.join(out, "results.json"))})

    setup = {"data": args.data, "fractions": sorted(set(args.fractions)), "epochs": args.epochs, "budget": args.budget,
             "vit_args": args.vit_args, "resnet_args": args.resnet_args, "common_args": args.common_args}
    report = os.path.join(args.output_dir, REPORT_FILES[0])
    with open(report, "w") as f:
        f.write(format_report(rows, setup))
    with open(os.path.join(args.output_dir, REPORT_FILES[1]), "w") as f:
        json.dump({"setup": setup, "runs": rows}, f, indent=2)
    print(open(report).read())
    png = plot_fraction(rows, os.path.join(args.output_dir, REPORT_FILES[2]),
                        f"{args.data}: same {args.budget} for every run ({args.epochs} epochs at 100%)")
    print("\n".join([report, os.path.join(args.output_dir, REPORT_FILES[1]), png]))
    return rows


if __name__ == "__main__":
    main()
