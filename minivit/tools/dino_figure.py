"""The README's DINO figure, from the output folders of train_dino.py runs: on the left the teacher's k-NN top-1
against wall time for each run, with the random-init and raw-pixel baselines drawn as lines; on the right the
teacher's CLS attention (mean over heads, last block) of the same test images before training and at the end of
the first run.

    python -m minivit.tools.dino_figure runs/dino:"CPU, 10 min" runs/dino_1h:"CPU, 1 h" --out docs/dino_result.png
"""
import argparse
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from minivit.training import read_jsonl


def knn_curve(run):
    """(minutes, k-NN top-1 %) of a train_dino.py output folder, from log.jsonl: the epoch-0 record (before
    training, the random-init teacher) at 0 min, then every evaluated epoch at its "time". Also returns the
    baselines {random_init, raw_pixels} (%), empty when the run did not compute them."""
    records = read_jsonl(Path(run) / "log.jsonl")
    baselines = {}
    points = []
    for r in records:
        if r.get("epoch") == 0 and "knn_raw_pixels" in r:
            baselines = dict(random_init=r["knn_top1"], raw_pixels=r["knn_raw_pixels"])
            points.append((0.0, r["knn_top1"]))
        elif "knn_top1" in r:
            points.append((r["time"] / 60, r["knn_top1"]))
    return points, baselines


def attention_pair(run, images=4):
    """The first and the last attention record of a run (attention/ep*.pt, written by train_dino.py):
    -> images (n, 3, S, S) in [0, 1], first (n, S, S) and last (n, S, S) head-mean maps upsampled to S, epochs."""
    files = sorted((Path(run) / "attention").glob("ep*.pt"))
    if len(files) < 2:
        raise ValueError(f"{run}/attention has {len(files)} ep*.pt files; a run writes one before training and "
                         "one per evaluation")
    first, last = (torch.load(f, weights_only=True) for f in (files[0], files[-1]))
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
    fig.savefig(png, dpi=80)
    Image.open(png).convert("RGB").quantize(256).save(png, optimize=True)


def main(argv=None):
    p = argparse.ArgumentParser(description="k-NN against wall time and attention maps of train_dino.py runs")
    p.add_argument("runs", nargs="+", help="output folders, each optionally FOLDER:LABEL; the first one's "
                   "attention maps are drawn")
    p.add_argument("--out", default="docs/dino_result.png", help="the PNG to write")
    args = p.parse_args(argv)
    runs, labels = zip(*[(r.split(":", 1) + [Path(r).name])[:2] for r in args.runs])
    dino_figure(runs, labels, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
