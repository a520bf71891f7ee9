"""What the command lines share (the three train scripts and the `python -m minivit.*` tools): bad input ends in
one line, `error: <the problem>; <the fix>`, with a non-zero exit and no traceback, before anything is written.

    parser = cli.ArgumentParser(description=...)          # argparse's own errors in one line too
    cli.add_trust_pickle(parser)                          # --trust_pickle, for the commands that read weights
    args = parser.parse_args(argv)
    cli.check_output_file(args.out, "--out")              # each file a command will write, before any work
    cli.check_args(parser, args, positive=("lr", "epochs"), probability=("mass",), ordered=("crops_scale",))
    args, name, applied = cli.parse_with_preset(parser, argv, choose)   # presets as defaults (the train scripts)
    with cli.errors():                                    # minivit's ValueError / FileNotFoundError -> one line
        model = load_backbone(...)
"""
import argparse
import contextlib
import math
import os
import tempfile


class ArgumentParser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose errors (unknown flag, bad choice, a value that is not a number) print one line,
    `error: argument --k: invalid int value: 'x'; see --help`, instead of the usage block, and exit with status 2."""

    def error(self, message):
        self.exit(2, f"error: {message}; see --help\n")


def fail(message: str):
    """Stop the command with `error: message` on stderr and exit status 1 (SystemExit, so no traceback)."""
    raise SystemExit(f"error: {message}")


@contextlib.contextmanager
def errors():
    """Turn the ValueError / FileNotFoundError that minivit raises for bad input (an unknown --arch, a missing
    folder, a checkpoint of another model, a refused pickle) into a one-line `error: ...` exit; and running out of
    memory (a --batch_size or --image_size far beyond the machine) too."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    except (MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        if not out_of_memory(e):
            raise
        fail(f"out of memory ({first_line(e)}); lower --batch_size or --image_size")


def first_line(error, limit=200) -> str:
    """An exception's first line, at most `limit` characters (its type's name when it has no message)."""
    return (str(error).splitlines() or [type(error).__name__])[0][:limit]


def out_of_memory(error) -> bool:
    """A failed allocation: numpy's and Python's MemoryError, torch's OutOfMemoryError (CUDA) or the CPU
    allocator's RuntimeError."""
    return isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError" or any(
        words in str(error) for words in ("can't allocate memory", "out of memory"))


def check_output_file(path, flag: str) -> None:
    """Before any work: stop in one line unless the file `path` (given to `flag`, e.g. "--out") can be written: not
    a folder, under a folder and not under a regular file, in a writable place. Missing parent folders are created,
    as checkpoint.make_output_dir creates --output_dir. Call it for every output-file flag of a command."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        fail(f"{flag} {path} is a folder; give the path of a file (in it or elsewhere)")
    parent = folder
    while not os.path.exists(parent):  # the first part of the path that exists must be a folder
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        fail(f"{flag} {path}: {parent} is a file, not a folder; pick another path")
    try:
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(path):
            with open(path, "a"):  # an existing file: can it be written? (opened for appending, left as it was)
                pass
        else:
            with tempfile.TemporaryFile(dir=folder):  # a read-only folder or file system fails here
                pass
    except OSError as e:
        fail(f"{flag} {path} cannot be written ({e.strerror or e}); pick a writable location")


def parse_with_preset(parser, argv, choose):
    """Parse argv with a preset's values as the defaults, so that flags given on the command line still win: a first
    pass tells which preset applies, choose(args) -> (name or None, {flag: value}); the second parses with those
    defaults. -> (args, name, applied: the preset's flags that kept its value). The one preset idiom of the three
    train scripts (their OFFLINE / IMAGENET / recipe dicts)."""
    name, preset = choose(parser.parse_known_args(argv)[0])
    parser.set_defaults(**preset)
    args = parser.parse_args(argv)
    return args, name, {k: v for k, v in preset.items() if getattr(args, k) == v}


def as_flags(values: dict) -> str:
    """{flag: value} as the command line that gives it: '--epochs 20 --no-hflip --crops_scale 0.4 1.0'."""
    def one(k, v):
        if isinstance(v, bool):
            return f"--{k}" if v else f"--no-{k}"
        return f"--{k} {' '.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
    return " ".join(one(k, v) for k, v in values.items())


def add_trust_pickle(parser) -> None:
    """--trust_pickle: the opt-in that lets a command unpickle weight files holding more than tensors."""
    parser.add_argument("--trust_pickle", action="store_true", help="also load weight files that hold pickled "
                        "Python objects beyond tensors (refused by default: unpickling can run code). Only for files "
                        "you trust; official DINO checkpoints load without it")


def _default(parser, name) -> str:
    """' (default X)' for the error message, or '' when the flag has no default."""
    default = parser.get_default(name)
    if default is None:
        return ""
    return f" (default {' '.join(map(str, default)) if isinstance(default, (list, tuple)) else default})"


_RULES = {  # rule -> (test of one value, what the error says)
    "positive": (lambda x: x > 0, "must be > 0"),
    "non_negative": (lambda x: x >= 0, "must be >= 0"),
    "probability": (lambda x: 0 <= x <= 1, "is a probability: it must lie in [0, 1]"),
    "fraction": (lambda x: 0 < x <= 1, "must lie in (0, 1]"),
    "ordered": (lambda pair: 0 < pair[0] <= pair[1] <= 1, "must be two fractions LOW HIGH, 0 < LOW <= HIGH <= 1"),
    # numpy takes seeds in [0, 2**32); each process adds its rank, so half of that leaves room for any launch
    "seed": (lambda x: 0 <= x < 2 ** 31, "must lie in [0, 2**31)"),
}


def check_args(parser, args, **rules) -> None:
    """Check numeric flags after parsing; the first bad one stops the command in one line naming the flag, the
    rule and the flag's default. Each keyword is a rule of _RULES with the names of `args` it applies to:
        positive      > 0 (sizes, counts, rates, temperatures)
        non_negative  >= 0 (warm-up epochs, intervals where 0 means off)
        probability   in [0, 1]
        fraction      in (0, 1] (a share that must not be empty)
        ordered       a pair LOW HIGH with 0 < LOW <= HIGH <= 1 (crop scales)
        seed          an int in [0, 2**31) (numpy's range, with room for the rank)
    A flag left at None ("not given") is skipped; NaN and infinity always fail."""
    for rule, names in rules.items():
        test, words = _RULES[rule]
        for name in names:
            value = getattr(args, name)
            if value is None:
                continue
            # a flag with nargs="+" (--k 10 20) is checked value by value, an "ordered" pair as a whole
            items = [value] if rule == "ordered" or not isinstance(value, (list, tuple)) else value
            for x in items:
                finite = all(math.isfinite(v) for v in (x if isinstance(x, (list, tuple)) else [x]))
                if not (finite and test(x)):
                    shown = " ".join(map(str, x)) if isinstance(x, (list, tuple)) else x
                    fail(f"--{name} {shown}: {words if finite else 'must be a finite number'}"
                         f"{_default(parser, name)}")


def parse_weights(specs):
    """['dino=runs/dino/teacher_backbone.pth', 'random=none', 'file.pth'] -> [(label, path or None)]. Without a
    label the file's stem names it ('random' for none). A one-line error exit on a repeated label or a missing
    file."""
    parsed = []
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            path = spec
            label = "random" if spec.lower() == "none" else os.path.splitext(os.path.basename(spec))[0]
        path = None if path.lower() == "none" else path
        if path is not None and not os.path.isfile(path):
            fail(f"--weights {spec}: no such file {path!r}; give label=PATH or label=none (random init)")
        if label in (name for name, _ in parsed):
            fail(f"--weights: the label {label!r} appears twice; give each file its own label=PATH")
        parsed.append((label, path))
    return parsed
