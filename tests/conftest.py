"""Shared test setup.

On a machine without CUDA the Triton kernels run in Triton's interpreter, which must be switched on before
`triton` is first imported; on a GPU the very same tests run the compiled kernels.

Hypothesis profiles: `quick` (default, keeps CI short) and `thorough` (HYPOTHESIS_PROFILE=thorough pytest).
"""
import contextlib
import os
import sys
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # repo root importable

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "quick", max_examples=8, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

import pytest  # noqa: E402


@pytest.fixture
def reference_kernels(monkeypatch):
    """Run models on the plain-PyTorch path: the Triton interpreter is too slow for whole models, and the kernels
    are proven against these very references in tests/test_attention.py and tests/test_patch_embed.py."""
    monkeypatch.setenv("MINIVIT_KERNELS", "reference")


def script_env(**extra):
    """Environment for running a training script in a subprocess: reference kernels, no interpreter, 1 thread each."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(MINIVIT_KERNELS="reference", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def run_command(cmd, timeout=300, check=True, **kwargs):
    """subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs) -> CompletedProcess.

    A timeout, or a non-zero exit when check=True, fails the test with the command, how long it ran and the end of
    its output: on a busy CI machine that tells a slow run from a stuck one. Timeouts are generous (300 s)."""
    import shlex
    import subprocess
    import time

    line = " ".join(shlex.quote(str(c)) for c in cmd)
    start = time.perf_counter()
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"timed out after {timeout} s: {line}\n{out[-2000:]}\n{err[-2000:]}")
    seconds = time.perf_counter() - start
    if check and proc.returncode != 0:
        pytest.fail(f"exit {proc.returncode} after {seconds:.1f} s: {line}\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-3000:]}")
    return proc


@contextlib.contextmanager
def nan_filled_empty():
    """Every torch.empty / empty_like in the block returns NaNs, so an element a kernel never writes shows up (the
    kernel tests run each kernel inside it)."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with mock.patch.object(torch, "empty", lambda *a, **k: poison(empty(*a, **k))), \
            mock.patch.object(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k))):
        yield
