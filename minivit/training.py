"""The training loop's small pieces, shared by train_vit.py, train_resnet.py and train_dino.py: per-iteration
schedules, parameter groups, the precision context, the JSONL log, the progress line, the NaN guard and the curve
plot. Small functions; the loops stay in the scripts. Processes live in distributed.py, checkpoints in checkpoint.py.
"""
import contextlib
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from minivit.checkpoint import atomic_write
from minivit.distributed import all_reduce_mean, get_rank, print0


def keep_freed_memory():
    """Keep the memory of freed tensors in the process (Linux, glibc), for the CPU's eager tensor ops. -> bool:
    whether it applied (False elsewhere: nothing changes).

    glibc hands every allocation above its mmap threshold straight to the kernel and back on free, so each large
    temporary of an eager op (a batch of crops is tens of MB) arrives as fresh pages, each one faulted in and
    zeroed: on the data bench's multi-crop that was ~20% of the time. PyTorch's CPU performance guide swaps in
    jemalloc or tcmalloc for this; mallopt gets glibc to do the same without an install: M_MMAP_THRESHOLD and
    M_TRIM_THRESHOLD at 1 GiB keep blocks below that in the heap for reuse. Forked loader workers inherit it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


MAX_STEPS = 10 ** 8  # ~300 years at 10 steps a second; ImageNet's 300 epochs of DeiT are 375,000


def check_steps(epochs: int, niter_per_ep: int) -> None:
    """ValueError in one line when epochs x steps is more than MAX_STEPS: the per-step schedules would not fit in
    memory (--epochs 10**11: 32 TiB each)."""
    if epochs * niter_per_ep > MAX_STEPS:
        raise ValueError(f"--epochs {epochs} of {niter_per_ep} steps is {epochs * niter_per_ep:,} steps, more than a "
                         f"run can take ({MAX_STEPS:,}: the schedules alone would be {8 * MAX_STEPS / 2**30:.1f} GB "
                         "each); lower --epochs")


def cosine_schedule(base_value: float, final_value: float, epochs: int, niter_per_ep: int,
                    warmup_epochs: float = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """One value per iteration (float64, length epochs * niter_per_ep), DINO's schedule for lr, weight decay and
    teacher momentum: a linear warm-up from `start_warmup_value`, then a half cosine from `base_value` to `final_value`.

    schedule[warmup_iters] == base_value (the first iteration after warm-up) and schedule[-1] == final_value exactly
    (DINO's official schedule stops one step short of the final value).
    """
    total = epochs * niter_per_ep
    warmup_iters = int(round(warmup_epochs * niter_per_ep))
    if total <= 0:
        raise ValueError(f"epochs ({epochs}) and niter_per_ep ({niter_per_ep}) must be positive")
    check_steps(epochs, niter_per_ep)
    if not 0 <= warmup_iters < total:
        raise ValueError(f"warmup_epochs ({warmup_epochs}) must be >= 0 and smaller than epochs ({epochs}); "
                         f"lower --warmup_epochs for short runs")
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters, endpoint=False)
    n = total - warmup_iters
    t = np.arange(n) / max(n - 1, 1)  # 0 -> 1 over the cosine part
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(math.pi * t))
    cosine[0], cosine[-1] = base_value, final_value  # exact, not 1e-17 away
    return np.concatenate([warmup, cosine])


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW/SGD groups: "decay" (weight matrices and conv kernels, with `weight_decay`) and "no_decay" (biases
    and every 1-D parameter: LayerNorm/BatchNorm weights). Like DINO's get_params_groups, `cls_token` and `pos_embed`
    (3-D) are decayed; timm exempts them, DINO does not. Frozen parameters (requires_grad False) are left out.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def set_schedules(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float | None = None) -> None:
    """Set this iteration's lr on every group and, if given, the weight decay on the "decay" groups only.
    Values are cast to Python floats: a numpy float in the optimizer state would make the checkpoint unloadable
    with torch.load(weights_only=True)."""
    for group in optimizer.param_groups:
        group["lr"] = float(lr)
        if weight_decay is not None and group.get("name") == "decay":
            group["weight_decay"] = float(weight_decay)


def cpu_has_fast_bf16() -> bool:
    """True when this CPU multiplies bf16 matrices in hardware (Intel AMX tiles, Sapphire Rapids and later): there
    bf16 autocast sped the offline DINO step up. Without them (AVX2, AVX-512 without AMX) bf16 is emulated: on an
    AVX2 EPYC the ViT-S/8 step ran 15x slower in bf16 than in fp32 (README, Results)."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # private, present in torch >= 2.3
    return bool(probe and probe())


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map "auto" to "bf16" on a GPU with bf16 (Ampere+) or a CPU with AMX (cpu_has_fast_bf16), and "fp32"
    elsewhere; check the others fit the device."""
    device = torch.device(device)
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        return "bf16" if device.type == "cpu" and cpu_has_fast_bf16() else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision {precision!r} is not one of auto, fp32, bf16, fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"fp16 needs a CUDA GPU (loss scaling); on {device.type} use bf16 or fp32")
    return precision


def autocast_context(device: torch.device | str, precision: str):
    """The context the forward pass (and loss) runs in: autocast to bf16/fp16, or a null context for fp32.
    Parameters, gradients and optimizer state stay fp32 either way."""
    device_type = torch.device(device).type
    precision = resolve_precision(precision, torch.device(device))
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def make_grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that scales the loss only for fp16 (whose small gradients underflow); for fp32/bf16 each of its
    calls (scale, unscale_, step, update) passes straight through, so backward/clip/step is written once."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=resolve_precision(precision, device) == "fp16")


def _plain(x):
    return x.item() if hasattr(x, "item") else str(x)  # tensors and numpy scalars -> numbers


class JsonlLogger:
    """Appends one JSON object per line to `path` (rank 0 only; elsewhere a no-op), flushed at every write, so a
    crashed or resumed run keeps everything logged so far. `log(epoch=3, train_loss=1.2, lr=5e-4)`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.enabled = get_rank() == 0

    def log(self, record: dict | None = None, **fields) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({**(record or {}), **fields}, default=_plain) + "\n")
                f.flush()


def trim_log(path: str | os.PathLike, epoch: int) -> None:
    """Drop the records of epochs after `epoch` from a JSONL log (rank 0; rewritten atomically), so a run resumed
    from the checkpoint of `epoch` does not log an epoch twice when it was killed between logging and saving."""
    path = Path(path)
    if get_rank() != 0 or not path.is_file():
        return
    kept = [r for r in read_jsonl(path, skip_torn=True) if r.get("epoch", 0) <= epoch]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(r, default=_plain) + "\n" for r in kept))


def read_jsonl(path: str | os.PathLike, skip_torn: bool = False) -> list[dict]:
    """All records of a JSONL log, in order. A line that is not a JSON object is a one-line ValueError naming the
    file and the line, or, with skip_torn (trim_log), dropped: the torn last line of a run killed mid-write."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                record = e
            if isinstance(record, dict):
                records.append(record)
            elif not skip_torn:
                raise ValueError(f"{path} line {number} is not a JSON object ({record}); a run killed while "
                                 "writing it? delete that line")
    return records


def format_time(seconds: float) -> str:
    """Seconds as h:mm:ss, e.g. 3753.2 -> '1:02:33' (hours keep counting past 24)."""
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """One status line every `every` iterations (and at the end of each epoch), on rank 0:

        ep 3/100 it 120/500 loss 4.1231 lr 1.2e-04 312 img/s elapsed 0:10:02 eta 1:02:33

    epoch and it are 0-based in the call and shown 1-based; loss is the mean since the last line; img/s counts the
    `images` passed (pass the global batch, batch * world_size); eta extrapolates this run's average speed.
    """

    def __init__(self, epochs: int, iters_per_epoch: int, every: int = 10, start_epoch: int = 0):
        self.epochs, self.iters_per_epoch, self.every = epochs, iters_per_epoch, max(1, every)
        self.remaining = (epochs - start_epoch) * iters_per_epoch
        self.start = self.last = time.perf_counter()
        self.done = 0
        self.losses, self.images = [], 0

    def step(self, epoch: int, it: int, loss: float, lr: float, images: int, **extra) -> str | None:
        """Record one iteration; print and return the line when one is due, else None. `extra` (e.g. wd=0.04)
        is appended as 'key value'."""
        self.done += 1
        self.losses.append(float(loss))
        self.images += images
        if (it + 1) % self.every and it + 1 != self.iters_per_epoch:
            return None
        now = time.perf_counter()
        elapsed = now - self.start
        eta = elapsed / self.done * max(self.remaining - self.done, 0)
        line = (f"ep {epoch + 1}/{self.epochs} it {it + 1}/{self.iters_per_epoch} "
                f"loss {sum(self.losses) / len(self.losses):.4f} lr {lr:.1e} "
                f"{self.images / max(now - self.last, 1e-9):.0f} img/s "
                f"elapsed {format_time(elapsed)} eta {format_time(eta)}")
        line += "".join(f" {k} {v:.4g}" if isinstance(v, float) else f" {k} {v}" for k, v in extra.items())
        self.last, self.losses, self.images = now, [], 0
        print0(line)
        return line


def check_finite(loss: torch.Tensor | float, epoch: int, it: int, checkpoint_path: str | os.PathLike) -> float:
    """Stop the run (SystemExit) if the loss is NaN or inf, before anything overwrites the last good checkpoint.
    Returns the loss averaged over processes as a float (one scalar all-reduce; with NCCL pass the loss tensor as it
    is, on the GPU); a NaN on any rank stops every rank together. epoch, it: 0-based, shown 1-based."""
    loss = loss if torch.is_tensor(loss) else torch.tensor(float(loss))
    value = all_reduce_mean(loss.detach().float()).item()
    if math.isfinite(value):
        return value
    if get_rank() != 0:
        raise SystemExit(1)
    kept = (f"the last good checkpoint is kept at {checkpoint_path}" if os.path.isfile(checkpoint_path)
            else "no checkpoint was saved yet")
    raise SystemExit(f"loss is {value} at epoch {epoch + 1} step {it + 1}; {kept}; "
                     "try a lower lr, more warm-up or --precision fp32")


def plot_curves(jsonl_path: str | os.PathLike, png_path: str | os.PathLike, keys: list[str]) -> None:
    """A PNG with one subplot per key of the JSONL log (x = its "epoch" field); records lacking a key are skipped.
    matplotlib is imported here, and draws off-screen (Agg) without touching pyplot's global backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    records = [r for r in read_jsonl(jsonl_path) if "epoch" in r]
    if not records:
        raise ValueError(f"{jsonl_path} has no records with an 'epoch' field to plot")
    fig = Figure(figsize=(6, 2.2 * len(keys)), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, key in zip(np.atleast_1d(fig.subplots(len(keys), 1, sharex=True)), keys):
        points = [(r["epoch"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    ax.set_xlabel("epoch")
    with atomic_write(png_path) as tmp:  # an interrupt mid-write leaves the previous PNG
        fig.savefig(tmp, dpi=100)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with requires_grad when trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
