"""The DINO loss over K = 65536 prototypes without (ncrops * B, K) temporaries: two streaming passes and a gradient.

The math (Caron et al. 2021, eq. 1-3, Algorithm 1). Teacher logits t (2B, K) of the 2 global views, student logits
s (ncrops * B, K) crop-major, centre c (1, K), temperatures T_t (0.04-0.07) and T_s (0.1):

    q_i = softmax((t_i - c) / T_t)      i = 0, 1: the teacher's targets for view i of each image
    log p_v = log_softmax(s_v / T_s) = s_v / T_s - lse_v,   v = 0 .. ncrops - 1
    L = 1 / (B P) sum_b sum_{i, v != i} -q_i . log p_v,     P = 2 ncrops - 2 pairs

Per student row the pairs collapse to one weighted target: w_v = q_1 (v = 0), q_0 (v = 1), q_0 + q_1 (v >= 2), with
mass m_v = sum_k w_v = 1, 1, 2. So the row's loss is  m_v lse_v - w_v . s_v / T_s  and its gradient is

    dL / ds_v = (m_v softmax(s_v / T_s) - w_v) / (T_s B P)

The kernels: `_row_lse_kernel` streams each teacher row (centred) and each student row once for its log-sum-exp
(online max and sum, as FlashAttention's softmax, in base 2: exp2 is one instruction); `_dino_ce_kernel` streams
them again, one program per (image, slice of K) for all ncrops views of that image, so the two teacher rows are read
once for the ncrops student rows, recomputing q_0, q_1 and p_v from the saved log-sum-exps; it writes either the loss
partial sums (forward) or the gradient (backward). Nothing (B, K) or larger is kept but the inputs themselves; the
centre is copied (K floats), since DINOLoss moves it in place before the backward.

Precision: fp32 throughout (the logits of DINOHead are fp32); the targets equal the float64 softmax to ~1e-6
relative (tests/test_dino_loss.py), the error of rounding (t - c) / T_t to fp32.

Memory traffic, ViT-S DINO at B = 128, 10 crops, K = 65536, fp32: |s| = 335 MB, |t| = 67 MB.
  - PyTorch (DINOLoss before this kernel, eager): softmax of the centred teacher writes 2 temporaries and q (3 x 67
    read/written twice), log_softmax writes s / T_s and log p (2 x 335 x 2), the weighted sums read q and log p and
    write products: ~3.4 GB forward + backward (bench/NOTES.md section 2), and it keeps log p (335 MB) and q (67 MB)
    for the backward;
  - fused: forward reads s and t twice (2 x 402 MB), backward reads them once more and writes ds (335 MB): 1.5 GB,
    and keeps 4 bytes per row. At ~3.5 TB/s: ~0.97 ms -> ~0.43 ms per step, and ~0.4 GB less memory at the peak.
"""
import math

import torch
import torch.nn.functional as F

from minivit.kernels import interpreter_on, num_sms, tl, triton, use_triton

LOG2E = 1.4426950408889634  # exp(x) == exp2(x * LOG2E)
_LN2 = tl.constexpr(math.log(2.0))  # ln(2): base-2 log-sum-exps back to natural log
_NEG = tl.constexpr(-1.0e30)  # "minus infinity" that stays finite: exp2(_NEG - _NEG) must not be NaN


@triton.jit
def _row_lse_kernel(
    X,  # (R, K) logits, contiguous, any float dtype
    CENTER,  # (K,) fp32 centre subtracted from every row; not read unless HAS_CENTER
    LSE,  # (R,) fp32 out: log2 sum_k exp2(z_k), z = (x - c) * scale (base 2)
    K,  # prototypes
    scale,  # log2(e) / temperature
    HAS_CENTER: tl.constexpr,  # teacher rows: True
    BLOCK_K: tl.constexpr,  # columns per loop step
):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.cast(scale, tl.float32)  # torch.compile passes Python floats as fp64
    cols = tl.arange(0, BLOCK_K)
    m = tl.full([BLOCK_K], _NEG, tl.float32)  # per-lane running max: no serial reduction inside the loop
    acc = tl.zeros([BLOCK_K], tl.float32)  # per-lane running sum of exp2(z - m)
    for k0 in range(0, K, BLOCK_K):
        mask = k0 + cols < K
        z = tl.load(X + row * K + k0 + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_CENTER:
            z -= tl.load(CENTER + k0 + cols, mask=mask, other=0.0)
        z = tl.where(mask, z * scale, _NEG)
        m_new = tl.maximum(m, z)
        acc = acc * tl.exp2(m - m_new) + tl.where(mask, tl.exp2(z - m_new), 0.0)
        m = m_new
    m_row = tl.max(m, 0)
    tl.store(LSE + row, m_row + tl.log2(tl.sum(acc * tl.exp2(m - m_row), 0)))


@triton.jit
def _dino_ce_kernel(
    S,  # (ncrops * B, K) student logits, crop-major, contiguous
    T,  # (2B, K) teacher logits of the 2 global views, contiguous
    CENTER,  # (K,) fp32 centre
    LSE_S, LSE_T,  # (ncrops * B,), (2B,) fp32: base-2 log-sum-exps from _row_lse_kernel
    LOSS,  # (B, splits) fp32 out: sum over this program's columns and views of w . (lse - s / T_s); forward only
    DS,  # (ncrops * B, K) out: dL/ds in the student's dtype; backward only
    GRAD_OUT,  # () the loss's upstream gradient; read in the backward only (a tensor: no host sync)
    B, K, NCROPS,  # images, prototypes, crops (2 global + locals)
    cols_per_split,  # a multiple of BLOCK_K: program (b, j) handles columns [j * cols_per_split, + cols_per_split)
    s_scale, t_scale,  # log2(e) / T_s, log2(e) / T_t
    grad_scale,  # 1 / (T_s B P)
    WRITE_GRAD: tl.constexpr,  # False: forward (loss), True: backward (gradient)
    BLOCK_K: tl.constexpr,  # columns per loop step
):
    b, split = tl.program_id(0).to(tl.int64), tl.program_id(1)
    s_scale, t_scale = tl.cast(s_scale, tl.float32), tl.cast(t_scale, tl.float32)
    grad_scale = tl.cast(grad_scale, tl.float32)
    cols = tl.arange(0, BLOCK_K)
    lse_t0, lse_t1 = tl.load(LSE_T + b), tl.load(LSE_T + B + b)
    if WRITE_GRAD:
        grad_scale = grad_scale * tl.load(GRAD_OUT).to(tl.float32)
    loss = tl.zeros([BLOCK_K], tl.float32)
    start = split * cols_per_split
    for k0 in range(start, start + cols_per_split, BLOCK_K):
        offs = k0 + cols
        mask = offs < K
        c = tl.load(CENTER + offs, mask=mask, other=0.0)
        t0 = tl.load(T + b * K + offs, mask=mask, other=0.0).to(tl.float32)
        t1 = tl.load(T + (B + b) * K + offs, mask=mask, other=0.0).to(tl.float32)
        q0 = tl.where(mask, tl.exp2((t0 - c) * t_scale - lse_t0), 0.0)  # the targets, recomputed
        q1 = tl.where(mask, tl.exp2((t1 - c) * t_scale - lse_t1), 0.0)
        for v in range(0, NCROPS):
            row = v * B + b
            w = tl.where(v == 0, q1, tl.where(v == 1, q0, q0 + q1))  # the teacher views this student view meets
            s = tl.load(S + row * K + offs, mask=mask, other=0.0).to(tl.float32)
            lse_s = tl.load(LSE_S + row)
            if WRITE_GRAD:
                mass = tl.where(v < 2, 1.0, 2.0)
                p = tl.exp2(s * s_scale - lse_s)
                tl.store(DS + row * K + offs, ((mass * p - w) * grad_scale).to(DS.dtype.element_ty), mask=mask)
            else:
                loss += w * (lse_s - s * s_scale) * _LN2  # -w . log p, in natural log
    if not WRITE_GRAD:
        tl.store(LOSS + b * tl.num_programs(1) + split, tl.sum(loss, 0))


# Tuning constants. BLOCK_K: 1024 fp32 columns per step on a GPU (4 warps, 8 values per thread and tensor; the
# cross-entropy kernel holds q0, q1, the centre and one student row), 16384 in the interpreter (fewer Python steps).
# The cross-entropy grid: B images x enough slices of K for ~4 programs per SM (B = 128 on 132 SMs: 4 slices).
BLOCK_K = (1024, 16384)  # (GPU, interpreter)
PROGRAMS_PER_SM = 4


def _block_k(K):
    return min(BLOCK_K[int(interpreter_on())], triton.next_power_of_2(K))


def _row_lse(x, center, temperature):
    """Base-2 log-sum-exp of each row of (x - center) / temperature: (R,) fp32."""
    R, K = x.shape
    lse = torch.empty(R, device=x.device, dtype=torch.float32)
    _row_lse_kernel[(R,)](x, center if center is not None else x, lse, K, LOG2E / temperature,
                          HAS_CENTER=center is not None, BLOCK_K=_block_k(K), num_warps=4)
    return lse


def _cross_entropy(student, teacher, center, lse_s, lse_t, ncrops, student_temp, teacher_temp, grad_out=None):
    """Forward (grad_out None): the loss, a 0-d fp32 tensor. Backward: dL/dstudent times grad_out."""
    n, K = student.shape
    B = n // ncrops
    pairs = 2 * ncrops - 2
    BK = _block_k(K)
    splits = max(1, min(triton.cdiv(K, BK), triton.cdiv(PROGRAMS_PER_SM * num_sms(student), B)))
    cols_per_split = triton.cdiv(triton.cdiv(K, BK), splits) * BK
    splits = triton.cdiv(K, cols_per_split)
    write_grad = grad_out is not None
    loss = torch.empty(B, splits, device=student.device, dtype=torch.float32)
    ds = torch.empty_like(student) if write_grad else loss
    _dino_ce_kernel[(B, splits)](
        student, teacher, center, lse_s, lse_t, loss, ds, grad_out if write_grad else loss,
        B, K, ncrops, cols_per_split, LOG2E / student_temp, LOG2E / teacher_temp,
        1.0 / (student_temp * B * pairs), WRITE_GRAD=write_grad, BLOCK_K=BK, num_warps=4)
    return ds if write_grad else loss.sum() / (B * pairs)


class _DINOLoss(torch.autograd.Function):
    """Keeps the logits (which exist anyway), a copy of the centre (K floats) and two log-sum-exps per row."""

    @staticmethod
    def forward(ctx, student, teacher, center, ncrops, student_temp, teacher_temp):
        center = center.reshape(-1).float().clone()  # DINOLoss.update_center moves the buffer before the backward
        lse_t = _row_lse(teacher, center, teacher_temp)
        lse_s = _row_lse(student, None, student_temp)
        ctx.save_for_backward(student, teacher, center, lse_s, lse_t)
        ctx.args = ncrops, student_temp, teacher_temp
        return _cross_entropy(student, teacher, center, lse_s, lse_t, *ctx.args)

    @staticmethod
    def backward(ctx, grad_out):
        student, teacher, center, lse_s, lse_t = ctx.saved_tensors
        ds = _cross_entropy(student, teacher, center, lse_s, lse_t, *ctx.args, grad_out=grad_out.contiguous())
        return ds, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------------------
# The plain PyTorch version: DINOLoss's computation before this kernel, the ground truth of the tests.

def dino_loss_reference(student, teacher, center, ncrops, student_temp, teacher_temp):
    """The mean over images and the 2 * ncrops - 2 pairs of different views of -q_i . log p_v, in fp32 (float64 for
    float64 inputs). Summing q0 + q1 for the local views keeps one (B, K) temporary, not one per pair."""
    n, K = student.shape
    B = n // ncrops
    compute = torch.promote_types(student.dtype, torch.float32)
    log_p_s = F.log_softmax(student.to(compute) / student_temp, dim=-1).view(ncrops, B, K)
    t = teacher.detach().to(torch.promote_types(teacher.dtype, torch.float32))
    q0, q1 = F.softmax((t - center) / teacher_temp, dim=-1).chunk(2)  # the teacher sees the 2 global views only
    total = -(q1 * log_p_s[0]).sum() - (q0 * log_p_s[1]).sum()
    if ncrops > 2:
        total = total - ((q0 + q1) * log_p_s[2:]).sum()
    return total / (B * (2 * ncrops - 2))


def dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """DINO's cross-entropy, averaged over images and pairs of different views: student (ncrops * B, K) crop-major,
    teacher (2B, K) of the 2 global views (no gradient), center (1, K) -> 0-d fp32 loss; gradient to the student."""
    n, K = student.shape if student.dim() == 2 else (0, 0)
    if n == 0 or K == 0 or n % ncrops or teacher.shape != (2 * (n // ncrops), K) or center.numel() != K:
        raise ValueError(f"dino_loss: expected student (ncrops*B, K) with ncrops={ncrops}, teacher (2*B, K) and "
                         f"center (1, K); got {tuple(student.shape)}, {tuple(teacher.shape)}, {tuple(center.shape)}")
    if not use_triton(student):
        return dino_loss_reference(student, teacher, center, ncrops, student_temp, teacher_temp)
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dino_loss: the Triton kernels take float32/float16/bfloat16 {name} logits, got "
                             f"{x.dtype}: cast, or set MINIVIT_KERNELS=reference")
    return _DINOLoss.apply(student.contiguous(), teacher.detach().contiguous(), center, ncrops,
                           float(student_temp), float(teacher_temp))
