"""The fused residual add + LayerNorm against the float64 reference: s, y and the gradients of x, branch, gamma and
beta, on random row counts and widths off the power-of-two blocks (D = 1 .. 200, ViT-S's 384), every dtype, with and
without a branch, with and without a downstream use of s, y cast to another dtype. Runs in Triton's interpreter on
CPU, compiled on a GPU."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import nan_filled_empty
from minivit.kernels import use_triton
from minivit.kernels.layernorm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# max|ours - exact| <= TOL * (|exact| + scale), exact = float64 math on the same rounded inputs, scale = max|exact|
# (for dx and dgamma: at least their natural scale, see check(), which degenerate rows need).
# Forward: y is rounded once to its dtype: fp16 2^-11, bf16 2^-8 (the interpreter truncates: 2^-7), fp32 sums of
# <= 400 values ~1e-6. Gradients: xhat is recomputed from the rounded y, |err| <~ u (|xhat| + |beta / gamma|) with
# |beta / gamma| <= 2 here (gamma in +-[0.5, 1.5], beta unit normal clipped), which the row sums carry into dx,
# dgamma, dbeta: ~3u, plus the final rounding -> 4u for fp16/bf16 (bf16 with the interpreter's truncation:
# 2 * 4 * 2^-8 ~ 3e-2). fp32: 2e-5 (sums of up to 400 rows of fp32 products). A bug costs O(1).
TOL = {torch.float32: (1e-5, 2e-5), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3.2e-2)}


def make_inputs(M, D, dtype, branch, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, D, generator=g) * 2 + 0.5).to(DEVICE, dtype)  # an offset: the mean matters
    br = torch.randn(M, D, generator=g).to(DEVICE, dtype) if branch else None
    sign = torch.where(torch.rand(D, generator=g) < 0.5, -1.0, 1.0)
    weight = (sign * (0.5 + torch.rand(D, generator=g))).to(DEVICE)  # fp32 parameters, as in the model
    bias = torch.randn(D, generator=g).clamp(-2, 2).to(DEVICE)
    return x, br, weight, bias


def check(M, D, dtype, branch, use_s, out_dtype, seed):
    x, br, weight, bias = make_inputs(M, D, dtype, branch, seed)
    assert use_triton(x), "these tests prove the Triton kernels: the dispatch must pick them"
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (x, br, weight, bias)]
    g = torch.Generator().manual_seed(seed + 1)
    y_dtype = out_dtype or dtype
    dy = torch.randn(M, D, generator=g).to(DEVICE, y_dtype)
    ds = torch.randn(M, D, generator=g).to(DEVICE, dtype)
    with nan_filled_empty():
        s, y = add_layer_norm(*leaves, eps=1e-6, out_dtype=out_dtype)
        outs, grads_out = ([s, y], [ds, dy]) if (use_s and branch) else ([y], [dy])
        wanted = [t for t in leaves if t is not None]
        grads = torch.autograd.grad(outs, wanted, grads_out)

    # exact: everything after the add in float64, from the s the kernel stored (within 1 ulp of PyTorch's rounded
    # add, checked below: the interpreter truncates where a GPU rounds to nearest), with the gradient of the exact add
    s_rounded = (x + br) if branch else x
    leaves64 = [t.detach().double().requires_grad_() if t is not None else None for t in (x, br, weight, bias)]
    s64 = leaves64[0] + leaves64[1] if branch else leaves64[0]
    s64_r = s64 + (s.detach().double() - s64).detach()
    y64 = torch.nn.functional.layer_norm(s64_r, (D,), leaves64[2], leaves64[3], 1e-6)
    outs64 = [s64_r, y64] if (use_s and branch) else [y64]
    grads64 = torch.autograd.grad(outs64, [t for t in leaves64 if t is not None], [g_.double() for g_ in grads_out])

    if branch:
        assert s.dtype == dtype and (s.double() - s_rounded.double()).abs().max() <= \
            TOL[dtype][0] * s_rounded.double().abs().max(), "s"
    else:
        assert s is leaves[0]  # no branch: the stream passes through untouched
    names = ["y", "dx", "dbranch", "dweight", "dbias"] if branch else ["y", "dx", "dweight", "dbias"]
    # dx's natural scale is rstd * |dy * gamma|: in degenerate rows (D <= 2, two equal values) the exact dx is ~0
    # while rstd is huge, and the rounding of y, amplified by rstd, is all that is left
    rstd64 = 1 / (s64_r.detach().var(-1, unbiased=False) + 1e-6).sqrt()
    dx_scale = (rstd64.max() * (dy.double() * weight.double()).abs().max()).item()
    # dgamma = sum_rows dy * xhat: each xhat off by ~u (1 + |beta / gamma|), random signs over M rows; D = 1 has
    # xhat = 0 exactly, so this is all there is
    dw_scale = (M ** 0.5 * dy.double().abs().max() * (1 + (bias / weight).abs().max().double())).item()
    for name, ours, exact in zip(names, (y, *grads), (y64, *grads64)):
        expected_dtype = y_dtype if name == "y" else (torch.float32 if name in ("dweight", "dbias") else dtype)
        assert ours.dtype == expected_dtype and ours.shape == exact.shape, f"{name}: {ours.dtype} {ours.shape}"
        assert not ours.isnan().any(), f"{name}: NaN left, an element was never written"
        # the gradients carry y's rounding (xhat is recomputed from y): the coarser of the two dtypes
        tol = TOL[y_dtype][0] if name == "y" else max(TOL[dtype][1], TOL[y_dtype][1])
        err = (ours.double() - exact).abs()
        scale = max(exact.abs().max().item(), {"dx": dx_scale, "dbranch": dx_scale, "dweight": dw_scale}.get(name, 0))
        bound = tol * (exact.abs() + scale)
        assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g} > {bound.max().item():.3g} ({dtype})"


@given(M=st.integers(1, 40), D=st.one_of(st.sampled_from([1, 2, 3, 17, 48, 127, 129, 200]), st.integers(1, 200)),
       dtype=st.sampled_from(DTYPES), branch=st.booleans(), use_s=st.booleans(),
       cast=st.booleans(), seed=st.integers(0, 2**16))
@example(M=1, D=1, dtype=torch.float32, branch=True, use_s=True, cast=False, seed=0)  # one value: y = beta, dx = ds
@example(M=37, D=384, dtype=torch.bfloat16, branch=True, use_s=True, cast=False, seed=1)  # a ViT-S local crop
@example(M=33, D=100, dtype=torch.float32, branch=True, use_s=True, cast=True, seed=2)  # fp32 stream, bf16 y
def test_matches_float64_reference(M, D, dtype, branch, use_s, cast, seed):
    out_dtype = (torch.bfloat16 if dtype != torch.bfloat16 else torch.float16) if cast else None
    check(M, D, dtype, branch, use_s, out_dtype, seed)


def test_several_partial_sums_of_dgamma():
    """300 rows: the weight gradients are reduced by several programs, then summed."""
    check(300, 24, torch.float32, True, True, None, seed=3)


def test_mixed_stream_and_branch_dtypes():
    """An fp32 stream plus a bf16 branch gives an fp32 s, as PyTorch's type promotion; each gets its own dtype back."""
    x, _, w, b = make_inputs(5, 40, torch.float32, False, seed=4)
    br = torch.randn(5, 40, device=DEVICE).to(torch.bfloat16)
    x.requires_grad_()
    br.requires_grad_()
    s, y = add_layer_norm(x, br, w, b)
    s_ref, y_ref = add_layer_norm_reference(x, br, w, b, 1e-6)
    assert s.dtype == y.dtype == torch.float32
    torch.testing.assert_close(s, s_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    (s.sum() + y.square().sum()).backward()
    assert x.grad.dtype == torch.float32 and br.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("mode, kernel_runs", [("reference", False), ("auto", True)])
def test_dispatch_and_reference_is_the_old_layernorm(monkeypatch, mode, kernel_runs):
    """MINIVIT_KERNELS=reference runs exactly F.layer_norm in the input dtype (minivit.vit.LayerNorm before the
    kernel); by default (CUDA, or the interpreter on CPU, as in these tests) the Triton launcher runs."""
    from minivit.kernels import layernorm as module
    calls = []
    forward = module._forward
    monkeypatch.setattr(module, "_forward", lambda *a: calls.append(1) or forward(*a))
    monkeypatch.setenv("MINIVIT_KERNELS", mode)
    x, br, w, b = make_inputs(4, 24, torch.bfloat16, True, seed=5)
    s, y = add_layer_norm(x, br, w, b)
    assert len(calls) == int(kernel_runs)
    if not kernel_runs:
        s_plain = x + br
        assert torch.equal(s, s_plain)
        assert torch.equal(y, torch.nn.functional.layer_norm(s_plain, (24,), w.to(x.dtype), b.to(x.dtype), 1e-6))
        assert torch.equal(layer_norm(x, w, b), layer_norm_reference(x, w, b, 1e-6))


@pytest.mark.parametrize("args, match", [
    ((torch.randn(0, 4), None, torch.ones(4), torch.zeros(4)), "non-empty"),
    ((torch.randn(2, 4), torch.randn(2, 5), torch.ones(4), torch.zeros(4)), "branch shape"),
    ((torch.randn(2, 4), None, torch.ones(5), torch.zeros(4)), "weight and bias must be"),
    ((torch.randn(2, 4, dtype=torch.float64), None, torch.ones(4), torch.zeros(4)), "MINIVIT_KERNELS=reference"),
])
def test_bad_inputs_raise_value_error(args, match):
    with pytest.raises(ValueError, match=match):
        add_layer_norm(*(t.to(DEVICE) if t is not None else None for t in args))


def test_launch_helpers_trace_under_torch_compile():
    """train_dino.py --compile traces the launchers with dynamo: the block choice must trace as one graph."""
    from minivit.kernels import layernorm as module
    traced = torch.compile(lambda M, D: module._block_sizes(M, D), fullgraph=True, backend="eager")
    assert traced(50432, 384) == module._block_sizes(50432, 384)
