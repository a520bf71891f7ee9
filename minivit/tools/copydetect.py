"""Copy detection, a miniature of the Copydays protocol (DINO sec. 4.2.2, Table 6; Douze et al. 2009).

Held-out "original" images are edited hard (crops, rescaling, blur, JPEG at low quality, colour changes, pasted
text and patches, and "strong": three of them at once), each edited copy becomes a query, and the originals are
hidden among distractors. Features: the final-norm CLS token, and, as in the paper, the CLS token concatenated with
the GeM-pooled (p=4) output patch tokens. Scored as the official eval_copy_detection.py scores Copydays:
  - every image is squashed (resized, not cropped) to image_size x image_size, bicubic: --imsize 320 there;
  - the features are PCA-whitened (centred, rotated onto the principal axes, each divided by its standard
    deviation) with a whitening learnt on distractor images only, then L2-normalised; cosine similarity (the
    paper learns it on 20k YFCC100M images apart from its 10k distractors; here on the distractors themselves,
    which hold no original and no query either);
  - each query keeps its top 20 matches, scored with the INRIA Holidays package's average precision
    (score_ap_from_ranks_1: trapezoids under the precision-recall curve): a lone positive at rank r (0-based)
    scores 1 at r = 0, 1 / (2 (r + 1)) after, and 0 beyond the 20 kept.
The report gives that mean average precision and how often the original comes first (top-1), per edit and overall;
results.json also keeps the AP over the whole ranking that minivit reported before issue 24 (mAP_full_ranking).

    python -m minivit.tools.copydetect --arch vit_s8 --weights dino=runs/dino/teacher_backbone.pth \\
        supervised=runs/vit_shapes/checkpoint.pt random=none       # offline: 50 test shapes among 500 train ones
    python -m minivit.tools.copydetect --arch vit_b8 --weights dino=dino_vitbase8_pretrain.pth --data photos/ \\
        --num_originals 200 --num_distractors 5000                    # any folder of photos, at 320 px

--data is 'shapes', 'digits', or a folder: an ImageNet/CIFAR-style one uses its test split for the originals and
its train split for the distractors; any other folder of images is shuffled and split into the two.
Writes report.md, results.json and one PNG per model (queries with their top matches) to --output_dir.
"""
import argparse
import io
import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont

from minivit import checkpoint, cli, distributed
from minivit.augment import normalize, to_float
from minivit.cli import parse_weights
from minivit.data import IMAGE_EXTENSIONS, build_dataset, load_image, open_image, to_rgb
from minivit.models import build_backbones


# ---------------------------------------------------------------------------------------------------- the metrics

def gem(x, p=4.0, eps=1e-6):
    """Generalised-mean pooling over tokens (Radenovic et al. 2018): (mean_n clamp(x, eps)^p)^(1/p).
    x: (..., N, D) float -> (..., D). p=1 is average pooling of positive inputs; p -> inf tends to max pooling."""
    return x.clamp(min=eps).pow(p).mean(-2).pow(1.0 / p)

COPYDAYS_TOP = 20  # eval_copy_detection.py scores the 20 best matches of each query (similarity.topk(20))


def holidays_average_precision(similarities, positives, top=COPYDAYS_TOP):
    """The Copydays score of one query (copydays_metrics for one row). similarities: float (N,); positives: bool
    (N,), at least one True. -> float in [0, 1]."""
    return copydays_metrics(similarities[None], positives[None], top, per_query=True)["ap"][0].item()


def copydays_metrics(similarity, positives, top=COPYDAYS_TOP, per_query=False):
    """mAP and top-1 of Q queries against N database items as eval_copy_detection.py scores Copydays: similarity
    float (Q, N), positives bool (Q, N) (every query needs a positive). -> dict(mAP, top1) in [0, 1];
    per_query=True adds 'ap' and 'hit1', float (Q,).

    Each query keeps its `top` best matches (ties keep database order) and scores them with the INRIA Holidays
    package's score_ap_from_ranks_1: the area under the precision-recall curve summed as trapezoids, one per
    retrieved positive. The k-th positive found (k = 0, 1, ...) at rank r (0-based) adds 1 / P (P: the query's
    positives in the whole database) times the mean of the precision just before it, k / r (1 at r = 0), and just
    after it, (k + 1) / (r + 1). A lone positive thus scores 1 at rank 0, 1 / (2 (r + 1)) at rank r > 0 (the
    full-ranking average_precision gives 1 / (r + 1)), and 0 beyond the kept `top`."""
    if similarity.shape != positives.shape or similarity.ndim != 2:
        raise ValueError(f"similarity {tuple(similarity.shape)} and positives {tuple(positives.shape)} must both be "
                         f"(queries, database)")
    if not positives.any(1).all():
        raise ValueError("a query has no positive in the database: its average precision is undefined")
    order = similarity.argsort(dim=1, descending=True, stable=True)[:, :top]     # (Q, k) the k best first
    hits = positives.gather(1, order).double()                                   # (Q, k) 1 where a positive is
    rank = torch.arange(hits.shape[1], dtype=torch.float64)                      # 0-based
    before = hits.cumsum(1) - hits                                               # positives ranked above
    left = torch.where(rank == 0, 1.0, before / rank.clamp(min=1))               # precision before this item
    right = (before + 1) / (rank + 1)                                            # and with it
    ap = (hits * (left + right) / 2).sum(1) / positives.sum(1)
    out = {"mAP": ap.mean().item(), "top1": hits[:, 0].mean().item()}
    return {**out, "ap": ap, "hit1": hits[:, 0]} if per_query else out


def average_precision(similarities, positives):
    """Average precision of one query over the whole ranking (minivit's score before issue 24; the Copydays score
    is holidays_average_precision): rank the database by decreasing similarity (ties keep database order) and
    average the precision at the rank of every positive. similarities: float (N,); positives: bool (N,), at least
    one True. -> float in (0, 1]; 1 when every positive comes before every negative, 1/r for a single positive at
    rank r."""
    return retrieval_metrics(similarities[None], positives[None], per_query=True)["ap"][0].item()


def retrieval_metrics(similarity, positives, per_query=False):
    """mAP over the whole ranking (average_precision per query) and top-1 of Q queries against N database items:
    similarity float (Q, N), positives bool (Q, N) (every query needs a positive). -> dict(mAP, top1) in [0, 1];
    per_query=True adds 'ap' and 'hit1', float (Q,). The Copydays scoring is copydays_metrics."""
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


def learn_whitening(features, floor=1e-5):
    """PCA whitening learnt on features float (n, D) -> (mean float64 (D,), projection float64 (D, D)), such that
    whiten(features, ...) has zero mean and identity covariance: the rows of projection are the covariance's
    eigenvectors, largest variance first, each divided by the square root of its eigenvalue (the official
    utils.PCA(whit=0.5), keeping all D dimensions as eval_copy_detection.py does).

    Eigenvalues below floor x the largest are raised to it (the official rule): with fewer images than dimensions
    (n <= D) the covariance is singular and those directions are floored, not measured, which the paper's 20k
    whitening images for 1536-d features avoid. One deliberate difference: the official script centres queries and
    database with the whitening images' mean but takes the eigenvectors of their uncentred second moment
    (F^T F / n, which is the covariance plus mean mean^T); the covariance is used here, so that the whitened
    images have exactly identity covariance."""
    x = features.double()
    if len(x) < 2:
        raise ValueError(f"the whitening needs at least 2 distractors, got {len(x)}; add some or pass --no-whiten")
    mean = x.mean(0)
    covariance = (x - mean).T @ (x - mean) / len(x)                              # (D, D)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)                    # ascending
    if eigenvalues[-1] <= 0:
        raise ValueError("the distractors all have the same features: no whitening can be learnt from them")
    eigenvalues = eigenvalues.clamp(min=floor * eigenvalues[-1].item()).flip(0)  # largest first
    projection = eigenvectors.flip(1).T / eigenvalues.sqrt()[:, None]           # (D, D) one axis per row
    return mean, projection


def whiten(features, whitening):
    """features float (n, D) through learn_whitening's (mean, projection): (x - mean) projection^T -> float32
    (n, D)."""
    mean, projection = whitening
    return ((features.double() - mean) @ projection.T).float()

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
def copy_features(model, images, device, batch_size=64, normalize_rows=True):
    """Frozen features of uint8 images (n, 3, S, S) (ImageNet-normalised, no resize) -> dict of float32 (n, *)
    on the CPU: 'cls' the final-norm CLS token (or a ResNet's pooled feature), and for a ViT 'cls+gem' the CLS
    token concatenated with the GeM (p=4) pooled output patch tokens (DINO sec. 4.2.2). Rows L2-normalised unless
    normalize_rows=False (the raw features, which the official script whitens before normalising)."""

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
    feats = {k: torch.cat(v).cpu() for k, v in feats.items()}
    return {k: F.normalize(v, dim=1) for k, v in feats.items()} if normalize_rows else feats


def squashed(path, size):
    """An image file -> uint8 (3, size, size): the whole image resized to a square, bicubic, its aspect ratio not
    kept (eval_copy_detection.py's Resize((imsize, imsize), interpolation=3) of the PIL image); None if Pillow
    cannot read it."""
    try:
        with open_image(path) as image:  # a broken, truncated or oversized file: ValueError
            image = to_rgb(image, path).resize((size, size), Image.BICUBIC)
    except ValueError:
        return None
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()


def load_images(data, image_size, num_originals, num_distractors, seed=0, preprocess="official"):
    """-> (originals uint8 (n, 3, S, S), distractors uint8 (m, 3, S, S)), S = image_size, drawn at random (seed).
    Named sets and class folders: originals from the test split, distractors from the train split; any other
    folder of images is shuffled and split. Photos are squashed to S x S (squashed: the official way) or, with
    preprocess="keep_aspect", resized by their shorter side with the centre square kept (data.load_image, minivit
    before issue 24); the named sets are square already and come the same either way."""

    if preprocess not in ("official", "keep_aspect"):
        raise ValueError(f"preprocess={preprocess!r}: use official or keep_aspect")
    g = torch.Generator().manual_seed(seed)
    try:
        splits = [build_dataset(data, split, image_size) for split in ("test", "train")]
        picked = []
        for dataset, n in zip(splits, (num_originals, num_distractors)):
            chosen = torch.randperm(len(dataset), generator=g)[:n].tolist()
            if preprocess == "official" and hasattr(dataset, "samples"):  # photos of a class folder: by path
                images = [squashed(dataset.samples[i][0], image_size) for i in chosen]
            else:
                images = [None if item is None else item[0] for item in (dataset[i] for i in chosen)]
            picked.append([x for x in images if x is not None])                     # None: an unreadable file
    except ValueError:  # a folder without classes or without a test split: split its files instead
        if not os.path.isdir(data):
            raise
        paths = sorted(os.path.join(d, f) for d, _, files in os.walk(data) for f in files
                       if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
        paths = [paths[i] for i in torch.randperm(len(paths), generator=g)]
        load = squashed if preprocess == "official" else load_image
        picked = [[load(p, image_size) for p in paths[:num_originals]],
                  [load(p, image_size) for p in paths[num_originals:num_originals + num_distractors]]]
        picked = [[x for x in images if x is not None] for images in picked]      # squashed: None if unreadable
    if not picked[0]:
        raise ValueError(f"--data {data}: no images found for the originals")
    if not picked[1]:
        raise ValueError(f"--data {data}: only {len(picked[0])} images, none left as distractors")
    return torch.stack(picked[0]), torch.stack(picked[1])


def evaluate(models, originals, distractors, edits=tuple(EDITS), seed=0, device="cpu", batch_size=64,
             whitening=True, top=COPYDAYS_TOP):
    """The whole protocol for every model. Database = originals then distractors; queries = make_queries(originals).
    Features: whitened (whitening=True: learnt on the distractors' features alone, so that no original and no query
    shapes it), then L2-normalised; scored by copydays_metrics (the top `top` of each ranking).
    Returns results {label: {feature: {'all': {mAP, top1, mAP_full_ranking}, edit: {...}, ...}}} in [0, 1];
    rankings {label: (similarity float (Q, N) of the 'cls' feature, positives bool (Q, N))}; queries uint8
    (Q, 3, S, S); their edit names; database uint8 (N, 3, S, S)."""
    queries, source, names = make_queries(originals, edits, seed)
    database = torch.cat((originals, distractors))
    positives = torch.zeros(len(queries), len(database), dtype=torch.bool)
    positives[torch.arange(len(queries)), source] = True                          # (Q, N) the original of each
    results, rankings = {}, {}
    for label, model in models.items():
        q, db = (copy_features(model, x, device, batch_size, normalize_rows=False) for x in (queries, database))
        results[label] = {}
        for feature in q:
            qf, dbf = q[feature], db[feature]                                        # (Q, D), (N, D) raw
            if whitening:
                learnt = learn_whitening(dbf[len(originals):])                       # the distractors only
                qf, dbf = whiten(qf, learnt), whiten(dbf, learnt)
            similarity = F.normalize(qf, dim=1) @ F.normalize(dbf, dim=1).T          # (Q, N) cosine similarities
            per = copydays_metrics(similarity, positives, top, per_query=True)
            full = retrieval_metrics(similarity, positives, per_query=True)["ap"]   # the whole ranking's AP
            table = {"all": {"mAP": per["mAP"], "top1": per["top1"], "mAP_full_ranking": full.mean().item()}}
            for edit in edits:
                rows = torch.tensor([n == edit for n in names])
                table[edit] = {"mAP": per["ap"][rows].mean().item(), "top1": per["hit1"][rows].mean().item(),
                               "mAP_full_ranking": full[rows].mean().item()}
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
    protocol = (f"images squashed to {setup['image_size']}x{setup['image_size']} px" if
                setup.get("preprocess", "official") == "official" else f"{setup['image_size']} px centre squares")
    protocol += "; features PCA-whitened on the distractors" if setup.get("whitening", True) else "; not whitened"
    lines = [f"# Copy detection ({setup['queries']} queries, {setup['originals']} originals among "
             f"{setup['distractors']} distractors)", "",
             f"{setup['data']}; {setup['arch']}; {protocol}; cosine similarity. mAP as eval_copy_detection.py "
             f"scores Copydays (the top {setup.get('top', COPYDAYS_TOP)} of each ranking, Holidays AP). In %.", "",
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
                        "shapes, 32 digits, 320 folders (eval_copy_detection.py's --imsize; 224 before issue 24)")
    parser.add_argument("--preprocess", default="official", choices=("official", "keep_aspect"), help="photos: "
                        "official squashes each whole photo to image_size x image_size (bicubic), as "
                        "eval_copy_detection.py; keep_aspect resizes the shorter side and keeps the centre square "
                        "(before issue 24). The named sets are square already")
    parser.add_argument("--whiten", action=argparse.BooleanOptionalAction, default=True, help="PCA-whiten the "
                        "features with a whitening learnt on the distractors, as the paper (on 20k images); it needs "
                        "more distractors than feature dimensions to be measured in every direction")
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
                   non_negative=("num_distractors",), seed=("seed",))

    with cli.errors():
        device = distributed.pick_device(args.device)
        checkpoint.make_output_dir(args.output_dir, files=("report.md", "results.json"))
    image_size = args.image_size or {"shapes": 64, "shapes_plain": 64, "digits": 32}.get(args.data, 320)
    models = build_backbones(args.arch, parse_weights(args.weights), device, args.trust_pickle, img_size=image_size,
                             patch_size=args.patch_size)
    patch = getattr(next(iter(models.values())), "patch_size", 1)
    if image_size % patch:
        cli.fail(f"--image_size {image_size} is not a multiple of the patch size {patch}; pick a multiple")
    try:
        originals, distractors = load_images(args.data, image_size, args.num_originals, args.num_distractors,
                                             args.seed, args.preprocess)
    except (ValueError, OSError) as e:
        cli.fail(str(e))
    model = next(iter(models.values()))
    widest = 2 * model.embed_dim if hasattr(model, "embed_dim") else model.num_features  # cls+gem for a ViT
    if args.whiten and len(distractors) <= widest:
        print(f"note: the whitening is learnt from {len(distractors)} distractors for features of up to {widest} "
              f"dimensions: the directions they do not span are floored, not measured (the paper: 20k images for "
              f"1536); more --num_distractors, or --no-whiten")
    with cli.errors():
        results, rankings, queries, names, database = evaluate(models, originals, distractors, args.edits,
                                                               args.seed, device, args.batch_size, args.whiten)
    setup = {"data": args.data, "image_size": image_size, "arch": args.arch, "queries": len(queries),
             "originals": len(originals), "distractors": len(distractors), "edits": args.edits, "seed": args.seed,
             "preprocess": args.preprocess, "whitening": args.whiten, "top": COPYDAYS_TOP,
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
