"""The README's DINO figure, from the output folders of train_dino.py runs: on the left the teacher's k-NN top-1
against wall time for each run, with the random-init and raw-pixel baselines drawn as lines; on the right the
teacher's CLS attention (mean over heads, last block) of the same test images before training and at the end of
the first run.

    python -m minivit.tools.dino_figure runs/dino:"CPU, 10 min" runs/dino_1h:"CPU, 1 h" --out docs/dino_result.png
"""
from pathlib import Path

import torch.nn.functional as F
from PIL import Image

from minivit import cli
from minivit.checkpoint import atomic_write, torch_load
from minivit.training import read_jsonl

EXPECTED = "a train_dino.py output folder holds log.jsonl and attention/ep*.pt"


def read_log(run):
    """The records of run/log.jsonl; a one-line ValueError saying what was expected when `run` is missing, not a
    folder, or not a DINO run (no log, a malformed line, no k-NN record: an image folder, a train_vit.py run)."""
    log = Path(run) / "log.jsonl"
    if not Path(run).is_dir():
        raise ValueError(f"{run} is not a folder; give the --output_dir of a train_dino.py run ({EXPECTED})")
    if not log.is_file():
        raise ValueError(f"{run} has no log.jsonl: not a train_dino.py run? ({EXPECTED})")
    records = read_jsonl(log)  # a malformed line: ValueError naming the file and the line
    if not any("knn_top1" in r for r in records):
        raise ValueError(f"{log} has no k-NN record (knn_top1): a train_vit.py / train_resnet.py run, or one with "
                         "--knn_data none? the figure draws train_dino.py runs with k-NN evaluations")
    return records


def knn_curve(run):
    """(minutes, k-NN top-1 %) of a train_dino.py output folder, from log.jsonl: the epoch-0 record (before
    training, the random-init teacher) at 0 min, then every evaluated epoch at its "time". Also returns the
    baselines {random_init, raw_pixels} (%), empty when the run did not compute them."""
    records = read_log(run)
    baselines = {}
    points = []
    for r in records:
        if r.get("epoch") == 0 and "knn_raw_pixels" in r:
            baselines = dict(random_init=r["knn_top1"], raw_pixels=r["knn_raw_pixels"])
            points.append((0.0, r["knn_top1"]))
        elif "knn_top1" in r:  # an epoch-0 record (no "time") sits at 0 min
            points.append((r.get("time", 0.0) / 60, r["knn_top1"]))
    return points, baselines


def attention_pair(run, images=4):
    """The first and the last attention record of a run (attention/ep*.pt, written by train_dino.py):
    -> images (n, 3, S, S) in [0, 1], first (n, S, S) and last (n, S, S) head-mean maps upsampled to S, epochs."""
    files = sorted((Path(run) / "attention").glob("ep*.pt"))
    if len(files) < 2:
        raise ValueError(f"{run}/attention has {len(files)} ep*.pt files, the figure needs 2: a run writes one "
                         f"before training and one per evaluation of a ViT ({EXPECTED})")
    first, last = (torch_load(f) for f in (files[0], files[-1]))  # no code runs from the files
    for f, record in zip((files[0], files[-1]), (first, last)):
        if not (isinstance(record, dict) and {"images", "attn"} <= set(record)):
            raise ValueError(f"{f} holds no images and attn: not written by train_dino.py; delete it")
    S = first["images"].shape[-1]
    maps = [F.interpolate(r["attn"][:images].mean(1, keepdim=True), size=S, mode="nearest")[:, 0]
            for r in (first, last)]                                           # (n, S, S)
    epochs = [int(f.stem[2:]) for f in (files[0], files[-1])]
    return first["images"][:images], maps[0], maps[1], epochs


def dino_figure(runs, labels, png, images=4):
    """Write the figure (module docstring) for the run folders `runs` named by `labels` to `png`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subfigures(1, 2, width_ratios=(1.1, 1))
    ax = left.subplots()
    drawn = set()  # runs evaluated on the same images share their baselines: one line each
    for run, label in zip(runs, labels):
        points, baselines = knn_curve(run)
        line, = ax.plot([p[0] for p in points], [p[1] for p in points], marker=".", label=f"DINO teacher, {label}")
        for key, style in (("random_init", "--"), ("raw_pixels", ":")):
            if key in baselines and (key, baselines[key]) not in drawn:
                drawn.add((key, baselines[key]))
                ax.axhline(baselines[key], color="grey" if len(runs) > 1 else line.get_color(), ls=style, lw=1,
                           label=f"{key.replace('_', ' ')} {baselines[key]:.1f}%")
    ax.set_xlabel("wall time (min)")
    ax.set_ylabel("k-NN top-1 (%), k=20")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    pictures, start, end, epochs = attention_pair(runs[0], images)
    axes = right.subplots(3, len(pictures), squeeze=False)
    for i in range(len(pictures)):
        for row, (image, title) in enumerate(((pictures[i].permute(1, 2, 0), "image"),
                                              (start[i], f"epoch {epochs[0]}"), (end[i], f"epoch {epochs[1]}"))):
            axes[row, i].imshow(image.numpy(), cmap=None if row == 0 else "inferno")
            axes[row, i].set_xticks([]), axes[row, i].set_yticks([])
            if i == 0:
                axes[row, i].set_ylabel(title, fontsize=8)
    right.suptitle(f"teacher CLS attention, {labels[0]}", fontsize=9)
    with atomic_write(png) as tmp:  # a palette PNG: a few times smaller, for the repository
        fig.savefig(tmp, dpi=80)
        Image.open(tmp).convert("RGB").quantize(256).save(tmp, optimize=True)


def main(argv=None):
    p = cli.ArgumentParser(description="k-NN against wall time and attention maps of train_dino.py runs")
    p.add_argument("runs", nargs="+", help="output folders, each optionally FOLDER:LABEL; the first one's "
                   "attention maps are drawn")
    p.add_argument("--out", default="docs/dino_result.png", help="the PNG to write")
    args = p.parse_args(argv)
    cli.check_output_file(args.out, "--out")
    # FOLDER:LABEL, unless the whole argument is a folder (a name with a colon in it)
    runs, labels = zip(*[(r, Path(r).name) if Path(r).exists() else (r.split(":", 1) + [Path(r).name])[:2]
                         for r in args.runs])
    with cli.errors():
        for run in runs:  # every run checked before drawing any
            read_log(run)
        dino_figure(runs, labels, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
