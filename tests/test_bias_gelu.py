"""Bias + exact GELU, alone and as the ViT MLP (fc1 -> bias + GELU -> fc2 with GELU recomputed in the backward),
against the float64 reference: output and every gradient, on random row counts and widths off the blocks, every
dtype. Runs in Triton's interpreter on CPU, compiled on a GPU."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import nan_filled_empty
from minivit.kernels import bias_gelu as module
from minivit.kernels import use_triton
from minivit.kernels.bias_gelu import bias_gelu, bias_gelu_reference, mlp, mlp_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# max|ours - exact| <= TOL * (|exact| + max|exact|), exact = float64 math on the same rounded inputs.
# bias_gelu: fp32 erf and exp, one rounding of the result: fp16 2^-11, bf16 2^-8 (interpreter: truncation, 2^-7),
# with 2x margin; fp32 1e-5 (erf/exp to a few ulp). The MLP adds the GEMMs in the input dtype: a and da rounded
# before fc2's products, sums of up to 100 products: 4x the elementwise bound for fp16/bf16, 1e-4 for fp32 (CPU
# GEMMs in fp32, no TF32). A bug (a wrong column, a missed row) costs O(1).
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 8e-3), torch.bfloat16: (1.6e-2, 6.4e-2)}


def assert_close(name, ours, exact, tol, dtype):
    assert ours.dtype == dtype and ours.shape == exact.shape, f"{name}: {ours.dtype} {tuple(ours.shape)}"
    assert not ours.isnan().any(), f"{name}: NaN left, an element was never written"
    err = (ours.double() - exact).abs()
    bound = tol * (exact.abs() + exact.abs().max())
    assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g} > {bound.max().item():.3g} ({dtype})"


def check(fn, reference, inputs, tol, seed):
    dtype = inputs[0].dtype
    assert use_triton(inputs[0]), "these tests prove the Triton kernels: the dispatch must pick them"
    leaves = [t.detach().requires_grad_() for t in inputs]
    with nan_filled_empty():
        out = fn(*leaves)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
        grads = torch.autograd.grad(out, leaves, dout)
    leaves64 = [t.detach().double().requires_grad_() for t in inputs]
    out64 = reference(*leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, dout.double())
    for name, ours, exact in zip(["out"] + [f"grad {i}" for i in range(len(inputs))], (out, *grads), (out64, *grads64)):
        assert_close(name, ours, exact, tol, dtype)


def rand(g, *shape, scale=1.0, dtype=torch.float32):
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)


@given(M=st.integers(1, 70), F=st.one_of(st.sampled_from([1, 3, 17, 255, 257, 300]), st.integers(1, 300)),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(M=1, F=1, dtype=torch.float32, seed=0)  # one value
@example(M=37, F=300, dtype=torch.bfloat16, seed=1)  # F spans two 256-column tiles
def test_bias_gelu_matches_float64_reference(M, F, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    h, b = rand(g, M, F, scale=2.0, dtype=dtype), rand(g, F, dtype=dtype)  # z = h + b over [-6, 6]: both tails
    check(bias_gelu, bias_gelu_reference, [h, b], TOL[dtype][0], seed)


@given(M=st.integers(1, 40), D=st.sampled_from([1, 8, 24, 40]), hidden=st.sampled_from([4, 32, 100, 160]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(M=197, D=24, hidden=96, dtype=torch.bfloat16, seed=2)  # ViT-S/16's 197 tokens, several partial sums
def test_mlp_matches_float64_reference(M, D, hidden, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = rand(g, 2, M, D, dtype=dtype)
    w1, b1 = rand(g, hidden, D, scale=D ** -0.5, dtype=dtype), rand(g, hidden, dtype=dtype)
    w2, b2 = rand(g, D, hidden, scale=hidden ** -0.5, dtype=dtype), rand(g, D, dtype=dtype)
    check(mlp, mlp_reference, [x, w1, b1, w2, b2], TOL[dtype][1], seed)


def test_mlp_keeps_h_not_the_gelu_output():
    """The MLP's autograd graph keeps x, fc1's output h and the weights: not GELU's output (nor a copy of h)."""
    x = torch.randn(3, 5, 8, device=DEVICE)
    w1, b1, w2, b2 = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in [(32, 8), (32,), (8, 32), (8,)])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        mlp(x, w1, b1, w2, b2)
    hidden_sized = [t for t in saved if t.numel() == 3 * 5 * 32]
    assert len(hidden_sized) == 1, [tuple(t.shape) for t in saved]


def test_mlp_under_autocast_returns_its_dtype_and_fp32_grads():
    x = torch.randn(2, 9, 16, device=DEVICE)
    w1, b1, w2, b2 = (torch.randn(*s, device=DEVICE, requires_grad=True) for s in [(64, 16), (64,), (16, 64), (16,)])
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = mlp(x, w1, b1, w2, b2)
    assert out.dtype == torch.bfloat16
    exact = mlp_reference(*(t.detach().to(torch.bfloat16).double() for t in (x, w1, b1, w2, b2)))
    assert ((out.double() - exact).abs() <= TOL[torch.bfloat16][1] * 2 * exact.abs().max()).all()
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.isfinite().all() for p in (w1, b1, w2, b2))


@pytest.mark.parametrize("mode, kernel_runs", [("reference", False), ("auto", True)])
def test_dispatch(monkeypatch, mode, kernel_runs):
    """MINIVIT_KERNELS=reference runs exactly nn.Linear -> nn.GELU -> nn.Linear's ops; by default the kernels."""
    calls = []
    forward = module._forward
    monkeypatch.setattr(module, "_forward", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setenv("MINIVIT_KERNELS", mode)
    g = torch.Generator().manual_seed(3)
    x, w1, b1, w2, b2 = rand(g, 4, 8), rand(g, 16, 8), rand(g, 16), rand(g, 8, 16), rand(g, 8)
    out = mlp(x, w1, b1, w2, b2)
    assert len(calls) == int(kernel_runs)
    if not kernel_runs:
        fc1, fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        with torch.no_grad():
            for layer, w, b in ((fc1, w1, b1), (fc2, w2, b2)):
                layer.weight.copy_(w)
                layer.bias.copy_(b)
        assert torch.equal(out, fc2(torch.nn.GELU()(fc1(x))))


@pytest.mark.parametrize("h, b, match", [
    (torch.randn(2, 4), torch.randn(5), "bias"),
    (torch.randn(0, 4), torch.randn(4), "non-empty"),
    (torch.randn(2, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), "MINIVIT_KERNELS=reference"),
])
def test_bad_inputs_raise_value_error(h, b, match):
    with pytest.raises(ValueError, match=match):
        bias_gelu(h.to(DEVICE), b.to(DEVICE))


def test_launch_helpers_trace_under_torch_compile():
    """train_dino.py --compile traces the launchers with dynamo: the block choice must trace as one graph."""
    traced = torch.compile(lambda M, F: module._blocks(M, F), fullgraph=True, backend="eager")
    assert traced(50432, 1536) == module._blocks(50432, 1536)
