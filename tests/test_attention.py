"""The fused attention against the float64 reference: output, log-sum-exp and all three gradients, on random shapes
(N of 1, primes, ViT token counts, either side of the 32/64/128 blocks; D = 80 padded to 128), every dtype, and
the strided q, k, v views of one qkv projection; both backward paths (one tile per head, and blocks) on the same
short sequences, either side of the switch between them. Runs in Triton's interpreter on CPU, compiled on a GPU."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

from minivit.kernels import attention as attention_module
from minivit.kernels.attention import _attn_backward, _attn_forward, _backward_path, attention, attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Error bound per dtype:  max|ours - exact| <= factor * max|plain - exact| + floor * max(max|exact|, 1)
# exact: attention_reference in float64 on the same (rounded) inputs; plain: the textbook math run in the input
# dtype, i.e. what that dtype costs anyway. The kernels accumulate in fp32 but, like every FlashAttention, round P
# and dS to the input dtype before their GEMMs, so on some element they may be a few times worse than plain.
# The floor is in units of the largest exact value (inputs are unit normals, so values are O(1); max(., 1) covers
# N = 1, where the softmax is constant and the exact dQ, dK are 0 while ours are rounding noise):
# - fp32: 1e-5 (~100 ulp) for everything: room for exp2/log2 approximations and sums over 200 terms, far below
#   what an indexing or masking bug costs (errors of O(1));
# - fp16/bf16 output: 1 unit in the last place (2^-10, 2^-7);
# - fp16/bf16 gradients: 3 and 5 ulp, for the one error FlashAttention has and the plain math has not: delta =
#   rowsum(dO * O) reads O after its rounding, which moves every dS_ij of row i by P_ij * u * |dO_i . O_i|. Where
#   few tokens make the plain error small, it dominates (measured at N = 2..17, all D, sharpness 0.5..2, 5 seeds:
#   up to 1.7 ulp in fp16 and 3.8 ulp in bf16 beyond 3x the plain error).
TOLERANCE = {  # dtype: (factor, floor for the output, floor for the gradients)
    torch.float32: (3, 1e-5, 1e-5),
    torch.float16: (3, 1e-3, 3e-3),
    torch.bfloat16: (3, 8e-3, 4e-2),
}

# N: the edge cases (1 token, primes, ViT's 37, 145 and 197, either side of the 16..128 blocks), then anything
seq_lens = st.one_of(st.sampled_from([1, 2, 17, 31, 33, 37, 63, 64, 65, 127, 128, 129, 145, 197]),
                     st.integers(1, 200))
head_dims = st.sampled_from([16, 32, 64, 80, 128])
# scale: the default D ** -0.5 (None) or up to 2x either way of it: softmax logits of std 0.5 to 2 for unit-normal
# q, k. Much sharper softmaxes make the bf16 dQ, dK of any FlashAttention noisier (see the kernel docstring).
sharpness = st.one_of(st.none(), st.floats(0.5, 2.0))


def make_qkv(B, H, N, D, dtype, strided, seed):
    """q, k, v (B, H, N, D) and an upstream gradient dO. strided: views of one (B, N, 3 * H * D) tensor, as the
    ViT's qkv projection gives them, and dO in the (B, N, H, D) layout the head concatenation sends back."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    if strided:
        qkv = torch.randn(B, N, 3 * H * D, generator=g, device=DEVICE).to(dtype)
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, N, D), not contiguous
        do = torch.randn(B, N, H, D, generator=g, device=DEVICE).to(dtype).transpose(1, 2)
    else:
        q, k, v, do = (torch.randn(B, H, N, D, generator=g, device=DEVICE).to(dtype) for _ in range(4))
    return q, k, v, do


def forward_backward(fn, q, k, v, do, scale, dtype):
    """o and (dq, dk, dv) of fn(q, k, v, scale) computed in `dtype` by autograd."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, scale)
    o.backward(do.to(dtype))
    return o.detach(), (q.grad, k.grad, v.grad)


def torch_math(q, k, v, scale):
    """The textbook attention in the input dtype (scores, softmax and product all rounded to it)."""
    return ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1) @ v


def assert_close(name, ours, exact, plain, factor, floor):
    """max|ours - exact| <= factor * max|plain - exact| + floor * max(max|exact|, 1), and no NaN left."""
    assert not ours.isnan().any(), f"{name}: NaN left, an element was never written"
    err = (ours.double() - exact).abs().max().item()
    bound = factor * (plain.double() - exact).abs().max().item() + floor * max(exact.abs().max().item(), 1.0)
    assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g} ({ours.dtype})"


@pytest.mark.parametrize("dtype", DTYPES)
@given(B=st.integers(1, 2), H=st.integers(1, 2), N=seq_lens, D=head_dims, sharp=sharpness, strided=st.booleans(),
       seed=st.integers(0, 2**16))
@example(B=1, H=1, N=1, D=16, sharp=None, strided=False, seed=0)  # one token: P = 1, O = v, dQ = dK = 0
@example(B=1, H=2, N=197, D=80, sharp=None, strided=True, seed=1)  # ViT-H's head dim at ViT-*/16's 197 tokens
def test_matches_float64_reference(dtype, B, H, N, D, sharp, strided, seed):
    q, k, v, do = make_qkv(B, H, N, D, dtype, strided, seed)
    scale = D ** -0.5 * (1.0 if sharp is None else sharp)
    nan = lambda *shape, dtype=dtype: torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)  # noqa: E731

    # the kernels, writing into NaN-filled buffers: any element they skip stays NaN; O contiguous, or in the token
    # layout (B, N, H, D) that the ViT reads, as attention() allocates it; the backward path _backward_path picks
    o = nan(B, N, H, D).transpose(1, 2) if strided else nan(B, H, N, D)
    o, lse = _attn_forward(q, k, v, scale, o=o, lse=nan(B, H, N, dtype=torch.float32))
    dq, dk, dv = _attn_backward(q, k, v, o, lse, do, scale, dq=nan(B, H, N, D), dk=nan(B, H, N, D),
                                dv=nan(B, H, N, D), delta=nan(B, H, N, dtype=torch.float32))

    o_exact, grads_exact = forward_backward(attention_reference, q, k, v, do, scale, torch.float64)
    o_plain, grads_plain = forward_backward(torch_math, q, k, v, do, scale, dtype)
    assert o.dtype == dq.dtype == dk.dtype == dv.dtype == dtype and lse.dtype == torch.float32
    factor, floor_o, floor_grad = TOLERANCE[dtype]
    assert_close("O", o, o_exact, o_plain, factor, floor_o)
    for name, ours, exact, plain in zip(("dQ", "dK", "dV"), (dq, dk, dv), grads_exact, grads_plain):
        assert_close(name, ours, exact, plain, factor, floor_grad)
    # the log-sum-exp sees only fp32 sums of exact products, whatever the input dtype
    lse_exact = torch.logsumexp(scale * q.double() @ k.double().transpose(-2, -1), dim=-1)
    assert_close("LSE", lse, lse_exact, lse_exact, 0, TOLERANCE[torch.float32][1])
    # and the reference itself agrees with PyTorch's own attention
    sdpa = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale)
    assert torch.allclose(o_exact, sdpa, rtol=1e-10, atol=1e-12)


# the backward's switch: one tile per (batch, head) up to 64 padded tokens (fp32: 32, or 16 at D = 80..128), and the
# one-tile kernel accepts up to 128 when forced; these lengths sit either side of each, and of the 16/32 tiles
short_seq_lens = st.one_of(st.sampled_from([1, 2, 16, 17, 32, 33, 37, 64, 65, 100, 128, 129]), st.integers(1, 140))


@pytest.mark.parametrize("dtype", DTYPES)
@given(H=st.integers(1, 2), N=short_seq_lens, D=st.sampled_from([16, 32, 64, 80]), sharp=sharpness,
       strided=st.booleans(), seed=st.integers(0, 2**16))
@example(H=2, N=37, D=64, sharp=None, strided=True, seed=2)  # DINO's 96 px crops at /16, ViT-S heads
def test_backward_paths_match_float64_reference(dtype, H, N, D, sharp, strided, seed):
    """Both backward paths match float64 with the bound above wherever each runs: the blocked one at every N, the
    one-tile one up to the 128 tokens it accepts when forced in 16 bits (past the switch, so that moving it is
    safe), in fp32 where the rule sends it (forced further it spills kilobytes, and ptxas takes minutes)."""
    q, k, v, do = make_qkv(1, H, N, D, dtype, strided, seed)
    scale = D ** -0.5 * (1.0 if sharp is None else sharp)
    o, lse = _attn_forward(q, k, v, scale)
    _, grads_exact = forward_backward(attention_reference, q, k, v, do, scale, torch.float64)
    _, grads_plain = forward_backward(torch_math, q, k, v, do, scale, dtype)
    factor, _, floor_grad = TOLERANCE[dtype]
    tile = _backward_path(N, D, dtype) == "tile" or (dtype != torch.float32 and N <= attention_module.TILE_LIMIT)
    paths = ["tile", "blocks"] if tile else ["blocks"]
    for path in paths:
        nan = lambda: torch.full((1, H, N, D), float("nan"), dtype=dtype, device=DEVICE)  # noqa: E731
        grads = _attn_backward(q, k, v, o, lse, do, scale, dq=nan(), dk=nan(), dv=nan(), path=path)
        for name, ours, exact, plain in zip(("dQ", "dK", "dV"), grads, grads_exact, grads_plain):
            assert_close(f"{path} {name}", ours, exact, plain, factor, floor_grad)


def test_backward_path_rule():
    """The switch sits where minivit/kernels/attention.py says: the padded N times the padded D within one tile."""
    bf16, fp32 = torch.bfloat16, torch.float32
    assert [_backward_path(N, 64, bf16) for N in (1, 37, 64, 65, 145, 197)] == ["tile"] * 3 + ["blocks"] * 3
    assert [_backward_path(N, 80, bf16) for N in (64, 65)] == ["tile", "blocks"]  # D = 80 runs as 128
    assert [_backward_path(N, 64, fp32) for N in (32, 33)] == ["tile", "blocks"]
    assert [_backward_path(N, 128, fp32) for N in (16, 17)] == ["tile", "blocks"]
    q = torch.zeros(1, 1, 129, 64, device=DEVICE)
    with pytest.raises(ValueError, match="too large for the one-tile backward"):
        _attn_backward(q, q, q, q, q[..., 0], q, 0.125, path="tile")


def test_autograd_path():
    """attention() runs the kernels with the default scale D ** -0.5, its gradients reach the qkv tensor the strided
    views came from, and they are bit for bit what the launchers give (deterministic kernels: no atomics). The
    upstream gradient of a .sum() is an expanded tensor with all strides 0: the kernels must read it as it is."""
    B, H, N, D = 1, 2, 65, 80
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE).to(torch.bfloat16).requires_grad_()
    q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, N, D), strided
    o = attention(q, k, v)
    o.sum().backward()

    q, k, v = q.detach(), k.detach(), v.detach()
    o_ref, lse = _attn_forward(q, k, v, D ** -0.5)
    ones = torch.ones((), device=DEVICE, dtype=o.dtype).expand_as(o)  # what .sum() sends back, strides 0
    grads = _attn_backward(q, k, v, o_ref, lse, ones, D ** -0.5)
    expected = torch.stack(grads).permute(1, 3, 0, 2, 4).reshape(B, N, 3 * H * D)  # (3, B, H, N, D) -> qkv layout
    assert torch.equal(o, o_ref)
    assert torch.equal(qkv.grad, expected)
    assert o.transpose(1, 2).is_contiguous()  # token layout: the ViT's head concatenation is a view


@pytest.mark.parametrize("mode, kernel_runs", [("reference", False), ("auto", True)])
def test_dispatch(monkeypatch, mode, kernel_runs):
    """MINIVIT_KERNELS=reference runs the plain PyTorch path; by default (CUDA, or the interpreter on CPU, as in
    these tests) the Triton launcher runs."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return _attn_forward(*args, **kwargs)

    monkeypatch.setenv("MINIVIT_KERNELS", mode)
    monkeypatch.setattr(attention_module, "_attn_forward", spy)
    q, k, v, _ = make_qkv(1, 2, 37, 32, torch.float32, strided=True, seed=0)
    o = attention(q, k, v, 0.2)
    assert len(calls) == int(kernel_runs)
    if not kernel_runs:
        assert torch.equal(o, attention_reference(q, k, v, 0.2))


def _inputs(shape=(1, 2, 5, 16), dtype=torch.float32):
    return [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("make, message", [
    (lambda: [t[0] for t in _inputs()], "4-d tensor"),
    (lambda: _inputs()[:2] + _inputs((1, 2, 6, 16))[2:], "shapes .* differ"),
    (lambda: _inputs()[:2] + [_inputs(dtype=torch.float16)[2]], "dtypes .* differ"),
    (lambda: [t.to(torch.int32) for t in _inputs()], "dtype torch.int32 is not supported"),
    (lambda: _inputs(dtype=torch.float64), "dtype torch.float64 is not supported"),
    (lambda: _inputs()[:2] + [torch.randn(1, 2, 5, 16, device="meta")], "move them to one device"),
    (lambda: _inputs((1, 2, 0, 16)), "must all be >= 1"),
    (lambda: _inputs((1, 1, 5, 256)), "head dim D=256 > 128"),
])
def test_bad_input(make, message):
    with pytest.raises(ValueError, match=message):
        attention(*make())


def test_tile_choice_traces_under_torch_compile():
    """train_dino.py --compile traces the launcher with dynamo: the tile choice must trace as one graph."""
    traced = torch.compile(lambda *a: attention_module._tiles(*a), fullgraph=True, backend="eager")
    path = torch.compile(lambda *a: attention_module._backward_path(*a), fullgraph=True, backend="eager")
    for N in (37, 197):
        assert traced(64, torch.bfloat16, N) == attention_module._tiles(64, torch.bfloat16, N)
        assert path(N, 64, torch.bfloat16) == _backward_path(N, 64, torch.bfloat16)
