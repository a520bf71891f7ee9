"""Checkpoints and the run's folder: atomic saves of plain types only, loading without unpickling arbitrary objects
(the pickle policy), the RNG state that makes --resume exact, the output folder's checks and lock, and the one-line
stop on Ctrl-C / SIGTERM that says which epoch is saved and the command that resumes it.
"""
import argparse
import contextlib
import os
import pickle
import random
import re
import shlex
import signal
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from minivit import cli
from minivit.distributed import get_rank

try:
    import fcntl  # POSIX file locks (lock_output_dir)
except ImportError:  # Windows
    fcntl = None


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


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Yield a temporary path beside `path` (same extension, for writers that go by it: savefig, PIL) to write the
    file to; when the block ends it replaces `path` in one rename, and when it fails or is interrupted (Ctrl-C,
    SIGTERM) the temporary file is removed, so nobody ever finds a half-written file."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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


def make_output_dir(path: str | os.PathLike, flag: str = "--output_dir", files=()) -> Path:
    """Create the run's output folder (parents too) if needed, check that files can be written in it, and return
    it as a Path; ValueError in one line otherwise, naming the path as `flag` gave it. files: the names the run
    will write in it ("log.jsonl"; "attention/" for a folder), refused now if a folder (a file) is in the way, not
    at the end of training."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; pick another path")
    for name in files:
        folder = name.endswith("/")
        if (path / name).exists() and (path / name).is_dir() != folder:
            raise ValueError(f"{flag} {path} holds a {'file' if folder else 'folder'} {name.rstrip('/')} where "
                             f"the run writes a {'folder' if folder else 'file'}; move it away or pick another {flag}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):  # a read-only folder or file system fails here, not after an epoch
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path} is not writable ({e.strerror or e}); pick another folder") from None
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


# ------------------------------------------------------------------------------------------- Ctrl-C and SIGTERM


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread on SIGINT (Ctrl-C) or SIGTERM (what SLURM sends at the time limit, and `kill`)
    inside stop_cleanly. A KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class RunOnDisk:
    """What stop_cleanly reports: the last checkpoint this run saved or resumed from (saved(path, epoch)) and the
    command that continues it: this script's own argv, plus --resume if absent."""

    def __init__(self, script, argv):
        self.script, self.argv = os.path.relpath(script), list(argv)
        self.path, self.epoch = None, None

    def save(self, path, state: dict) -> None:
        """save_checkpoint(path, state) with Ctrl-C and SIGTERM held until it is written and noted: a signal during
        the save stops the run just after it, and the line names the epoch in the file (state["epoch"])."""
        with _signals_held():
            save_checkpoint(path, state)
            self.saved(path, state["epoch"])

    def saved(self, path, epoch: int) -> None:
        """Note that `path` holds `epoch` (save() does; call it after resuming from a checkpoint)."""
        self.path, self.epoch = path, epoch

    def command(self, resume: bool) -> str:
        """The command line that runs this script again (torchrun with as many processes, if torchrun started
        it), with --resume added when `resume`."""
        launcher = ["python"]
        if "TORCHELASTIC_RUN_ID" in os.environ:  # set by torchrun
            launcher = ["torchrun", f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)}"]
        resume_flag = ["--resume"] if resume and "--resume" not in self.argv else []
        return shlex.join([*launcher, self.script, *self.argv, *resume_flag])

    def out_of_memory_message(self, error) -> str:
        """The one line for a run that ran out of memory: the allocator's words, the fix, what resume starts from."""
        saved = (f"{self.path} holds epoch {self.epoch}; resume with: {self.command(resume=True)}"
                 if self.epoch is not None else "no checkpoint was saved yet")
        return f"error: out of memory ({cli.first_line(error, 160)}); lower --batch_size (or the image or crop sizes) and run again; {saved}"

    def message(self, signum) -> str:
        name = {signal.SIGINT: "Ctrl-C (SIGINT)", signal.SIGTERM: "SIGTERM"}.get(signum, signal.Signals(signum).name)
        if self.epoch is None:
            return (f"error: stopped by {name} before this run saved a checkpoint; nothing to resume, start again "
                    f"with: {self.command(resume=False)}")
        return (f"error: stopped by {name}; {self.path} holds epoch {self.epoch} (saved whole), continue from "
                f"there with: {self.command(resume=True)}")


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM in the block; one that arrives meanwhile is delivered when it ends (POSIX; elsewhere
    a no-op)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def stop_cleanly(script, argv=None):
    """Run a training script's body so that Ctrl-C or SIGTERM stops it at once with one line on stderr (rank 0)
    naming the saved epoch and the exact command that resumes it, and exit status 128 + signal (130, 143), instead
    of a KeyboardInterrupt traceback from inside autograd (or, for SIGTERM, a silent death). Nothing is saved
    mid-epoch: a resumed run redoes the interrupted epoch from its start, exactly as it would have run. Every file
    of the run is written atomically (save_checkpoint, atomic_write), so the interrupt leaves no half-written file.

        with checkpoint.stop_cleanly(__file__, argv) as run:
            ...
            run.save(path, state)      # save_checkpoint, noting state["epoch"] as the one to resume from
    """
    run = RunOnDisk(script, sys.argv[1:] if argv is None else argv)

    def interrupt(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield run
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        for s in previous:  # a second Ctrl-C while the line is printed ends the process as Python would
            signal.signal(s, signal.SIG_DFL)
        if get_rank() == 0:
            print(run.message(signum), file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    except (MemoryError, RuntimeError) as e:  # a batch or image size beyond the machine, found mid-run
        if not cli.out_of_memory(e):
            raise
        raise SystemExit(run.out_of_memory_message(e)) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
