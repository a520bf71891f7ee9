"""The fused patch embedding against the float64 reference (conv2d with stride = kernel): tokens and every gradient,
plain and with CLS + pos_embed fused in, on random shapes (1x1 and non-square grids, K = C*p*p and D no multiple of
a block), every dtype, channels-last images. Runs in Triton's interpreter on CPU, compiled on a GPU."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import nan_filled_empty
from minivit.kernels import patch_embed as patch_embed_module
from minivit.kernels import use_triton
from minivit.kernels.patch_embed import (_dw_split, patch_embed, patch_embed_reference, patch_embed_tokens,
                                 patch_embed_tokens_reference)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# max|ours - exact| <= TOL * (|exact| + max|exact|), exact = the reference in float64 on the same rounded inputs.
# The kernels multiply exactly and sum in fp32, then round once to the output dtype, so the error is that rounding:
# fp16: 2^-11 (round to nearest) -> 4x margin. bf16: 2^-8 on a GPU, but the interpreter truncates fp32 -> bf16
# (up to 2^-7) -> 2x margin over that. fp32: fp32 sums of up to K = 3*32*32 = 3072 products, ~sqrt(K) * 2^-24 of
# the largest value, -> 1e-5. An indexing or masking bug gives errors of O(1).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(B, C, p, hp, wp, D, dtype, bias, channels_last, seed, tokens=False):
    """x (B, C, hp*p, wp*p), weight (D, C, p, p), bias, [cls_token, pos_embed], all unit-scale outputs."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)  # noqa: E731
    x = rand(B, C, hp * p, wp * p)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [x, rand(D, C, p, p, scale=(C * p * p) ** -0.5), rand(D) if bias else None]
    if tokens:
        inputs += [rand(1, 1, D), rand(1, 1 + hp * wp, D)]
    return inputs


def check_against_reference(fn, reference, inputs, x_grad, seed):
    """fn(*inputs) and the gradients of all inputs (x only if x_grad) vs reference(*inputs) in float64."""
    x, dtype = inputs[0], inputs[0].dtype
    assert use_triton(x), "these tests prove the Triton kernels: the dispatch must pick them"
    leaves = [t.detach().requires_grad_(t is not x or x_grad) if t is not None else None for t in inputs]
    wanted = [t for t in leaves if t is not None and t.requires_grad]
    with nan_filled_empty():
        out = fn(*leaves)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
        grads = torch.autograd.grad(out, wanted, dout)

    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in leaves]
    out64 = reference(*leaves64)
    grads64 = torch.autograd.grad(out64, [t for t in leaves64 if t is not None and t.requires_grad], dout.double())

    names = ["out"] + [n for n, t in zip(["dx", "dweight", "dbias", "dcls_token", "dpos_embed"], leaves)
                       if t is not None and t.requires_grad]
    for name, ours, exact in zip(names, (out, *grads), (out64, *grads64)):
        assert ours.dtype == dtype and ours.shape == exact.shape, f"{name}: {ours.dtype} {tuple(ours.shape)}"
        assert not ours.isnan().any(), f"{name}: NaN left, an element was never written"
        err = (ours.double() - exact).abs()
        bound = TOL[dtype] * (exact.abs() + exact.abs().max())
        assert (err <= bound).all(), f"{name}: max error {err.max().item():.3g} ({dtype})"


shapes = dict(B=st.integers(1, 2), C=st.sampled_from([1, 3]), p=st.sampled_from([8, 14, 16, 32]),
              hp=st.integers(1, 3), wp=st.integers(1, 3), D=st.sampled_from([16, 24, 40, 100, 136]),
              dtype=st.sampled_from(DTYPES), bias=st.booleans(), channels_last=st.booleans(),
              x_grad=st.booleans(), seed=st.integers(0, 2**16))


@given(**shapes)
@example(B=1, C=3, p=16, hp=1, wp=1, D=24, dtype=torch.bfloat16, bias=True, channels_last=False, x_grad=True,
         seed=0)  # one patch per image
@example(B=2, C=3, p=14, hp=1, wp=3, D=100, dtype=torch.float16, bias=False, channels_last=True, x_grad=True,
         seed=1)  # non-square grid, K = 588 and D = 100 off the blocks, no bias
def test_patch_embed_matches_reference(B, C, p, hp, wp, D, dtype, bias, channels_last, x_grad, seed):
    inputs = make_inputs(B, C, p, hp, wp, D, dtype, bias, channels_last, seed)
    check_against_reference(patch_embed, patch_embed_reference, inputs, x_grad, seed)


@given(**shapes)
@example(B=2, C=3, p=8, hp=1, wp=1, D=16, dtype=torch.float32, bias=True, channels_last=False, x_grad=False,
         seed=2)  # 1 + 1 tokens: the CLS row and the single patch
@example(B=1, C=1, p=32, hp=2, wp=1, D=136, dtype=torch.bfloat16, bias=False, channels_last=False, x_grad=True,
         seed=3)  # D = 136 spans two forward tiles
def test_patch_embed_tokens_matches_reference(B, C, p, hp, wp, D, dtype, bias, channels_last, x_grad, seed):
    inputs = make_inputs(B, C, p, hp, wp, D, dtype, bias, channels_last, seed, tokens=True)
    check_against_reference(patch_embed_tokens, patch_embed_tokens_reference, inputs, x_grad, seed)


@pytest.mark.parametrize("tokens", [False, True])
def test_weight_gradient_split_over_programs(tokens):
    """72 patches: dW's reduction over rows is shared by several programs, then summed."""
    inputs = make_inputs(2, 1, 8, 6, 6, 24, torch.float32, True, False, seed=4, tokens=tokens)
    assert _dw_split(72, 24, 64, inputs[0].device) > 1
    fn, ref = (patch_embed_tokens, patch_embed_tokens_reference) if tokens else (patch_embed, patch_embed_reference)
    check_against_reference(fn, ref, inputs, x_grad=True, seed=4)


def test_autocast_runs_in_its_dtype_and_grads_reach_fp32_weights():
    """Under torch.autocast the op computes in the autocast dtype, as nn.Conv2d does; fp32 weights get fp32 grads."""
    x, w, b = make_inputs(2, 3, 16, 2, 1, 40, torch.float32, True, False, seed=5)
    w.requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = patch_embed(x, w, b)
    assert out.dtype == torch.bfloat16
    exact = patch_embed_reference(*(t.to(torch.bfloat16).double() for t in (x, w, b)))
    assert ((out.double() - exact).abs() <= TOL[torch.bfloat16] * 2 * exact.abs().max()).all()
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and w.grad.isfinite().all()


def _bad(**change):
    """Valid inputs for patch_embed_tokens (8 px patches, 2x2 grid, D = 16) with some replaced."""
    args = dict(x=torch.randn(1, 3, 16, 16), weight=torch.randn(16, 3, 8, 8), bias=torch.randn(16),
                cls_token=torch.randn(1, 1, 16), pos_embed=torch.randn(1, 5, 16))
    args.update(change)
    return args


@pytest.mark.parametrize("args, match, plain_too", [
    (_bad(x=torch.randn(1, 3, 20, 16)), "not a multiple of patch_size", True),
    (_bad(x=torch.randn(1, 3, 16, 12)), "not a multiple of patch_size", True),
    (_bad(x=torch.randn(3, 16, 16)), r"\(B, C, H, W\)", True),
    (_bad(x=torch.randn(0, 3, 16, 16)), "non-empty", True),
    (_bad(x=torch.randn(1, 1, 16, 16)), "C = 1 channels", True),
    (_bad(weight=torch.randn(16, 3, 8, 4)), r"\(D, C, p, p\)", True),
    (_bad(bias=torch.randn(15)), "bias must be", True),
    (_bad(weight=torch.randn(16, 3, 8, 8, dtype=torch.float16)), "one dtype and device", True),
    (_bad(x=torch.randn(1, 3, 16, 16, device="meta")), "one dtype and device", True),
    (_bad(cls_token=torch.randn(1, 16)), "cls_token must be", False),
    (_bad(pos_embed=torch.randn(1, 10, 16)), "interpolate it", False),
    (_bad(pos_embed=torch.randn(1, 5, 16, dtype=torch.float16)), "one dtype and device", False),
    (_bad(cls_token=None), "needs cls_token and pos_embed", False),
])
def test_bad_inputs_raise_value_error(args, match, plain_too):
    with pytest.raises(ValueError, match=match):
        patch_embed_tokens(**args)
    if plain_too:
        with pytest.raises(ValueError, match=match):
            patch_embed(args["x"], args["weight"], args["bias"])


def test_float64_is_refused_by_the_kernels():
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, device=DEVICE)
    w = torch.randn(16, 3, 8, 8, dtype=torch.float64, device=DEVICE)
    assert use_triton(x)
    with pytest.raises(ValueError, match="MINIVIT_KERNELS=reference"):
        patch_embed(x, w, None)


def test_launch_helpers_trace_under_torch_compile():
    """train_dino.py --compile traces the launchers with dynamo: their Python (tile choice, split of dW) must give
    one graph, no break. Triton 3.6 + torch 2.11 broke on indexing a tuple with a bool (BLOCKS[...][True])."""
    for fn, args in [(patch_embed_module._blocks, ("fwd", 50176, 384, 768)),
                     (patch_embed_module._launch_options, (torch.bfloat16, 128 * 128)),
                     (patch_embed_module._dw_split, (50176, 384, 768, torch.device("cpu")))]:
        traced = torch.compile(lambda *a, fn=fn: fn(*a), fullgraph=True, backend="eager")
        assert traced(*args) == fn(*args)
