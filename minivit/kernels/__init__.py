"""Hand-written Triton kernels, each beside the plain-PyTorch reference it must equal.

Which path runs (`use_triton`):
  - CUDA tensors            -> the compiled Triton kernel;
  - CPU tensors             -> the PyTorch reference, or Triton's interpreter when TRITON_INTERPRET=1
                               (that is how the tests prove the kernels on a machine without a GPU);
  - MINIVIT_KERNELS=reference forces the reference everywhere (to compare, or to debug a model).
Without Triton installed (macOS, Windows) everything runs the reference.
"""
import os

import torch

try:
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except ImportError:  # no Triton wheel for this platform: define the kernels against a stand-in, never launch them

    class _Missing:
        """Stands in for `triton` and `tl` so that the kernel files still import; nothing of it ever runs."""

        def __getattr__(self, name):
            return _Missing()

        def __call__(self, *args, **kwargs):
            # `@triton.jit` and `@triton.autotune(...)(fn)` hand the function back unchanged
            return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else _Missing()

    triton = tl = _Missing()
    HAS_TRITON = False


def interpreter_on() -> bool:
    """True when Triton's CPU interpreter was switched on (TRITON_INTERPRET=1, set before importing triton)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """Should an op on tensor `x` run the Triton kernel (True) or the PyTorch reference (False)?"""
    mode = os.environ.get("MINIVIT_KERNELS", "auto")
    if mode not in ("auto", "reference", "triton"):
        raise ValueError(f"MINIVIT_KERNELS={mode!r}: use 'auto', 'triton' or 'reference'")
    if mode == "reference" or not HAS_TRITON:
        return False
    if x.is_cuda:
        return True
    if x.device.type == "cpu" and interpreter_on():
        return True
    if mode == "triton":
        raise ValueError(f"MINIVIT_KERNELS=triton but the tensor is on {x.device}: "
                         "use a CUDA device, or set TRITON_INTERPRET=1 before importing triton")
    return False


INTERPRETER_SMS = 2  # "SMs" in the interpreter: few, so that the tests still exercise several partial sums


def num_sms(x: torch.Tensor) -> int:
    """Streaming multiprocessors of x's GPU (INTERPRETER_SMS on the CPU): what persistent grids are sized by."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else INTERPRETER_SMS


def split_rows(M: int, block_m: int, programs_per_sm: int, x: torch.Tensor) -> tuple[int, int]:
    """Split M rows over at most programs_per_sm * num_sms(x) programs, each a whole number of block_m tiles, for
    kernels that keep one partial sum per program (a backward's dgamma / dbias). -> (programs, rows_per_program)."""
    tiles = -(-M // block_m)
    programs = min(tiles, programs_per_sm * num_sms(x))
    rows_per_program = -(-tiles // programs) * block_m
    return -(-M // rows_per_program), rows_per_program


def autocast_inputs(*tensors):
    """Under torch.autocast cast floating inputs to its dtype, as nn.Linear / nn.Conv2d would (gradients flow back
    through the cast); None entries stay None. Outside autocast the tensors are returned as they are."""
    device = tensors[0].device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return tensors
    dtype = torch.get_autocast_dtype(device)
    return tuple(t if t is None else t.to(dtype) for t in tensors)
