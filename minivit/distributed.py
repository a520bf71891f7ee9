"""Processes and devices, written once for the three training scripts: where this process runs (DistInfo), process
groups from torchrun's or SLURM's variables, SyncBatchNorm, printing on rank 0, the mean over processes, seeds.

Plain `python train_x.py` runs one process (CUDA if present, else CPU); `torchrun --nproc_per_node=N train_x.py`
runs N processes that find each other through the RANK / LOCAL_RANK / WORLD_SIZE variables torchrun sets;
`srun --ntasks-per-node=N python train_x.py` does the same from SLURM's variables (see slurm_environment).
"""
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


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
