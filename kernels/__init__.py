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
