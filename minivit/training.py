"""What train_vit.py, train_resnet.py and train_dino.py share, written once: device and process setup, printing on
rank 0, per-iteration schedules, parameter groups, the precision context, atomic checkpoints with RNG state, the
JSONL log, the progress line, the NaN guard and the curve plot. Small functions; the loops stay in the scripts.

Plain `python train_x.py` runs one process (CUDA if present, else CPU); `torchrun --nproc_per_node=N train_x.py`
runs N processes that find each other through the RANK / LOCAL_RANK / WORLD_SIZE variables torchrun sets;
`srun --ntasks-per-node=N python train_x.py` does the same from SLURM's variables (see slurm_environment).
"""
import argparse
import contextlib
import ctypes
import json
import math
import os
import pickle
import random
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

try:
    import fcntl  # POSIX file locks (lock_output_dir)
except ImportError:  # Windows
    fcntl = None

# ------------------------------------------------------------------------------------------ processes and devices


@dataclass
class DistInfo:
    """Where this process runs: `rank` among `world_size` processes, `local_rank` on its machine, its `device`."""
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool  # rank 0: the one process that prints, logs and writes checkpoints
    distributed: bool  # a process group is initialised (launched by torchrun)

    @property
    def device_type(self) -> str:
        """"cuda", "cpu" or "mps": what torch.autocast and GradScaler take."""
        return self.device.type


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


def pick_device(device: str) -> torch.device:
    """"auto" (CUDA if available, else CPU), "cuda", "cuda:1", "cpu" or "mps" -> a torch.device that exists here;
    ValueError in one line otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cuda", "cpu", "mps"):
        raise ValueError(f"device {device!r} is not supported; use auto, cuda, cpu or mps")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but torch.cuda.is_available() is False; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} asked for but MPS is not available here; use --device cpu")
    return dev


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> the host names, in order: "node[01-03,07],gpu5" -> ["node01", "node02",
    "node03", "node07", "gpu5"]. Ranges keep their zero padding; several bracket groups in one name multiply out."""
    hosts, depth, start = [], 0, 0
    for i, ch in enumerate(nodelist + ","):  # split on the commas outside brackets
        depth += (ch == "[") - (ch == "]")
        if depth < 0 or depth > 1:
            raise ValueError(f"node list {nodelist!r}: unbalanced or nested brackets")
        if ch == "," and depth == 0:
            if i > start:
                hosts.extend(_expand_host(nodelist[start:i], nodelist))
            start = i + 1
    if depth:
        raise ValueError(f"node list {nodelist!r}: unbalanced brackets")
    return hosts


def _expand_host(name: str, nodelist: str) -> list[str]:
    """One entry of a node list, e.g. "rack[1-2]-n[01,03]" -> ["rack1-n01", "rack1-n03", "rack2-n01", "rack2-n03"]."""
    if "[" not in name:
        return [name]
    head, rest = name.split("[", 1)
    inside, tail = rest.split("]", 1)
    numbers = []
    for part in inside.split(","):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise ValueError(f"node list {nodelist!r}: {part!r} is not a number or a range like 01-04")
        numbers += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi or lo) + 1)]
    return [head + n + t for n in numbers for t in _expand_host(tail, nodelist)]


def slurm_environment(env) -> dict[str, str]:
    """torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) for a process that srun started
    (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, SLURM_JOB_NODELIST): {} when torchrun's are there already, when
    SLURM's are absent, or for a single task. As the official DINO's init_distributed_mode. Start the tasks with
    srun: a batch script running python itself under --ntasks=8 is one process that would wait for 7 others.

    MASTER_ADDR, unless set: the first host of the node list (rank 0 runs there, SLURM places tasks in order).
    MASTER_PORT, unless set: 10000 + the job id modulo 20000, so that two jobs sharing a first node differ."""
    if "RANK" in env or not all(k in env for k in ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")):
        return {}
    if int(env["SLURM_NTASKS"]) <= 1:
        return {}
    out = {"RANK": env["SLURM_PROCID"], "LOCAL_RANK": env["SLURM_LOCALID"], "WORLD_SIZE": env["SLURM_NTASKS"]}
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST"))
        if not nodelist:
            raise ValueError("SLURM tasks without SLURM_JOB_NODELIST: set MASTER_ADDR to the host of task 0")
        out["MASTER_ADDR"] = expand_nodelist(nodelist)[0]
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(10000 + int(env["SLURM_JOB_ID"]) % 20000) if "SLURM_JOB_ID" in env else "29500"
    return out


def setup_distributed(device: str = "auto") -> DistInfo:
    """Pick the device and, under torchrun or srun, join the process group (NCCL on CUDA, gloo on CPU).

    device: "auto" (CUDA if available, else CPU), "cuda", "cpu" or "mps" (single process only). Under torchrun each
    process takes GPU `local_rank`; under srun (several tasks, no torchrun) SLURM's variables are turned into
    torchrun's first (slurm_environment). On CUDA, fp32 matmuls may use TF32 (Ampere+): ~free speed, ~1e-3 relative
    error.
    """
    dev = pick_device(device)
    os.environ.update(slurm_environment(os.environ))
    distributed = "RANK" in os.environ  # set by torchrun (or from srun's), absent under plain `python script.py`
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) \
        if distributed else (0, 0, 1)
    if dev.type == "cuda":
        # % device_count: srun --gpus-per-task=1 shows each task only its own GPU, as cuda:0 (official DINO does this)
        dev = torch.device("cuda", local_rank % torch.cuda.device_count() if distributed else (dev.index or 0))
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if distributed:
        if dev.type == "mps":
            raise ValueError("torchrun with device 'mps' is not supported; use cuda or cpu")
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank, local_rank, world_size, dev, rank == 0, distributed)


def sync_batchnorm(model: nn.Module, info: DistInfo) -> nn.Module:
    """`model` with every BatchNorm (the 1-d ones of a DINO head with use_bn, the 2-d ones of a ResNet) made a
    SyncBatchNorm when several CUDA processes train together, so that batch statistics cover the global batch as
    in the official DINO code; otherwise `model` unchanged (SyncBatchNorm needs CUDA)."""
    if info.distributed and info.device.type == "cuda" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def cleanup_distributed() -> None:
    """Leave the process group, if any (call once at the end of a script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def get_rank() -> int:
    """This process's rank: from the process group, else from torchrun's RANK or srun's SLURM_PROCID, else 0."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only; other ranks stay quiet. Same arguments as print (flushes by default)."""
    if get_rank() == 0:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean of a floating tensor over all processes, as a new tensor; the tensor itself without a process group.

    A NaN on any rank makes the mean NaN on every rank, which is what lets `check_finite` stop all ranks together.
    With NCCL the tensor must be on this rank's GPU.
    """
    if not tensor.is_floating_point():
        raise ValueError(f"all_reduce_mean needs a floating tensor, got {tensor.dtype}; call .float() first")
    if not dist.is_initialized():
        return tensor
    out = tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python `random`, numpy and torch (CPU and every GPU) with seed + rank, so each process draws differently
    (as DINO's utils.fix_random_seeds does). Returns the seed used."""
    seed = seed + rank
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds all CUDA devices
    return seed


# ------------------------------------------------------------------------------- schedules, param groups, precision


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


# -------------------------------------------------------------------------------------------- checkpoints and RNG


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DistributedDataParallel and/or torch.compile: the one to save and to load into."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # what torch.compile wraps
            model = model._orig_mod
        else:
            return model


_PLAIN = (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


def _check_plain(obj, where: str) -> None:
    """Checkpoints are read back with torch.load(weights_only=True): only tensors, numbers, strings and containers."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__name__}; store plain types in a checkpoint (e.g. str(), float())")


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write `state` to `path` atomically on rank 0 (other ranks return): a temp file in the same folder, fsync, then
    os.replace, so a crash mid-write (even SIGKILL) leaves the previous checkpoint whole. Temp files left by such a
    crash are removed at the next save. A failed write (full disk, folder gone or read-only) stops the run with one
    line (SystemExit) and keeps the previous checkpoint.

    state: a dict with a "kind" string naming the script ("vit", "resnet", "dino") and plain values only
    (tensors, numbers, strings, lists, dicts), e.g. {"kind", "model", "optimizer", "epoch", "args": vars(args)}.
    """
    if get_rank() != 0:
        return
    if not isinstance(state, dict) or not isinstance(state.get("kind"), str):
        raise ValueError("a checkpoint state must be a dict with a 'kind' string such as 'vit', 'resnet' or 'dino'")
    _check_plain(state, "state")
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed save (lock_output_dir: no other writer)
        stale.unlink(missing_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        kept = f"the last good checkpoint is kept at {path}" if path.is_file() else "no checkpoint was saved yet"
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).split("\n")[0]
        raise SystemExit(f"error: could not write {path}: {reason}; {kept}; free some space or pick a writable "
                         "--output_dir, then rerun with --resume") from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# official DINO checkpoints pickle their argparse.Namespace of settings beside the tensors: a plain attribute bag
SAFE_GLOBALS = [argparse.Namespace]


def torch_load(path: str | os.PathLike, trust_pickle: bool = False):
    """torch.load onto the CPU without running code from the file: only tensors, numbers, strings, containers and
    the few SAFE_GLOBALS are unpickled (torch's weights_only loader), so a file carrying a pickled object (whose
    `__reduce__` could run anything) is refused with one line naming the file and the object's type.
    trust_pickle=True (the commands' --trust_pickle) loads such a file with the full unpickler: only for files
    whose origin you trust. A missing, truncated or non-torch file -> ValueError in one line too."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint file at {path}: check the path")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted copy? use another file")
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            refused = _unsafe_globals(path, str(e))
            if refused is None:  # no object was refused: the stream itself is broken
                raise ValueError(f"{path} is not a readable PyTorch file (corrupt, truncated, or another kind of "
                                 "file): torch.load raised UnpicklingError") from None
        except Exception as e:  # truncated zip, a text or image file, ...: torch's messages run to a page
            raise ValueError(f"{path} is not a readable PyTorch file (corrupt, truncated, or another kind of "
                             f"file): torch.load raised {type(e).__name__}") from None
    if not trust_pickle:
        raise ValueError(f"{path} holds pickled objects beyond tensors and plain containers ({refused}): refused, "
                         "since unpickling them can run code; if you trust the file, pass --trust_pickle "
                         "(trust_pickle=True in Python)")
    warnings.warn(f"{path}: unpickling {refused} because trust_pickle was given", stacklevel=2)
    return torch.load(path, map_location="cpu", weights_only=False)


def _unsafe_globals(path, message: str) -> str | None:
    """The types a weights_only load refused, for the error message (None if it refused none): read from the file
    without unpickling it (zip checkpoints), else from torch's message (the legacy format)."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        names = []
    names = names or sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))
    return ", ".join(names[:4]) if names else None


def load_checkpoint(path: str | os.PathLike, kind: str | None = None, arch: str | None = None) -> dict:
    """Read a checkpoint written by save_checkpoint onto the CPU (torch_load: no code runs from the file); check it
    is a `kind` checkpoint (e.g. "dino") of `arch` (compared with state["args"]["arch"]) when those are given.
    Every failure is a one-line ValueError (FileNotFoundError for a missing file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}; check the path (or drop --resume to start fresh)")
    state = torch_load(path)
    if not isinstance(state, dict) or not isinstance(state.get("kind"), str):
        raise ValueError(f"{path} is not a minivit training checkpoint (no 'kind' field); "
                         "for pretrained weights use minivit.models.load_pretrained")
    if kind is not None and state["kind"] != kind:
        raise ValueError(f"{path} is a {state['kind']!r} checkpoint (train_{state['kind']}.py), not {kind!r}; "
                         f"resume it with train_{state['kind']}.py or pick another file")
    args = state.get("args")
    saved_arch = args.get("arch") if isinstance(args, dict) else None
    if arch is not None and saved_arch is not None and saved_arch != arch:
        raise ValueError(f"{path} holds a {saved_arch} model but --arch is {arch}; pass --arch {saved_arch}")
    return state


def _local_rng_state(generators: dict | None) -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {"key": np_state["state"]["key"].tolist(), "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,  # this process's GPU
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }


def rng_state(generators: dict[str, torch.Generator] | None = None) -> list[dict]:
    """Every process's random state: python `random`, numpy, torch CPU, this process's GPU, and the named
    `generators` (e.g. {"augment": g}). A list indexed by rank; under torchrun it is gathered from all ranks, so
    call it on every rank (a collective) and save it from rank 0. Plain data, fit for save_checkpoint."""
    local = _local_rng_state(generators)
    if not dist.is_initialized():
        return [local]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, local)
    return states


def set_rng_state(states: list[dict], generators: dict[str, torch.Generator] | None = None) -> bool:
    """Restore what rng_state() captured, this rank's entry, so a resumed run draws the same numbers as an
    uninterrupted one. Returns False, changing nothing, when the checkpoint came from another number of processes
    (then the fresh seed_everything(seed, rank) streams stay)."""
    rank, world_size = get_rank(), dist.get_world_size() if dist.is_initialized() else 1
    if len(states) != world_size:
        return False
    s = states[rank]
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    n = s["numpy"]
    np.random.set_state(("MT19937", np.array(n["key"], dtype=np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(s["torch"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    for k, g in (generators or {}).items():
        g.set_state(s["generators"][k])
    return True


# -------------------------------------------------------------------------------- logs, progress, NaN guard, plot


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
    kept = [r for r in read_jsonl(path) if r.get("epoch", 0) <= epoch]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(r, default=_plain) + "\n" for r in kept))
    os.replace(tmp, path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSONL log, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


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
    fig.savefig(png_path, dpi=100)


def make_output_dir(path: str | os.PathLike) -> Path:
    """Create the run's output folder (parents too) if needed, check that files can be written in it, and return
    it as a Path; ValueError in one line otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output_dir {path} is a file, not a folder; pick another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a read-only folder or file system fails here, not after an epoch
            pass
    except OSError as e:
        raise ValueError(f"--output_dir {path} is not writable ({e.strerror or e}); pick another folder") from None
    return path


_held_locks = {}  # folder -> its open lock file (lock_output_dir): each lock lasts as long as this process


def lock_output_dir(path: str | os.PathLike) -> None:
    """Claim the output folder for this run (rank 0; other ranks return): an exclusive flock on path/.lock, which
    the operating system releases when the process ends, also when it is killed. A second run pointed at the same
    folder (two `python train_x.py` without torchrun) gets a ValueError naming the first run's pid instead of
    overwriting its checkpoint. Calling it again in the same process (a second main() in a notebook) is fine.
    No-op where fcntl is missing (Windows)."""
    key = str(Path(path).resolve())
    if get_rank() != 0 or fcntl is None or key in _held_locks:
        return
    f = open(Path(path) / ".lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip() or "?"
        f.close()
        raise ValueError(f"--output_dir {path} is in use by another run (pid {pid}): wait for it to end, or pick "
                         "another --output_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held_locks[key] = f


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (only those with requires_grad when trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
