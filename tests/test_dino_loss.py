"""The fused DINO loss against the float64 reference: the loss and its gradient w.r.t. the student logits, on random
crop counts, batches and K off the blocks (and K = 65536 itself), sharp and flat teachers, every dtype; the gradient's
rows sum to 0 (m_v softmax - w_v, both of mass m_v). Runs in Triton's interpreter on CPU, compiled on a GPU."""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import nan_filled_empty
from minivit.kernels import dino_loss as module
from minivit.kernels import use_triton
from minivit.kernels.dino_loss import dino_loss, dino_loss_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# Bounds against float64 math on the same rounded logits (the kernels compute in fp32 whatever the input dtype).
# fp32 rounds every exponent z = (t - c) / T_t and s / T_s to 2^-24 |z|, so every target and probability carries a
# relative error of ~2^-24 max|z| (max|z| ~ 60 for DINO's cosine logits at T_t = 0.04, ~500 for the logits of size 4
# drawn here; PyTorch's fp32 softmaxes round the same exponents): the bounds are LOSS_RTOL / GRAD_TOL plus
# 4 * 2^-24 max|z|. loss: 1e-5 relative (exp2/log2 approximations, sums of K terms). gradient, per entry:
# |ours - exact| <= tol * (|exact| + size of the two terms it subtracts, see gradient_terms): fp32 2e-5; fp16/bf16
# the gradient is stored in that dtype: 2^-11, 2^-8 (interpreter: truncation, 2^-7), 2x margin.
LOSS_RTOL = 1e-5
GRAD_TOL = {torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}


def make_inputs(ncrops, B, K, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(ncrops * B, K, generator=g)).to(DEVICE, dtype)
    teacher = (scale * torch.randn(2 * B, K, generator=g)).to(DEVICE, dtype)
    center = (0.5 * scale * torch.randn(1, K, generator=g)).to(DEVICE)  # the fp32 buffer of DINOLoss
    return student, teacher, center


def gradient_terms(student, teacher, center, ncrops, student_temp, teacher_temp):
    """(m_v p_v + w_v) / (T_s B P) per entry in float64: the size of the two terms each gradient entry subtracts."""
    n, K = student.shape
    B = n // ncrops
    p = torch.softmax(student.detach().double() / student_temp, -1).view(ncrops, B, K)
    q0, q1 = torch.softmax((teacher.double() - center.double()) / teacher_temp, -1).chunk(2)
    w = torch.stack([q1, q0] + [q0 + q1] * (ncrops - 2))  # the targets each student view meets
    mass = torch.tensor([1.0, 1.0] + [2.0] * (ncrops - 2), dtype=torch.float64).view(-1, 1, 1)
    return ((mass * p + w) / (student_temp * B * (2 * ncrops - 2))).view(n, K)


@given(ncrops=st.integers(2, 5), B=st.integers(1, 3),
       K=st.one_of(st.sampled_from([1, 2, 1023, 1025, 16385]), st.integers(1, 3000)),
       teacher_temp=st.sampled_from([0.04, 0.07]), scale=st.sampled_from([0.3, 1.0, 4.0]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
@example(ncrops=4, B=2, K=65536, teacher_temp=0.04, scale=1.0, dtype=torch.float32, seed=0)  # the paper's K
@example(ncrops=2, B=1, K=1, teacher_temp=0.04, scale=1.0, dtype=torch.float32, seed=1)  # one prototype: loss 0
def test_matches_float64_reference(ncrops, B, K, teacher_temp, scale, dtype, seed):
    student, teacher, center = make_inputs(ncrops, B, K, scale, dtype, seed)
    assert use_triton(student), "these tests prove the Triton kernels: the dispatch must pick them"
    s = student.detach().requires_grad_()
    with nan_filled_empty():
        loss = dino_loss(s, teacher, center, ncrops, 0.1, teacher_temp)
        (grad,) = torch.autograd.grad(loss, s)
    s64 = student.detach().double().requires_grad_()
    loss64 = dino_loss_reference(s64, teacher.double(), center.double(), ncrops, 0.1, teacher_temp)
    (grad64,) = torch.autograd.grad(loss64, s64)

    max_z = ((teacher.double() - center).abs().max() / teacher_temp + student.double().abs().max() / 0.1).item()
    exponent = 4 * 2 ** -24 * max_z  # relative error of every q and p from rounding their exponents to fp32
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.item() - loss64.item()) <= (LOSS_RTOL + exponent) * max(abs(loss64.item()), 1.0), \
        (loss.item(), loss64.item())
    assert grad.dtype == dtype and grad.shape == grad64.shape and not grad.isnan().any()
    # each entry is the difference of two terms, (m_v p_v - w_v) / (T_s B P), each computed to fp32's relative
    # accuracy: the error is relative to the terms, which a sharp teacher and student make cancel
    err = (grad.double() - grad64).abs()
    # fp16 stores |g| < 6e-5 coarsely; fp32's exp2 underflows through denormals (~1e-40) where float64 has 1e-90
    subnormal = 2 * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps + 1e-30
    terms = gradient_terms(s64, teacher, center, ncrops, 0.1, teacher_temp)
    bound = GRAD_TOL[dtype] * grad64.abs() + (GRAD_TOL[dtype] + exponent) * terms + subnormal
    assert (err <= bound).all(), f"grad: max error {err.max().item():.3g} ({dtype})"
    # each student row's gradient sums to 0; its scale is that of one entry, 1 / (T_s B P)
    row_sums = grad.double().sum(-1).abs().max().item()
    assert row_sums <= 1e-4 * K ** 0.5 / (0.1 * B * (2 * ncrops - 2)) + GRAD_TOL[dtype] * grad64.abs().sum(-1).max()


def test_upstream_gradient_scales_and_centre_is_copied():
    """A loss multiplied by 3 gets 3x the gradient (the upstream gradient is read on the device); moving the centre
    in place after the forward (as DINOLoss.update_center does) changes nothing in the backward."""
    student, teacher, center = make_inputs(3, 2, 500, 1.0, torch.float32, seed=2)
    s = student.detach().requires_grad_()
    loss = dino_loss(s, teacher, center, 3, 0.1, 0.04)
    center.add_(5.0)
    (3 * loss).backward()
    s64 = student.detach().double().requires_grad_()
    (3 * dino_loss_reference(s64, teacher.double(), (center - 5.0).double(), 3, 0.1, 0.04)).backward()
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=2e-5 * s64.grad.abs().max().item())


@pytest.mark.parametrize("mode, kernel_runs", [("reference", False), ("auto", True)])
def test_dispatch(monkeypatch, mode, kernel_runs):
    calls = []
    row_lse = module._row_lse
    monkeypatch.setattr(module, "_row_lse", lambda *a: calls.append(1) or row_lse(*a))
    monkeypatch.setenv("MINIVIT_KERNELS", mode)
    student, teacher, center = make_inputs(3, 2, 64, 1.0, torch.float32, seed=3)
    loss = dino_loss(student, teacher, center, 3, 0.1, 0.04)
    assert len(calls) == 2 * int(kernel_runs)
    if not kernel_runs:
        assert torch.equal(loss, dino_loss_reference(student, teacher, center, 3, 0.1, 0.04))


@pytest.mark.parametrize("shapes, match", [
    (((6, 8), (4, 8), (1, 8)), "expected student"),  # 6 rows are not 4 crops of B
    (((8, 8), (2, 8), (1, 8)), "expected student"),  # the teacher must have 2B rows
    (((8, 8), (4, 8), (1, 7)), "expected student"),  # centre of another K
])
def test_bad_shapes_raise_value_error(shapes, match):
    s, t, c = (torch.randn(*shape, device=DEVICE) for shape in shapes)
    with pytest.raises(ValueError, match=match):
        dino_loss(s, t, c, 4, 0.1, 0.04)
