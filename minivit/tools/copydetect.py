"""Copy detection, a miniature of the Copydays protocol (DINO sec. 4.2.2, Table 6; Douze et al. 2009).

Held-out "original" images are edited hard (crops, rescaling, blur, JPEG at low quality, colour changes, pasted
text and patches, and "strong": three of them at once), each edited copy becomes a query, and the originals are
hidden among distractors. Every query ranks the whole database by the cosine similarity of frozen features; the
report gives the mean average precision and how often the original comes first (top-1), per edit and overall.
Features: the final-norm CLS token, and, as in the paper, the CLS token concatenated with the GeM-pooled (p=4)
output patch tokens. (The paper also learns a PCA whitening on 20k distractors; not done here.)

    python -m minivit.tools.copydetect --arch vit_s8 --weights dino=runs/dino/teacher_backbone.pth \\
        supervised=runs/vit_shapes/checkpoint.pt random=none       # offline: 50 test shapes among 500 train ones
    python -m minivit.tools.copydetect --arch vit_b8 --weights dino=dino_vitbase8_pretrain.pth --data photos/ \\
        --image_size 224 --num_originals 200 --num_distractors 5000   # any folder of photos

--data is 'shapes', 'digits', or a folder: an ImageNet/CIFAR-style one uses its test split for the originals and
its train split for the distractors; any other folder of images is shuffled and split into the two.
Writes report.md, results.json and one PNG per model (queries with their top matches) to --output_dir.
"""
import io
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from minivit import checkpoint, cli, distributed
from minivit.cli import parse_weights
from minivit.models import build_backbones


# ---------------------------------------------------------------------------------------------------- the metrics

def gem(x, p=4.0, eps=1e-6):
    """Generalised-mean pooling over tokens (Radenovic et al. 2018): (mean_n clamp(x, eps)^p)^(1/p).
    x: (..., N, D) float -> (..., D). p=1 is average pooling of positive inputs; p -> inf tends to max pooling."""
    return x.clamp(min=eps).pow(p).mean(-2).pow(1.0 / p)


def average_precision(similarities, positives):
    """Average precision of one query: rank the database by decreasing similarity (ties keep database order) and
    average the precision at the rank of every positive. similarities: float (N,); positives: bool (N,), at least
    one True. -> float in (0, 1]; 1 when every positive comes before every negative, 1/r for a single positive at
    rank r."""
    return retrieval_metrics(similarities[None], positives[None], per_query=True)["ap"][0].item()


def retrieval_metrics(similarity, positives, per_query=False):
    """mAP and top-1 of Q queries against N database items: similarity float (Q, N), positives bool (Q, N) (every
    query needs a positive). -> dict(mAP, top1) in [0, 1]; per_query=True adds 'ap' and 'hit1', float (Q,)."""
    if similarity.shape != positives.shape or similarity.ndim != 2:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} must both be "
                         f"(queries, database)")
    if not positives.any(1).all():
        raise ValueError("a query has no positive in the database: its average precision is undefined")
    order = similarity.argsort(dim=1, descending=True, stable=True)              # (Q, N) best first
    hits = positives.gather(1, order).double()                                   # (Q, N) 1 where a positive is
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    precision = hits.cumsum(1) / ranks                                           # precision at every rank
    ap = (precision * hits).sum(1) / hits.sum(1)
    out = {"mAP": ap.mean().item(), "top1": hits[:, 0].mean().item()}
    return {**out, "ap": ap, "hit1": hits[:, 0]} if per_query else out


# ------------------------------------------------------------------------------------------------------ the edits
# Each edit takes a square RGB PIL image and a numpy Generator and returns an image of the same size; strengths
# are relative to the side S so that a 64 px shape and a 224 px photo are damaged alike.

def _crop(im, rng):  # keep a square of 50-80% of the side (25-64% of the area), zoomed back to S
    S = im.width
    side = int(S * rng.uniform(0.5, 0.8))
    x, y = rng.integers(0, S - side + 1, 2)
    return im.crop((x, y, x + side, y + side)).resize((S, S), Image.BICUBIC)


def _rescale(im, rng):  # down to 1/4-1/3 of the side and back: fine detail is gone
    small = max(4, int(im.width * rng.uniform(0.25, 0.34)))
    return im.resize((small, small), Image.BILINEAR).resize(im.size, Image.BILINEAR)


def _blur(im, rng):
    return im.filter(ImageFilter.GaussianBlur(im.width / 64 * rng.uniform(1.5, 3.0)))


def _jpeg(im, rng):  # quality 5-15: blocks and ringing
    buffer = io.BytesIO()
    im.save(buffer, "JPEG", quality=int(rng.integers(5, 16)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _colour(im, rng):  # hue rotation, then saturation, brightness and contrast factors
    h, s, v = (np.asarray(im.convert("HSV"), dtype=np.int16)[..., c] for c in range(3))
    h = ((h + int(rng.integers(40, 216))) % 256).astype(np.uint8)
    im = Image.merge("HSV", [Image.fromarray(c.astype(np.uint8)) for c in (h, s, v)]).convert("RGB")
    for enhance in (ImageEnhance.Color, ImageEnhance.Brightness, ImageEnhance.Contrast):
        im = enhance(im).enhance(rng.uniform(0.5, 1.5))
    return im


def _overlay(im, rng):  # 1-2 solid patches (each 5-12% of the area) and 2-3 words of text
    im, S = im.copy(), im.width
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(1, 3)):
        w, h = (S * np.sqrt(rng.uniform(0.05, 0.12)) * rng.uniform(0.7, 1.4, 2)).astype(int)
        x, y = rng.integers(0, S - min(w, S - 1), 1)[0], rng.integers(0, S - min(h, S - 1), 1)[0]
        draw.rectangle((x, y, x + w, y + h), fill=tuple(rng.integers(0, 256, 3).tolist()))
    try:
        font = ImageFont.load_default(size=max(8, S // 6))
    except TypeError:  # Pillow < 10.1: one bitmap size
        font = ImageFont.load_default()
    for _ in range(rng.integers(2, 4)):
        word = "".join(chr(c) for c in rng.integers(65, 91, rng.integers(3, 7)))
        draw.text(tuple(rng.uniform(-0.1, 0.8, 2) * S), word, fill=tuple(rng.integers(0, 256, 3).tolist()), font=font)
    return im


def _strong(im, rng):  # three different edits in a random order (Copydays' "strong" subset mixes attacks)
    for k in rng.choice(len(SINGLE_EDITS), 3, replace=False):
        im = list(SINGLE_EDITS.values())[k](im, rng)
    return im


SINGLE_EDITS = {"crop": _crop, "rescale": _rescale, "blur": _blur, "jpeg": _jpeg, "colour": _colour,
                "overlay": _overlay}
EDITS = {**SINGLE_EDITS, "strong": _strong}


def make_queries(originals, edits=tuple(EDITS), seed=0):
    """Every original through every edit: originals uint8 (n, 3, S, S) -> (queries uint8 (n * len(edits), 3, S, S),
    source int64 (the original's index of each query), edit names). Query i * len(edits) + j is edit j of original
    i; its randomness depends only on (seed, i, j)."""
    queries, source, names = [], [], []
    for i, image in enumerate(originals):
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        for j, name in enumerate(edits):
            edited = EDITS[name](pil, np.random.default_rng([seed, i, j]))
            queries.append(torch.from_numpy(np.array(edited.convert("RGB"))).permute(2, 0, 1))
            source.append(i)
            names.append(name)
    return torch.stack(queries), torch.tensor(source), names


# ------------------------------------------------------------------------------------------- features, images, run

@torch.no_grad()
def copy_features(model, images, device, batch_size=64):
    """Frozen features of uint8 images (n, 3, S, S) (ImageNet-normalised, no resize) -> dict of float32 (n, *)
    on the CPU, L2-normalised rows: 'cls' the final-norm CLS token (or a ResNet's pooled feature), and for a ViT
    'cls+gem' the CLS token concatenated with the GeM (p=4) pooled output patch tokens (DINO sec. 4.2.2)."""
    from minivit.augment import normalize, to_float

    vit = hasattr(model, "get_intermediate_layers")
    feats = {"cls": [], "cls+gem": []} if vit else {"cls": []}
    for chunk in images.split(batch_size):
        x = normalize(to_float(chunk.to(device)))
        if vit:
            tokens = model.get_intermediate_layers(x, n=1)[0].float()            # (b, 1 + N, D) after the norm
            feats["cls"].append(tokens[:, 0])
            feats["cls+gem"].append(torch.cat((tokens[:, 0], gem(tokens[:, 1:], p=4)), 1))  # (b, 2D)
        else:
            feats["cls"].append(model(x).float())
    return {k: F.normalize(torch.cat(v), dim=1).cpu() for k, v in feats.items()}


def load_images(data, image_size, num_originals, num_distractors, seed=0):
    """-> (originals uint8 (n, 3, S, S), distractors uint8 (m, 3, S, S)), S = image_size, drawn at random (seed).
    Named sets and class folders: originals from the test split, distractors from the train split; any other
    folder of images is shuffled and split."""
    from minivit.data import IMAGE_EXTENSIONS, build_dataset, load_image

    g = torch.Generator().manual_seed(seed)
    try:
        splits = [build_dataset(data, split, image_size) for split in ("test", "train")]
        picked = []
        for dataset, n in zip(splits, (num_originals, num_distractors)):
            items = (dataset[int(i)] for i in torch.randperm(len(dataset), generator=g)[:n])
            picked.append([item[0] for item in items if item is not None])         # None: an unreadable file
    except ValueError:  # a folder without classes or without a test split: split its files instead
        if not os.path.isdir(data):
            raise
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(data) for f in files
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        paths = [paths[i] for i in torch.randperm(len(paths), generator=g)]
        picked = [[load_image(p, image_size) for p in paths[:num_originals]],
                  [load_image(p, image_size) for p in paths[num_originals:num_originals + num_distractors]]]
    if not picked[0]:
        raise ValueError(f"--data {data}: no images found for the originals")
    if not picked[1]:
        raise ValueError(f"--data {data}: only {len(picked[0])} images, none left as distractors")
    return torch.stack(picked[0]), torch.stack(picked[1])


def evaluate(models, originals, distractors, edits=tuple(EDITS), seed=0, device="cpu", batch_size=64):
    """The whole protocol for every model. Database = originals then distractors; queries = make_queries(originals).
    Returns results {label: {feature: {'all': {mAP, top1}, edit: {mAP, top1}, ...}}} in [0, 1]; rankings
    {label: (similarity float (Q, N) of the 'cls' feature, positives bool (Q, N))}; queries uint8 (Q, 3, S, S);
    their edit names; database uint8 (N, 3, S, S)."""
    queries, source, names = make_queries(originals, edits, seed)
    database = torch.cat((originals, distractors))
    positives = torch.zeros(len(queries), len(database), dtype=torch.bool)
    positives[torch.arange(len(queries)), source] = True                          # (Q, N) the original of each
    results, rankings = {}, {}
    for label, model in models.items():
        q, db = copy_features(model, queries, device, batch_size), copy_features(model, database, device, batch_size)
        results[label] = {}
        for feature in q:
            similarity = q[feature] @ db[feature].T                                  # (Q, N) cosine similarities
            per = retrieval_metrics(similarity, positives, per_query=True)
            table = {"all": {"mAP": per["mAP"], "top1": per["top1"]}}
            for edit in edits:
                rows = torch.tensor([n == edit for n in names])
                table[edit] = {"mAP": per["ap"][rows].mean().item(), "top1": per["hit1"][rows].mean().item()}
            results[label][feature] = table
            rankings.setdefault(label, (similarity, positives))
    return results, rankings, queries, names, database


def save_matches(queries, names, database, similarity, positives, path, top=4):
    """PNG: for the queries of the first original (one per edit), the query and its `top` best matches, the true
    original framed green, others red, each titled with its cosine similarity. Returns path."""
    from matplotlib.figure import Figure

    rows = list(range(len(set(names))))                                                # queries of original 0
    fig = Figure(figsize=(1.6 * (top + 1), 1.7 * len(rows)))
    axes = fig.subplots(len(rows), top + 1, squeeze=False)
    for ax_row, i in zip(axes, rows):
        ax_row[0].imshow(queries[i].permute(1, 2, 0).numpy())
        ax_row[0].set_title(f"query: {names[i]}", fontsize=7)
        sims, idx = similarity[i].topk(min(top, similarity.shape[1]))
        for ax, s, j in zip(ax_row[1:], sims.tolist(), idx.tolist()):
            ax.imshow(database[j].permute(1, 2, 0).numpy())
            ax.set_title(f"{s:.3f}", fontsize=7)
            for spine in ax.spines.values():
                spine.set(color="tab:green" if positives[i, j] else "tab:red", linewidth=3)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_report(out, results, setup):
    """report.md (overall table and per-edit mAP, in %) and results.json (raw, in [0, 1]) in out. -> paths."""
    features = list(next(iter(results.values())))  # one arch for all: ['cls', 'cls+gem'] for a ViT
    lines = [f"# Copy detection ({setup['queries']} queries, {setup['originals']} originals among "
             f"{setup['distractors']} distractors)", "",
             f"{setup['data']}, {setup['image_size']} px; {setup['arch']}; cosine similarity. In %.", "",
             "| weights | " + " | ".join(f"mAP {f} | top-1 {f}" for f in features) + " |",
             "|---|" + "---|---|" * len(features)]
    for label, r in results.items():
        cells = [f"{100 * r[f]['all']['mAP']:.1f} | {100 * r[f]['all']['top1']:.1f}" for f in features]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    edits = [e for e in next(iter(results.values()))["cls"] if e != "all"]
    lines += ["", f"mAP per edit ({features[-1]} features):", "",
              "| weights | " + " | ".join(edits) + " |", "|---|" + "---|" * len(edits)]
    for label, r in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * r[features[-1]][e]['mAP']:.1f}" for e in edits) + " |")
    md, js = os.path.join(out, "report.md"), os.path.join(out, "results.json")
    with open(md, "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(js, "w") as f:
        json.dump({"setup": setup, "results": results}, f, indent=2)
    return md, js


def main(argv=None):
    parser = cli.ArgumentParser(description="Copy detection with frozen features (Copydays protocol, small)")
    parser.add_argument("--arch", default="vit_s8", help="from minivit.models.ARCHS, shared by all --weights")
    parser.add_argument("--weights", nargs="+", default=["random=none"], help="label=PATH or label=none (random "
                        "init); several for a side-by-side table, e.g. dino=... supervised=... random=none")
    parser.add_argument("--patch_size", type=int, default=None, help="override the arch's patch (as trained)")
    parser.add_argument("--data", default="shapes", help="'shapes', 'shapes_plain', 'digits', or a folder of images")
    parser.add_argument("--image_size", type=int, default=None, help="side of the square images; default 64 "
                        "shapes, 32 digits, 224 folders")
    parser.add_argument("--num_originals", type=int, default=50, help="each gives one query per edit")
    parser.add_argument("--num_distractors", type=int, default=500, help="more makes it harder (Copydays: 10k)")
    parser.add_argument("--edits", nargs="+", default=list(EDITS), choices=list(EDITS))
    parser.add_argument("--seed", type=int, default=0, help="picks the images and the edits' random parameters")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--output_dir", default="runs/copydetect")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cli.add_trust_pickle(parser)
    args = parser.parse_args(argv)
    cli.check_args(parser, args, positive=("patch_size", "image_size", "num_originals", "batch_size"),
                   non_negative=("num_distractors", "seed"))

    with cli.errors():
        device = distributed.pick_device(args.device)
        checkpoint.make_output_dir(args.output_dir)
    image_size = args.image_size or {"shapes": 64, "shapes_plain": 64, "digits": 32}.get(args.data, 224)
    models = build_backbones(args.arch, parse_weights(args.weights), device, args.trust_pickle, img_size=image_size,
                             patch_size=args.patch_size)
    patch = getattr(next(iter(models.values())), "patch_size", 1)
    if image_size % patch:
        cli.fail(f"--image_size {image_size} is not a multiple of the patch size {patch}; pick a multiple")
    try:
        originals, distractors = load_images(args.data, image_size, args.num_originals, args.num_distractors,
                                             args.seed)
    except (ValueError, OSError) as e:
        cli.fail(str(e))
    results, rankings, queries, names, database = evaluate(models, originals, distractors, args.edits, args.seed,
                                                           device, args.batch_size)
    setup = {"data": args.data, "image_size": image_size, "arch": args.arch, "queries": len(queries),
             "originals": len(originals), "distractors": len(distractors), "edits": args.edits, "seed": args.seed,
             "weights": dict(parse_weights(args.weights))}
    written = list(write_report(args.output_dir, results, setup))
    print(open(written[0]).read())
    for label, (similarity, positives) in rankings.items():
        written.append(save_matches(queries, names, database, similarity, positives,
                                    os.path.join(args.output_dir, f"matches_{label}.png")))
    print("\n".join(written))
    return results


if __name__ == "__main__":
    main()
