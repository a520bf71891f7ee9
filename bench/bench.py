"""Model-level benchmarks: what a training step costs, for our build (the Triton kernels) and the plain-PyTorch one.

    python bench/bench.py                      # every section, full sizes on a GPU
    python bench/bench.py --quick              # CPU: reduced sizes, about a minute on 2 cores
    python bench/bench.py --only dino --out bench.md

Sections (each prints one markdown table; a failure such as an OOM becomes a "failed: ..." row, the rest still runs):
  vit     supervised ViT-S/16 and ViT-S/8 step (forward + backward + AdamW), ours vs plain PyTorch;
  resnet  ResNet-50 step (bf16, channels_last, SGD) with the issue's reference point;
  dino    a full DINO step (teacher on 2 global crops, student on 2 global + 8 local, DINOLoss, backward, per-tensor
          clipping, AdamW, teacher EMA; data already on the device), ours vs plain, with the issue-6 targets;
  data    on a photo folder (--data, or one made by minivit.tools.photo_folder): the official per-image Pillow pipeline
          (decode + DataAugmentationDINO, written here) as the yardstick, then ours: decode per core and in N loader
          workers, MultiCropAugment on the device, and both together.

"ours" runs minivit.vit as written: minivit.kernels.attention (fused FlashAttention-style), minivit.kernels.patch_embed (one
GEMM), minivit.kernels.layernorm (residual add + LayerNorm) and minivit.kernels.bias_gelu (fc1 bias + GELU) -- Triton on CUDA, their
PyTorch references on a CPU. "plain" runs the very same model and weights with the kernel functions swapped, inside
`plain_pytorch_kernels()`, for F.scaled_dot_product_attention, conv2d patch embedding, add + F.layer_norm,
Linear-GELU-Linear and DINOLoss's PyTorch softmaxes (minivit.kernels.dino_loss's reference): the way timm builds a ViT. Timing: median over steps after warm-up (CUDA events on a GPU,
time.perf_counter on a CPU), fresh random inputs before every step (never zeros), peak memory from
torch.cuda.max_memory_allocated. FLOPs are model FLOPs (2 per multiply-add of the matrix products, backward = 2x
forward); bench/NOTES.md derives them by hand and compares with the H200's ~790 TFLOP/s bf16 dense.
"""
import contextlib
import gc
import importlib.metadata
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from minivit.kernels import HAS_TRITON, interpreter_on, use_triton  # noqa: E402
from minivit.kernels.bias_gelu import mlp_reference  # noqa: E402
from minivit.kernels.dino_loss import dino_loss_reference  # noqa: E402
from minivit.kernels.layernorm import add_layer_norm_reference, layer_norm_reference  # noqa: E402
from minivit.kernels.patch_embed import patch_embed_reference, patch_embed_tokens_reference  # noqa: E402
from minivit import cli, dino, vit  # noqa: E402
from minivit.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropAugment  # noqa: E402
from minivit.data import Photos, build_dataset, build_loader, load_photo  # noqa: E402
from minivit.tools.photo_folder import make_photo_folder  # noqa: E402
from minivit.dino import DINOHead, DINOLoss, MultiCropWrapper, clip_gradients, update_teacher  # noqa: E402
from minivit.models import build_model  # noqa: E402
from minivit.distributed import pick_device  # noqa: E402
from minivit.training import keep_freed_memory, param_groups  # noqa: E402

SECTIONS = ("vit", "resnet", "dino", "data")
GIB = 2 ** 30
H200_BF16_FLOPS = 790e12  # dense bf16 matmul measured on the lent H200 (shared/GPU.md)
# issue 6, one H200: the official DINO code (img/s, GiB) and the targets for our build
DINO_OFFICIAL = {"vit_s16": (780, 21.7), "vit_s8": (135, 33.5)}
DINO_TARGET = {"vit_s16": (1400, 15.0), "vit_s8": (340, 15.0)}
RESNET_REFERENCE = (4700, 11.0)  # issue 4: a mainstream library's ResNet-50, bf16 + channels_last, batch 256, H200
VIT_S = dict(embed_dim=384, depth=12, mlp_ratio=4.0)  # ViT-S (FACTS.md); both patch sizes


# ---------------------------------------------------------------------------------------------------- FLOP counts

def vit_flops(img_size, patch_size, embed_dim=384, depth=12, mlp_ratio=4.0, num_classes=0, in_chans=3):
    """Forward FLOPs of ONE image through a ViT: 2 per multiply-add of every matrix product (what
    torch.utils.flop_counter counts); LayerNorm, softmax, GELU and adds are O(N D) and left out.
    -> dict of ints: patch_embed, linear (qkv, proj, fc1, fc2), attention (q k^T and P v), head, total."""
    n = (img_size // patch_size) ** 2  # patches
    N, D, hidden = n + 1, embed_dim, int(embed_dim * mlp_ratio)  # tokens incl. CLS
    counts = dict(
        patch_embed=2 * n * (in_chans * patch_size ** 2) * D,  # (n, C p p) @ (C p p, D)
        linear=depth * 2 * N * (3 * D * D + D * D + 2 * D * hidden),  # 24 N D^2 per block at mlp_ratio 4
        attention=depth * 2 * (2 * N * N * D),  # S = q k^T and O = P v, all heads together: 4 N^2 D per block
        head=2 * D * num_classes,  # the CLS token only
    )
    counts["total"] = sum(counts.values())
    return counts


def dino_head_flops(in_dim, out_dim, hidden_dim=2048, bottleneck_dim=256):
    """Forward FLOPs of DINOHead for one crop: 3-layer MLP + the weight-normalised last layer (256 x K)."""
    return 2 * (in_dim * hidden_dim + hidden_dim * hidden_dim + hidden_dim * bottleneck_dim + bottleneck_dim * out_dim)


def dino_flops(patch_size, global_size=224, local_size=96, local_crops=8, out_dim=65536, **vit_kwargs):
    """FLOPs of one DINO training step per image (ViT-S unless vit_kwargs say otherwise): the teacher runs
    forward on the 2 global crops; the student runs forward + backward (= 3x forward) on all 2 + local_crops.
    -> dict of ints: global_fwd, local_fwd (backbone + head, one crop each), teacher, student, total,
    attention (the part of total spent in q k^T and P v)."""
    cfg = {**VIT_S, **vit_kwargs}
    head = dino_head_flops(cfg["embed_dim"], out_dim)
    g, loc = vit_flops(global_size, patch_size, **cfg), vit_flops(local_size, patch_size, **cfg)
    out = dict(global_fwd=g["total"] + head, local_fwd=loc["total"] + head)
    out["teacher"] = 2 * out["global_fwd"]
    out["student"] = 3 * (2 * out["global_fwd"] + local_crops * out["local_fwd"])
    out["total"] = out["teacher"] + out["student"]
    out["attention"] = 2 * g["attention"] + 3 * (2 * g["attention"] + local_crops * loc["attention"])
    return out


def counted_flops(fn):
    """Matrix-product FLOPs that torch.utils.flop_counter sees while fn() runs (invisible: Triton kernels)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------- the plain build

def _sdpa(q, k, v, scale=None):
    """minivit.kernels.attention's signature on F.scaled_dot_product_attention (FlashAttention-2/cuDNN/CPU flash)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


PLAIN = {"attention": _sdpa, "patch_embed": patch_embed_reference, "patch_embed_tokens": patch_embed_tokens_reference,
         "layer_norm": layer_norm_reference, "add_layer_norm": add_layer_norm_reference, "mlp": mlp_reference}


@contextlib.contextmanager
def plain_pytorch_kernels():
    """Inside this context every minivit.vit model runs the plain-PyTorch way (timm's): conv2d patch embedding and
    F.scaled_dot_product_attention instead of minivit.kernels.patch_embed / minivit.kernels.attention. Same modules, same weights:
    vit.py looks these functions up in its module namespace at each call, so swapping them there is enough."""
    saved = {name: getattr(vit, name) for name in PLAIN if hasattr(vit, name)}
    if "attention" not in saved or len(saved) < 2:
        raise RuntimeError("minivit.vit no longer imports attention/patch_embed by name; update bench/bench.py's PLAIN")
    saved_loss = dino.dino_loss  # DINOLoss: the PyTorch softmaxes instead of minivit.kernels.dino_loss
    try:
        for name in saved:
            setattr(vit, name, PLAIN[name])
        dino.dino_loss = dino_loss_reference
        yield
    finally:
        for name, fn in saved.items():
            setattr(vit, name, fn)
        dino.dino_loss = saved_loss


# ---------------------------------------------------------------------------------------------------- timing

@dataclass
class Timing:
    median: float  # seconds per call
    low: float
    high: float
    peak_bytes: int | None  # torch.cuda.max_memory_allocated over the timed calls; None on a CPU


def measure(step, refill, device, warmup, iters):
    """Time step() `iters` times after `warmup` calls; refill() draws fresh random inputs before every call, outside
    the timed region. CUDA: one pair of events around each call (the host runs ahead, the GPU stays busy)."""
    for _ in range(warmup):
        refill()
        step()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()  # the peak now starts from what lives across steps (weights, Adam)
    times, events = [], []
    for _ in range(iters):
        refill()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            events.append((start, end))
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    if cuda:
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) / 1e3 for s, e in events]
    peak = torch.cuda.max_memory_allocated() if cuda else None
    return Timing(statistics.median(times), min(times), max(times), peak)


def _free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def guarded(fn, *args):
    """fn(*args), or the error as one line: a failing row (an OOM, say) must not stop the other rows."""
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001 -- reported in the table, never swallowed silently
        return f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
    finally:
        _free_memory()


# ------------------------------------------------------------------------------------------------ the plan

@dataclass
class Plan:
    """Sizes for one run: full on a GPU, a few images on a CPU (smaller still under --quick)."""
    device: torch.device
    amp: torch.dtype | None  # autocast dtype; None = fp32
    warmup: int
    iters: int
    img_size: int  # ViT and ResNet steps
    vit_batch: dict  # arch -> batch
    resnet_batch: int
    global_size: int  # DINO crops
    local_size: int
    dino_batch: dict
    out_dim: int  # DINO prototypes K
    photos: int  # photos timed in the data section (made by minivit.tools.photo_folder unless --data names a folder)
    loader_batch: int
    workers: int
    archs: tuple = ("vit_s16", "vit_s8")  # the ViT and DINO rows
    builds: tuple = ("ours", "plain")  # which builds to time (see the module docstring)
    data: str | None = None  # the data section's photo folder
    compile: bool = False  # DINO: torch.compile the student's and teacher's backbones (inductor fuses LN, GELU, adds)
    kept_memory: bool = False  # training.keep_freed_memory() applied, as in the training scripts

    @property
    def label(self):
        """Says in every table title whether these are real sizes."""
        return "GPU, full sizes" if self.device.type == "cuda" else (
            "CPU, reduced sizes" if self.img_size < 224 else "CPU, small batches")


def make_plan(device, quick):
    """The sizes of the issues on a GPU (batch 128 at /16, 32 at /8, 256 for ResNet-50, K = 65536); on a CPU a
    few images, and under --quick 64 px images, 32 px local crops and K = 4096 so that it ends in about a minute."""
    if device.type == "cuda":
        return Plan(device, amp=torch.bfloat16, warmup=2 if quick else 3, iters=5 if quick else 10, img_size=224,
                    vit_batch={"vit_s16": 128, "vit_s8": 32}, resnet_batch=256, global_size=224, local_size=96,
                    dino_batch={"vit_s16": 128, "vit_s8": 32}, out_dim=65536, photos=512, loader_batch=128,
                    workers=min(16, os.cpu_count() or 1))
    img, glob, loc, k = (64, 64, 32, 4096) if quick else (224, 224, 96, 65536)
    return Plan(device, amp=None, warmup=1, iters=2 if quick else 3, img_size=img,
                vit_batch={"vit_s16": 4, "vit_s8": 1}, resnet_batch=2 if quick else 4, global_size=glob,
                local_size=loc, dino_batch={"vit_s16": 2, "vit_s8": 1}, out_dim=k, photos=16 if quick else 64,
                loader_batch=16, workers=2)


def _autocast(plan):
    if plan.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(plan.device.type, dtype=plan.amp)


# --------------------------------------------------------------------------------------------------- sections

def _row(cells):
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(title, headers, rows):
    return [f"### {title}", "", _row(headers), _row(["---"] * len(headers))] + [_row(r) for r in rows] + [""]


def _cells(t, images, flops_per_image):
    """ms/step median [min, max] | img/s | TFLOP/s | peak GiB for a Timing of a step over `images` images."""
    rate = images / t.median
    mem = f"{t.peak_bytes / GIB:.2f}" if t.peak_bytes is not None else "n/a"
    return [f"{t.median * 1e3:.1f} [{t.low * 1e3:.1f}, {t.high * 1e3:.1f}]", _num(rate),
            _num(rate * flops_per_image / 1e12), mem]


def _num(x):
    """1234 -> '1234', 2.345 -> '2.35', 0.01234 -> '0.0123': three significant digits for small numbers."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _ours_vs_plain(plan, setup, *args):
    """{'ours': Timing or error, 'plain': ...}: setup(plan, *args) -> (step, refill) builds the model once; the
    step is timed as written, then inside plain_pytorch_kernels() (same weights, same optimizer)."""
    made = guarded(setup, plan, *args)
    if isinstance(made, str):
        return {build: made for build in plan.builds}
    results = {}
    for build in plan.builds:
        with plain_pytorch_kernels() if build == "plain" else contextlib.nullcontext():
            results[build] = guarded(measure, *made, plan.device, plan.warmup, plan.iters)
    return results


def _speedup(results):
    """plain time / ours time: above 1 means our kernels made the step faster."""
    ours, plain = results.get("ours"), results.get("plain")
    return f"{plain.median / ours.median:.2f}x" if isinstance(ours, Timing) and isinstance(plain, Timing) else "-"


def vit_step(plan, arch):
    """One supervised step: cross-entropy over 1000 classes, backward, AdamW. -> (step, refill) functions."""
    torch.manual_seed(0)
    model = build_model(arch, num_classes=1000, img_size=plan.img_size).to(plan.device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, fused=plan.device.type == "cuda")
    B = plan.vit_batch[arch]
    x = torch.empty(B, 3, plan.img_size, plan.img_size, device=plan.device)
    return _classifier_step(plan, model, optimizer, x)


def _classifier_step(plan, model, optimizer, x):
    """(step, refill) for a 1000-class supervised step on the image buffer x: refill draws fresh random images
    and labels; step is forward + cross-entropy + backward + optimizer step."""
    y = torch.empty(x.shape[0], dtype=torch.long, device=x.device)

    def refill():
        x.normal_()
        y.random_(0, 1000)

    def step():
        with _autocast(plan):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, refill


def bench_vit(plan):
    """Table: supervised ViT-S/16 and ViT-S/8 steps, ours vs plain. -> markdown lines."""
    rows = []
    for arch in plan.archs:
        patch, B = int(arch[5:]), plan.vit_batch[arch]
        flops = 3 * vit_flops(plan.img_size, patch, num_classes=1000, **VIT_S)["total"]
        results = _ours_vs_plain(plan, vit_step, arch)
        for build, t in results.items():
            cells = _cells(t, B, flops) if isinstance(t, Timing) else [t, "", "", ""]
            rows.append([arch, build, B, plan.img_size, *cells, _speedup(results) if build == "ours" else ""])
    title = f"ViT training step (forward + backward + AdamW), {_precision(plan)}, {plan.label}"
    return _table(title, ["model", "build", "batch", "px", "ms/step median [min, max]", "img/s", "TFLOP/s",
                          "peak GiB", "ours speed-up"], rows)


def resnet_step(plan):
    """ResNet-50, cross-entropy, backward, SGD momentum 0.9 (the classic recipe); channels_last on a GPU."""
    torch.manual_seed(0)
    fmt = torch.channels_last if plan.device.type == "cuda" else torch.contiguous_format
    model = build_model("resnet50", num_classes=1000).to(plan.device, memory_format=fmt)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    B, S = plan.resnet_batch, plan.img_size
    x = torch.empty(B, 3, S, S, device=plan.device).contiguous(memory_format=fmt)
    step, refill = _classifier_step(plan, model, optimizer, x)
    refill()
    with torch.no_grad():
        flops = 3 * counted_flops(lambda: model(x[:1]))  # forward of one image, x3 for forward + backward
    return measure(step, refill, plan.device, plan.warmup, plan.iters), flops


def bench_resnet(plan):
    """Table: the ResNet-50 step beside the issue's reference point. -> markdown lines."""
    B, S = plan.resnet_batch, plan.img_size
    result = guarded(resnet_step, plan)
    if isinstance(result, str):
        rows = [["resnet50", "minivit", B, S, result, "", "", ""]]
    else:
        rows = [["resnet50", "minivit", B, S, *_cells(result[0], B, result[1])]]
    rows.append(["resnet50", "mainstream library, H200 (issue 4)", 256, 224, "", RESNET_REFERENCE[0], "",
                 RESNET_REFERENCE[1]])
    title = f"ResNet-50 training step (SGD), {_precision(plan)}" + (", channels_last" if plan.amp else "") + \
        f", {plan.label}"
    return _table(title, ["model", "build", "batch", "px", "ms/step median [min, max]", "img/s", "TFLOP/s",
                          "peak GiB"], rows)


def dino_step(plan, arch):
    """One full DINO step on crops already on the device (train_dino.py's loop body, minus logging).
    -> (step, refill) functions."""
    torch.manual_seed(0)
    n_local, B = 8, plan.dino_batch[arch]

    def network(drop_path_rate):
        backbone = build_model(arch, img_size=plan.global_size, drop_path_rate=drop_path_rate)
        return MultiCropWrapper(backbone, DINOHead(backbone.embed_dim, plan.out_dim)).to(plan.device)

    student, teacher = network(0.1), network(0.0)  # DINO: drop path 0.1 in the student only
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    if plan.compile:  # as train_dino.py --compile
        student.compile_backbone()
        teacher.compile_backbone()
    dino_loss = DINOLoss(plan.out_dim, 2 + n_local, 0.04, 0.04, 0, 1).to(plan.device)
    optimizer = torch.optim.AdamW(param_groups(student, 0.04), lr=5e-4 * B / 256, fused=plan.device.type == "cuda")
    crops = [torch.empty(B, 3, plan.global_size, plan.global_size, device=plan.device) for _ in range(2)] + \
        [torch.empty(B, 3, plan.local_size, plan.local_size, device=plan.device) for _ in range(n_local)]

    def refill():
        for c in crops:
            c.normal_()

    def step():
        with _autocast(plan):
            with torch.no_grad():
                teacher_output = teacher(crops[:2])  # global crops only
            loss = dino_loss(student(crops), teacher_output, epoch=0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(student, 3.0)  # per tensor, as the official code
        optimizer.step()
        update_teacher(student, teacher, 0.996)

    return step, refill


def bench_dino(plan):
    """Table: the DINO step for ViT-S/16 and ViT-S/8, ours vs plain, with the official numbers, the targets and the
    FLOP ceiling. -> markdown lines."""
    rows = []
    for arch in plan.archs:
        patch, B = int(arch[5:]), plan.dino_batch[arch]
        flops = dino_flops(patch, plan.global_size, plan.local_size, 8, plan.out_dim)["total"]
        results = _ours_vs_plain(plan, dino_step, arch)
        for build, t in results.items():
            cells = _cells(t, B, flops) if isinstance(t, Timing) else [t, "", "", ""]
            rows.append([arch, build, B, f"{flops / 1e9:.1f}", *cells, _speedup(results) if build == "ours" else ""])
        ceiling = H200_BF16_FLOPS / dino_flops(patch)["total"]
        official, target = DINO_OFFICIAL[arch], DINO_TARGET[arch]
        rows += [[arch, "official DINO code, H200 (issue 6)", 128 if patch == 16 else 32, "", "", official[0], "",
                  official[1], ""],
                 [arch, "target, H200 (issue 6)", "", "", "", f">= {target[0]}", "", f"<= {target[1]:g}", ""],
                 [arch, "FLOP ceiling at 790 TFLOP/s (full sizes)", "", "", "", f"{ceiling:.0f}", "790", "", ""]]
    crops = f"2x{plan.global_size} + 8x{plan.local_size} crops, K={plan.out_dim}"
    compiled = ", backbones under torch.compile" if plan.compile else ""
    title = f"DINO training step ({crops}), {_precision(plan)}{compiled}, {plan.label}"
    return _table(title, ["model", "build", "batch", "GFLOP/img", "ms/step median [min, max]", "img/s", "TFLOP/s",
                          "peak GiB", "ours speed-up"], rows)


# --------------------------------------------------------------------------- the data pipeline and its yardstick

def official_crop_box(width, height, scale, rng, ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params in plain Python (the yardstick's rule, and the tests' reference
    for ours): -> (left, top, w, h) of a box in a width x height photo; rng: a random.Random."""
    for _ in range(10):
        area = width * height * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    w, h = width, height  # fallback: the central crop, cut to the nearest allowed aspect ratio
    if width / height < min(ratio):
        h = round(width / min(ratio))
    elif width / height > max(ratio):
        w = round(height * max(ratio))
    return (width - w) // 2, (height - h) // 2, w, h


def _official_jitter(image, rng):
    """torchvision's ColorJitter(0.4, 0.4, 0.2, 0.1) on a PIL image: the four ops in a random order."""
    from PIL import Image, ImageEnhance
    factors = [rng.uniform(0.6, 1.4), rng.uniform(0.6, 1.4), rng.uniform(0.8, 1.2), rng.uniform(-0.1, 0.1)]
    for op in rng.sample(range(4), 4):
        if op < 3:
            image = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[op](image).enhance(factors[op])
        else:  # torchvision's adjust_hue for PIL: shift the uint8 hue channel, wrapping around
            h, s, v = image.convert("HSV").split()
            hue = (np.asarray(h, dtype=np.int16) + int(factors[3] * 255)) % 256
            image = Image.merge("HSV", (Image.fromarray(hue.astype(np.uint8), "L"), s, v)).convert("RGB")
    return image


def _official_view(photo, size, scale, blur_p, solarize_p, rng):
    """One view of DataAugmentationDINO: RandomResizedCrop (bicubic) -> flip -> jitter (p 0.8) -> grey (p 0.2) ->
    GaussianBlur (radius U(0.1, 2)) -> solarize -> ToTensor + Normalize. -> float (3, size, size)."""
    from PIL import Image, ImageFilter, ImageOps
    left, top, w, h = official_crop_box(*photo.size, scale, rng)
    view = photo.crop((left, top, left + w, top + h)).resize((size, size), Image.BICUBIC)  # resized_crop
    if rng.random() < 0.5:
        view = view.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < 0.8:
        view = _official_jitter(view, rng)
    if rng.random() < 0.2:
        view = view.convert("L").convert("RGB")
    if rng.random() < blur_p:
        view = view.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.1, 2.0)))
    if rng.random() < solarize_p:
        view = ImageOps.solarize(view)
    x = torch.from_numpy(np.array(view)).permute(2, 0, 1).float().div(255)
    return (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)


def official_dino_views(path, rng, global_size=224, local_size=96, local_crops=8):
    """The yardstick: the official per-image CPU pipeline, written here with Pillow (torchvision is no dependency):
    ImageFolder's decode of the whole photo, then DataAugmentationDINO's 2 global views (blur p 1.0; blur 0.1 +
    solarize 0.2) and local_crops local views (blur 0.5). -> list of float tensors (3, size, size)."""
    from PIL import Image
    with Image.open(path) as image:
        photo = image.convert("RGB")
    return [_official_view(photo, global_size, (0.4, 1.0), 1.0, 0.0, rng),
            _official_view(photo, global_size, (0.4, 1.0), 0.1, 0.2, rng)] + \
        [_official_view(photo, local_size, (0.05, 0.4), 0.5, 0.0, rng) for _ in range(local_crops)]


def _images_per_second(fns, images, rounds=3):
    """Each fn() of fns processes `images` images; -> the best img/s of each over `rounds` rounds, the fns taking
    turns within a round (so that a slower spell of a shared machine falls on all of them, not on one)."""
    best = [0.0] * len(fns)
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[k] = max(best[k], images / (time.perf_counter() - t0))
    return best


def bench_data(plan):
    """Table: img/s of the official per-image Pillow pipeline (the yardstick) and of ours -- decode alone on one core
    and in N loader workers, multi-crop on the device, and both together -- on a photo folder (plan.data, or one
    made by minivit.tools.photo_folder). -> markdown lines."""
    augment = MultiCropAugment(plan.global_size, plan.local_size, 8)
    generator, B, device = torch.Generator().manual_seed(0), plan.loader_batch, plan.device
    rows, threads = [], torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        if plan.data is None:
            make_photo_folder(tmp, plan.photos, classes=4)
        dataset = build_dataset(plan.data or tmp, "train", min_pixels=augment.min_pixels)
        paths = [path for path, _ in dataset.samples[:plan.photos]]
        n = len(paths)
        chunks = [paths[i:i + B] for i in range(0, n, B)]
        decode = lambda chunk: Photos.stack([load_photo(p, augment.min_pixels) for p in chunk])  # noqa: E731
        few = paths[:128]  # the one-core rows: enough photos to time, few enough to stay short
        rng = random.Random(0)
        torch.set_num_threads(1)  # per core: the yardstick and our one-core rows each run on one thread
        try:
            def official_pipeline():
                for p in few:
                    official_dino_views(p, rng, plan.global_size, plan.local_size)

            def decode_only():
                for i in range(0, len(few), B):
                    decode(few[i:i + B])

            def decode_and_crop():
                for i in range(0, len(few), B):
                    augment(decode(few[i:i + B]).to(device), generator)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            official, ours_decode, together = _images_per_second([official_pipeline, decode_only, decode_and_crop],
                                                                 len(few))
        finally:
            torch.set_num_threads(threads)
        crops = f"2x{plan.global_size} + 8x{plan.local_size}"
        rows.append(["official: Pillow decode + DataAugmentationDINO per image (yardstick)", f"{crops}, 1 thread",
                     _num(official)])
        rows.append(["ours: decode (load_photo, DCT draft down to min_pixels)", "1 process", _num(ours_decode)])
        rows.append([f"ours: decode + MultiCropAugment on {device.type}", f"{crops}, batch {B}, 1 CPU thread",
                     _num(together)])
        rows.append(["ours / official, per core", "", f"{together / official:.2f}x"])

        batch = decode(chunks[0]).to(device)
        torch.set_num_threads(1 if device.type == "cpu" else threads)  # a CPU: per core again
        aug = guarded(measure, lambda: augment(batch, generator), lambda: None, device, plan.warmup, plan.iters)
        torch.set_num_threads(threads)
        rows.append([f"ours: MultiCropAugment on {device.type}", f"{crops}, batch {len(batch)}" +
                     (", 1 thread" if device.type == "cpu" else ""),
                     _num(len(batch) / aug.median) if isinstance(aug, Timing) else aug])
        loader = build_loader(dataset, B, shuffle=True, drop_last=False, num_workers=plan.workers)

        def loader_rate(with_augment, epochs=2):
            """Warm-up epoch (starts the persistent workers), then img/s over `epochs` epochs."""
            for timed in (False, True):
                t0, count = time.perf_counter(), 0
                for _ in range(epochs if timed else 1):
                    for images, _ in loader:
                        if with_augment:
                            augment(images.to(device, non_blocking=True), generator)
                        count += len(images)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return _num(count / (time.perf_counter() - t0))

        rows.append(["ours: decode in the loader", f"{plan.workers} workers, batch {B}", guarded(loader_rate, False)])
        rows.append([f"ours: loader + MultiCropAugment on {device.type}", f"{plan.workers} workers, batch {B}",
                     guarded(loader_rate, True)])
        del loader  # stop the workers before the folder goes
        sizes = np.array([load_photo_size(p) for p in paths])
    what = f"{n} photos of {plan.data or 'minivit.tools.photo_folder'} ({_describe_sizes(sizes)})"
    return _table(f"Data pipeline (images/s), {what}, {plan.label}", ["stage", "setup", "img/s"], rows)


def load_photo_size(path):
    """(width, height) of an image file, without decoding it."""
    from PIL import Image
    with Image.open(path) as image:
        return image.size


def _describe_sizes(sizes):
    """'median 500x375, 12% > 640 px, 2% < 200 px' for an array (n, 2) of (width, height)."""
    long_side = sizes.max(1)
    w, h = np.median(sizes[:, 0]), np.median(sizes[:, 1])
    return f"median {w:.0f}x{h:.0f}, {(long_side > 640).mean():.0%} > 640 px, {(long_side < 200).mean():.0%} < 200 px"


# ------------------------------------------------------------------------------------------------------- main

def _precision(plan):
    return "bf16 autocast" if plan.amp == torch.bfloat16 else "fp32"


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def header(plan, argv):
    """The lines that make the tables evidence: command, date, commit, hardware, versions, method."""
    hardware = f"CPU {_cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    if plan.device.type == "cuda":
        p = torch.cuda.get_device_properties(plan.device)
        hardware = f"{p.name}, {p.multi_processor_count} SMs, {p.total_memory / GIB:.0f} GiB; {hardware}"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=5, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    triton_version = importlib.metadata.version("triton") if HAS_TRITON else "absent"
    ours = "Triton kernels" if use_triton(torch.empty(0, device=plan.device)) else "PyTorch references of minivit/kernels/"
    return ["## minivit benchmarks", "",
            f"- command: `python bench/bench.py {' '.join(argv)}`",
            f"- date: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}, commit {commit}",
            f"- hardware: {hardware}",
            f"- software: python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}",
            f"- ours = {ours}; plain = F.scaled_dot_product_attention + conv2d patch embedding (same weights)",
            "- host memory: " + ("freed blocks kept in the process (training.keep_freed_memory), as in the training "
                                 "scripts" if plan.kept_memory else "the allocator as it is"),
            f"- median of {plan.iters} steps after {plan.warmup} warm-up steps, fresh random inputs every step; "
            "TFLOP/s = model FLOPs (backward = 2x forward) x img/s", ""]


def _subset(flag, value, allowed):
    """A comma-separated flag value -> tuple of names, each one of `allowed`; a one-line error naming the flag
    otherwise."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names or set(names) - set(allowed):
        cli.fail(f"{flag} {value!r}: choose from {','.join(allowed)}")
    return names


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer steps; on a CPU also smaller images (64 px, 32 px local crops, K=4096)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--out", default=None, help="also write the tables to this markdown file, section by section")
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                        help="auto = cuda when available; cpu times the PyTorch references")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps per row (default 10 on a GPU, 5 with --quick; 3 / 2 on a CPU)")
    parser.add_argument("--archs", default="vit_s16,vit_s8", help="the ViT and DINO rows: vit_s16, vit_s8 or both")
    parser.add_argument("--builds", default="ours,plain", help="ours, plain or both (the ViT and DINO rows)")
    parser.add_argument("--data", default=None, help="data section: an ImageNet-style folder to time (default: a "
                        "folder of ImageNet-sized photos made by minivit.tools.photo_folder in a temporary directory)")
    parser.add_argument("--photos", type=int, default=None, help="data section: photos to time (default 512 on a "
                        "GPU, 64 on a CPU, 16 with --quick)")
    parser.add_argument("--compile", action="store_true",
                        help="DINO: torch.compile both backbones (compiles for minutes first; the yardstick of what "
                             "fusing LayerNorm, GELU and the residual adds around the GEMMs is worth)")
    args = parser.parse_args(argv)
    cli.check_args(parser, args, positive=("iters", "photos"))
    cli.check_output_file(args.out, "--out")
    archs = _subset("--archs", args.archs, ("vit_s16", "vit_s8"))
    builds = _subset("--builds", args.builds, ("ours", "plain"))
    only = _subset("--only", args.only, SECTIONS)
    if args.data is not None and not os.path.isdir(args.data):
        cli.fail(f"--data {args.data}: no such folder; give an ImageNet-style folder or leave it out")
    with cli.errors():
        device = pick_device(args.device)
    if device.type == "cpu" and interpreter_on():
        cli.fail("TRITON_INTERPRET=1 runs the kernels in Triton's interpreter, far too slow to time: unset it")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick its fastest convolutions
    plan = make_plan(device, args.quick)
    plan.iters = args.iters or plan.iters
    plan.archs, plan.builds, plan.compile, plan.data = archs, builds, args.compile, args.data
    plan.photos = args.photos or plan.photos
    plan.kept_memory = keep_freed_memory()  # as the training scripts run
    benches = {"vit": bench_vit, "resnet": bench_resnet, "dino": bench_dino, "data": bench_data}
    out = open(args.out, "w") if args.out else None

    def emit(lines):  # section by section: a timeout later still leaves the finished tables on disk
        print("\n".join(lines), flush=True)
        if out:
            out.write("\n".join(lines) + "\n")
            out.flush()

    try:
        emit(header(plan, argv))
        for section in only:
            emit(benches[section](plan))
    finally:
        if out:
            out.close()


if __name__ == "__main__":
    main()
