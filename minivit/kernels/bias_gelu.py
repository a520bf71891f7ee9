"""Bias + exact GELU of the MLP's first layer in one pass, forward and backward, recomputing GELU instead of keeping it.

The math (Hendrycks & Gimpel 2016; the erf form of the ViT and DINO code), with h = x W1^T the fc1 GEMM without its
bias, z = h + b1 and Phi, phi the standard normal CDF and density:

    a = GELU(z) = z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2))           (M, F), F = 4 D hidden units
    GELU'(z) = Phi(z) + z * phi(z),   phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
    dz = da * GELU'(z),   db1 = column sums of dz,   dh = dz

What is kept. Unfused, autograd keeps fc1's output z (GELU's backward reads it) and GELU's output a (fc2 keeps
it for its weight gradient dW2 = dout^T a): 2 x 8 D bytes per token in bf16. `bias_gelu_linear` runs bias + GELU
+ fc2 as one autograd node that keeps only h (8 D) and recomputes a in the backward, in the same kernel pass that
writes dz: -8 D of activations per token per block (ViT-S/16 DINO at batch 128: ~2.3 GiB of ~14.6).

Memory traffic per token, bf16, units of D bytes (F = 4D, 2 bytes a value):
  - unfused: fc1's GEMM epilogue adds the bias (free), GELU reads z 8 writes a 8; backward: GELU reads z 8 and
    da 8, writes dz 8: 40 D;
  - fused: the GEMM writes h 8, the kernel reads h 8 writes a 8 (the bias add moved here from the GEMM epilogue:
    +0); backward reads h 8, da 8, writes dz 8 and the recomputed a 8: 40 D as well.
So the fusion moves the same bytes (recomputing a costs the 8 D that storing it would) and saves the 8 D of memory
per token that let a batch grow; its speed gain is one launch fewer per direction and the bytes a caching
allocator does not churn. The bias add in the GEMM's epilogue and GELU in a Triton GEMM epilogue would save 16 D
more (no h round trip): the issue's "Triton GEMM with a fused epilogue", not done here.
"""
import math

import torch
import torch.nn.functional as F

from minivit.kernels import autocast_inputs, interpreter_on, split_rows, tl, triton, use_triton

_INV_SQRT2 = tl.constexpr(1 / math.sqrt(2))
_INV_SQRT2PI = tl.constexpr(1 / math.sqrt(2 * math.pi))


@triton.jit
def _bias_gelu_fwd_kernel(
    H,  # (M, F) fc1 output without its bias, contiguous
    BIAS,  # (F,) fc1 bias
    A,  # (M, F) out: GELU(h + bias), dtype of H
    M, F,  # rows (tokens), hidden units
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,  # tile of rows x hidden units per program
):
    pid_m, pid_f = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows[:, None] < M) & (cols[None, :] < F)
    offs = rows.to(tl.int64)[:, None] * F + cols[None, :]  # int64: M * F passes 2^31 at ViT-S/8 batch sizes
    z = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(BIAS + cols, mask=cols < F, other=0.0).to(tl.float32)[None, :]
    a = 0.5 * z * (1.0 + tl.math.erf(z * _INV_SQRT2))
    tl.store(A + offs, a.to(A.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    H,  # (M, F) fc1 output without its bias, contiguous
    BIAS,  # (F,) fc1 bias
    DA,  # (M, F) gradient of a, contiguous
    DZ,  # (M, F) out: gradient of h (= of z); may be DA itself (each element is read before it is written)
    A,  # (M, F) out: GELU(h + bias) recomputed for fc2's weight gradient; not written unless WRITE_A
    DB,  # (programs along M, F) fp32 out: this program's column sums of dz (torch adds the rows)
    M, F,  # rows, hidden units
    rows_per_program,  # a multiple of BLOCK_M
    WRITE_A: tl.constexpr,  # recompute a (bias_gelu_linear) or not (bias_gelu alone)
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,  # tile per loop step
):
    pid_m, pid_f = tl.program_id(0), tl.program_id(1)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    bias = tl.load(BIAS + cols, mask=cols < F, other=0.0).to(tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_F], tl.float32)
    for m0 in range(0, rows_per_program, BLOCK_M):
        rows = pid_m * rows_per_program + m0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & (cols[None, :] < F)
        offs = rows.to(tl.int64)[:, None] * F + cols[None, :]
        z = tl.load(H + offs, mask=mask, other=0.0).to(tl.float32) + bias[None, :]
        da = tl.load(DA + offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2))
        pdf = tl.exp(-0.5 * z * z) * _INV_SQRT2PI
        dz = da * (cdf + z * pdf)
        tl.store(DZ + offs, dz.to(DZ.dtype.element_ty), mask=mask)
        if WRITE_A:
            tl.store(A + offs, (z * cdf).to(A.dtype.element_ty), mask=mask)
        db += dz  # masked elements: da = 0 there, so dz = 0
    tl.store(DB + pid_m * F + cols, tl.sum(db, 0), mask=cols < F)


# Tuning constants: a tile of ~4096 values per program on a GPU (4 warps, 32 values per thread: a plain streaming
# elementwise kernel, 16-byte loads along F), ~64k in the interpreter (fewer Python steps). BLOCK_F <= 256 keeps
# several programs across F = 1536 (ViT-S). The backward's db partial sums: ~4 programs per SM along M.
ELEMENTS_PER_PROGRAM = (4096, 65536)  # (GPU, interpreter)
MAX_BLOCK_F = 256
BWD_PROGRAMS_PER_SM = 4


def _blocks(M, F):
    BLOCK_F = min(MAX_BLOCK_F, triton.next_power_of_2(F))
    BLOCK_M = max(1, min(ELEMENTS_PER_PROGRAM[int(interpreter_on())] // BLOCK_F, triton.next_power_of_2(M)))
    return BLOCK_M, BLOCK_F


def _forward(h, bias):
    """h (..., F), bias (F,) -> GELU(h + bias) in h's dtype."""
    Fdim = h.shape[-1]
    h2 = h.reshape(-1, Fdim).contiguous()
    M = h2.shape[0]
    a = torch.empty_like(h2)
    BLOCK_M, BLOCK_F = _blocks(M, Fdim)
    _bias_gelu_fwd_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(Fdim, BLOCK_F))](
        h2, bias, a, M, Fdim, BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=4)
    return a.view(h.shape)


def _backward(h, bias, da, write_a):
    """dz (shape of h, h's dtype), dbias (bias's dtype) and, if write_a, GELU(h + bias) recomputed (else None).
    dz is written over da when da is a fresh contiguous buffer of h's dtype (the caller's own)."""
    Fdim = h.shape[-1]
    h2 = h.reshape(-1, Fdim).contiguous()
    M = h2.shape[0]
    da2 = da.reshape(-1, Fdim).to(h.dtype).contiguous()
    dz = da2 if write_a else torch.empty_like(h2)  # in bias_gelu_linear da is a temporary of ours: reuse it
    a = torch.empty_like(h2) if write_a else None
    BLOCK_M, BLOCK_F = _blocks(M, Fdim)
    programs, rows_per_program = split_rows(M, BLOCK_M, BWD_PROGRAMS_PER_SM, h)
    db = torch.empty(programs, Fdim, device=h.device, dtype=torch.float32)
    _bias_gelu_bwd_kernel[(programs, triton.cdiv(Fdim, BLOCK_F))](
        h2, bias, da2, dz, a if write_a else dz, db, M, Fdim, rows_per_program,
        WRITE_A=write_a, BLOCK_M=BLOCK_M, BLOCK_F=BLOCK_F, num_warps=4)
    return dz.view(h.shape), db.sum(0).to(bias.dtype), (a.view(h.shape) if write_a else None)


class _BiasGelu(torch.autograd.Function):
    """GELU(h + bias); keeps h (and the bias), recomputes GELU' in the backward."""

    @staticmethod
    def forward(ctx, h, bias):
        ctx.save_for_backward(h, bias)
        return _forward(h, bias)

    @staticmethod
    def backward(ctx, da):
        h, bias = ctx.saved_tensors
        dz, dbias, _ = _backward(h, bias, da, write_a=False)
        return dz, dbias


class _BiasGeluLinear(torch.autograd.Function):
    """F.linear(GELU(h + b1), w2, b2) as one node: keeps h, b1, w2, never a = GELU(h + b1), which the backward
    recomputes in the pass that writes dz."""

    @staticmethod
    def forward(ctx, h, b1, w2, b2):
        ctx.save_for_backward(h, b1, w2)
        ctx.has_b2 = b2 is not None
        return F.linear(_forward(h, b1), w2, b2)  # a is freed when this returns

    @staticmethod
    def backward(ctx, dout):
        h, b1, w2 = ctx.saved_tensors
        dout2 = dout.reshape(-1, dout.shape[-1])
        da = dout2 @ w2  # (M, F), a fresh buffer: dz is written over it
        dz, db1, a = _backward(h, b1, da, write_a=True)
        dw2 = dout2.t() @ a.reshape(-1, a.shape[-1]) if ctx.needs_input_grad[2] else None
        db2 = dout2.sum(0, dtype=torch.float32).to(dout.dtype) if ctx.has_b2 and ctx.needs_input_grad[3] else None
        return dz, db1, dw2, db2


# ----------------------------------------------------------------------------------------------------------------
# The plain PyTorch versions: the ground truth of the tests, the path on CPUs.

def bias_gelu_reference(h, bias):
    """F.gelu(h + bias), exact erf form."""
    return F.gelu(h + bias)


def mlp_reference(x, w1, b1, w2, b2):
    """fc2(GELU(fc1(x))): the ViT MLP as nn.Linear -> nn.GELU -> nn.Linear compute it."""
    return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)


def _kernel_ok(h, bias):
    if h.dim() < 1 or h.numel() == 0 or bias is None or tuple(bias.shape) != h.shape[-1:]:
        raise ValueError(f"bias_gelu: h must be a non-empty (..., F) tensor and bias (F,), got {tuple(h.shape)} "
                         f"and {None if bias is None else tuple(bias.shape)}")
    if not use_triton(h):
        return False
    if h.dtype not in (torch.float32, torch.float16, torch.bfloat16) or bias.dtype != h.dtype:
        raise ValueError(f"the Triton kernels take float32/float16/bfloat16, h and bias of one dtype, got {h.dtype} "
                         f"and {bias.dtype}: cast, or set MINIVIT_KERNELS=reference")
    return True


def bias_gelu(h, bias):
    """GELU(h + bias), exact erf form, in one pass. h (..., F), bias (F,), one dtype. Keeps h for the backward."""
    h, bias = autocast_inputs(h, bias)
    if not _kernel_ok(h, bias):
        return bias_gelu_reference(h, bias)
    return _BiasGelu.apply(h, bias)


def mlp(x, w1, b1, w2, b2):
    """The ViT MLP fc2(GELU(fc1(x))) with fc1's bias and GELU in one kernel and GELU's output never stored.
    x (..., D), w1 (F, D), b1 (F,), w2 (D_out, F), b2 (D_out,) or None -> (..., D_out); under autocast in its dtype."""
    if not use_triton(x):
        return mlp_reference(x, w1, b1, w2, b2)
    h = F.linear(x, w1)  # cuBLAS (autocast casts as for nn.Linear); the bias is added by the kernel
    h, b1, w2, b2 = autocast_inputs(h, b1, w2, b2)
    _kernel_ok(h, b1)
    return _BiasGeluLinear.apply(h, b1, w2.to(h.dtype), None if b2 is None else b2.to(h.dtype))
