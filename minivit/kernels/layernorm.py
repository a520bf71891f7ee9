"""LayerNorm fused with the residual add before it, forward and backward, saving only what the backward needs.

The math (Ba et al. 2016), per token row of D values, in the pre-norm block `x = x + attn(norm1(x)); x = x +
mlp(norm2(x))`: the residual add of one branch and the norm that starts the next are one pass,

    s = x + branch                          the new residual stream, rounded to its dtype (as PyTorch's add)
    mu = mean(s),  rstd = 1 / sqrt(var(s) + eps)
    xhat = (s - mu) * rstd,   y = xhat * gamma + beta       y written in the next GEMM's dtype

and the backward, given dy (from the next GEMM) and ds (the residual stream's own gradient, from further on):

    g = dy * gamma
    dx = dbranch = ds + rstd * (g - mean(g) - xhat * mean(g * xhat))
    dgamma = sum over rows of dy * xhat,  dbeta = sum over rows of dy

What the backward keeps. nn.LayerNorm saves its input s (plus mu and rstd) and the Linear after it saves y: two
(M, D) tensors. Here only y and rstd are kept and xhat is recomputed from y: xhat = (y - beta) / gamma (the
"memory-efficient" LayerNorm of Apex). y is the very tensor the next Linear keeps for its weight gradient, so the
norm itself costs 4 bytes per row, not 2 D (bf16) or 4 D (fp32) per row. The price: xhat recovered from a y
rounded to 16 bits carries that rounding, |err| <~ u (|xhat| + |beta / gamma|), u = 2^-8 (bf16) / 2^-11 (fp16),
in every gradient (the forward is untouched); gamma must not be 0 (a trained ViT's are O(1): ViT and DINO
initialise them at 1). In fp32 the recomputation is exact to fp32 rounding.

Memory traffic per token row, bf16 (2 bytes a value), forward + backward, in units of D bytes:
  - unfused (`s = x + branch` then F.layer_norm): add reads 4 writes 2; LN reads 2 writes 2; backward: LN reads
    s 2, dy 2, writes ds 2; the residual gradient add reads 4 writes 2 (autograd sums the two paths into s):
    6 + 4 + 6 + 6 = 22 D, and autograd keeps s (2 D) besides y;
  - fused: forward reads x, branch (4) writes s, y (4); backward reads dy, y, ds (6) writes dx (2): 16 D, and
    nothing but y and rstd kept: -6 D of traffic and -2 D of activations per LayerNorm.
For a ViT-S/16 DINO step (student 8,280 token-blocks per image, teacher 4,728 forward only, D = 384) the fused norm2
moves 8,280 x 6 x 384 + 4,728 x 2 x 384 = 23 MB less per image; bench/NOTES.md section 6 has the step prediction.
"""
import torch
import torch.nn.functional as F

from minivit.kernels import interpreter_on, split_rows, tl, triton, use_triton


@triton.jit
def _add_ln_fwd_kernel(
    X,  # (M, D) residual stream in, contiguous
    BRANCH,  # (M, D) branch to add, contiguous; not read unless HAS_BRANCH
    W, B,  # (D,) gamma, beta, any float dtype (the model's fp32 parameters)
    S,  # (M, D) out: s = x + branch in the stream's dtype; not written unless HAS_BRANCH
    Y,  # (M, D) out: LayerNorm(s) in the next GEMM's dtype
    RSTD,  # (M,) fp32 out: 1 / sqrt(var + eps), for the backward
    M, D,  # rows (tokens), row length (embed_dim)
    eps,  # LayerNorm epsilon (1e-6 in ViT/DINO)
    HAS_BRANCH: tl.constexpr,  # False: a plain LayerNorm of x
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # D padded to a power of two: a whole row in registers
):
    pid = tl.program_id(0)
    eps = tl.cast(eps, tl.float32)  # torch.compile passes a Python float as fp64
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < M) & (cols[None, :] < D)
    offs = rows.to(tl.int64)[:, None] * D + cols[None, :]  # int64: M * D passes 2^31 at large batches
    s = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BRANCH:
        s += tl.load(BRANCH + offs, mask=mask, other=0.0).to(tl.float32)
        s_stream = s.to(S.dtype.element_ty)
        tl.store(S + offs, s_stream, mask=mask)
        s = s_stream.to(tl.float32)  # normalise the stream as stored, as `norm(x + branch)` does in PyTorch
    mean = tl.sum(s, 1) / D
    sc = tl.where(mask, s - mean[:, None], 0.0)  # padding columns must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(sc * sc, 1) / D + eps)
    w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cols < D, other=0.0).to(tl.float32)
    y = sc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + rows, rstd, mask=rows < M)


@triton.jit
def _add_ln_bwd_kernel(
    DY,  # (M, D) gradient of y, contiguous
    DS,  # (M, D) gradient of s from the rest of the network, contiguous; not read unless HAS_DS
    Y,  # (M, D) the forward's y, from which xhat is recomputed
    W, B,  # (D,) gamma, beta
    RSTD,  # (M,) fp32, from the forward
    DX,  # (M, D) out: gradient of x (and of the branch: d(x + branch) / d branch = 1)
    DW, DB,  # (programs, D) fp32 out: this program's partial sums of dgamma, dbeta (torch adds the rows)
    M, D,  # rows, row length
    rows_per_program,  # a multiple of BLOCK_M: program p reduces rows [p * rows_per_program, + rows_per_program)
    HAS_DS: tl.constexpr,  # False when s has no other use (a plain LayerNorm, or the output never read)
    BLOCK_M: tl.constexpr,  # rows per loop step
    BLOCK_D: tl.constexpr,  # D padded to a power of two
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask_d = cols < D
    w = tl.load(W + cols, mask=mask_d, other=1.0).to(tl.float32)  # 1, not 0: padding columns divide by it
    b = tl.load(B + cols, mask=mask_d, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for m0 in range(0, rows_per_program, BLOCK_M):
        rows = pid * rows_per_program + m0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < M) & mask_d[None, :]
        offs = rows.to(tl.int64)[:, None] * D + cols[None, :]
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < M, other=0.0)
        xhat = tl.where(mask, (y - b[None, :]) / w[None, :], 0.0)  # recomputed: s itself was not kept
        g = dy * w[None, :]
        c1 = tl.sum(g, 1) / D  # mean(g)
        c2 = tl.sum(g * xhat, 1) / D  # mean(g * xhat)
        dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat
        db += dy
    tl.store(DW + pid * D + cols, tl.sum(dw, 0), mask=mask_d)
    tl.store(DB + pid * D + cols, tl.sum(db, 0), mask=mask_d)


# Tuning constants. A program holds BLOCK_M whole rows: ~4096 values on a GPU (ViT-S: 8 rows of 512 padded
# columns; 4 warps, 32 values per thread, no spills), the row-blocked layout of the Triton LayerNorm tutorial (05).
# The interpreter pays ~0.1 ms of Python per operation whatever the block: larger blocks, fewer steps.
ELEMENTS_PER_PROGRAM = (4096, 16384)  # (GPU, interpreter)
BWD_PROGRAMS_PER_SM = 4  # the backward's dgamma/dbeta partial sums: (4 * SMs, D) fp32, a few MB at most


def _block_sizes(M, D):
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_M = max(1, min(ELEMENTS_PER_PROGRAM[int(interpreter_on())] // BLOCK_D, triton.next_power_of_2(M)))
    return BLOCK_M, BLOCK_D


def _warps(BLOCK_M, BLOCK_D):
    return 8 if BLOCK_M * BLOCK_D >= 8192 else 4


def _forward(x, branch, weight, bias, eps, out_dtype):
    """x, branch (..., D) -> s (None without branch), y (..., D) in out_dtype, rstd (M,) fp32."""
    D = x.shape[-1]
    x2 = x.reshape(-1, D).contiguous()
    M = x2.shape[0]
    b2 = branch.reshape(-1, D).contiguous() if branch is not None else x2
    s = torch.empty_like(x2, dtype=torch.promote_types(x.dtype, branch.dtype)) if branch is not None else None
    y = torch.empty(M, D, device=x.device, dtype=out_dtype)
    rstd = torch.empty(M, device=x.device, dtype=torch.float32)
    BLOCK_M, BLOCK_D = _block_sizes(M, D)
    _add_ln_fwd_kernel[(triton.cdiv(M, BLOCK_M),)](
        x2, b2, weight, bias, s if s is not None else y, y, rstd, M, D, eps,
        HAS_BRANCH=branch is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=_warps(BLOCK_M, BLOCK_D))
    return (s.view(x.shape[:-1] + s.shape[-1:]) if s is not None else None), y.view(x.shape[:-1] + (D,)), rstd


def _backward(dy, ds, y, weight, bias, rstd, dx_dtype):
    """dx (shape of y, dx_dtype), dgamma, dbeta (weight's dtype) from dy and ds (None: no other use of s)."""
    D = y.shape[-1]
    y2 = y.reshape(-1, D)  # contiguous: written by _forward
    M = y2.shape[0]
    dy2 = dy.reshape(-1, D).contiguous()  # a copy only for odd layouts (e.g. the expanded gradient of .sum())
    ds2 = ds.reshape(-1, D).contiguous() if ds is not None else dy2
    dx = torch.empty(M, D, device=y.device, dtype=dx_dtype)
    BLOCK_M, BLOCK_D = _block_sizes(M, D)
    programs, rows_per_program = split_rows(M, BLOCK_M, BWD_PROGRAMS_PER_SM, y)
    dw = torch.empty(programs, D, device=y.device, dtype=torch.float32)
    db = torch.empty(programs, D, device=y.device, dtype=torch.float32)
    _add_ln_bwd_kernel[(programs,)](
        dy2, ds2, y2, weight, bias, rstd, dx, dw, db, M, D, rows_per_program,
        HAS_DS=ds is not None, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D, num_warps=_warps(BLOCK_M, BLOCK_D))
    return dx.view(y.shape), dw.sum(0).to(weight.dtype), db.sum(0).to(bias.dtype)


class _AddLayerNorm(torch.autograd.Function):
    """Triton forward and backward. Outputs (s, y), or y alone without a branch. Saves y and rstd, nothing else."""

    @staticmethod
    def forward(ctx, x, branch, weight, bias, eps, out_dtype):
        s, y, rstd = _forward(x, branch, weight, bias, eps, out_dtype)
        ctx.save_for_backward(y, weight, bias, rstd)
        ctx.dtypes = x.dtype, (branch.dtype if branch is not None else None)
        return (s, y) if branch is not None else y

    @staticmethod
    def backward(ctx, *grads):  # an unused output gets a zero gradient from autograd (in the ViT both are used)
        ds, dy = grads if len(grads) == 2 else (None, grads[0])
        y, weight, bias, rstd = ctx.saved_tensors
        x_dtype, branch_dtype = ctx.dtypes
        grad_dtype = torch.promote_types(x_dtype, branch_dtype) if branch_dtype is not None else x_dtype
        dx, dw, db = _backward(dy, ds, y, weight, bias, rstd, grad_dtype)
        # the add hands the same gradient to both of its inputs, as PyTorch's AddBackward does
        dbranch = dx.to(branch_dtype) if branch_dtype is not None else None
        return dx.to(x_dtype), dbranch, dw, db, None, None


# ----------------------------------------------------------------------------------------------------------------
# The plain PyTorch version, what minivit.vit.LayerNorm computed before this kernel: the ground truth of the tests.

def layer_norm_reference(x, weight, bias, eps):
    """F.layer_norm in x's dtype, also under autocast (autocast would compute and keep an fp32 copy): x (..., D)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.layer_norm(x, x.shape[-1:], weight.to(x.dtype), bias.to(x.dtype), eps)


def add_layer_norm_reference(x, branch, weight, bias, eps, out_dtype=None):
    """(s, y) = (x + branch, LayerNorm(x + branch)), y cast to out_dtype (default: s's dtype)."""
    s = x + branch if branch is not None else x
    y = layer_norm_reference(s, weight, bias, eps)
    return s, (y if out_dtype is None else y.to(out_dtype))


def _check(x, branch, weight, bias):
    D = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"layer norm: x must be a non-empty (..., D) tensor, got shape {tuple(x.shape)}")
    if branch is not None and branch.shape != x.shape:
        raise ValueError(f"layer norm: branch shape {tuple(branch.shape)} differs from x {tuple(x.shape)}")
    if tuple(weight.shape) != (D,) or tuple(bias.shape) != (D,):
        raise ValueError(f"layer norm: weight and bias must be ({D},), got {tuple(weight.shape)}, "
                         f"{tuple(bias.shape)}")
    devices = {t.device for t in (x, branch, weight, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"layer norm: inputs on several devices {sorted(map(str, devices))}: move them to one")


def _kernel_ok(*tensors):
    if not use_triton(tensors[0]):
        return False
    for t in tensors:
        if t is not None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"the Triton kernels take float32/float16/bfloat16, got {t.dtype}: "
                             "cast, or set MINIVIT_KERNELS=reference")
    return True


def add_layer_norm(x, branch, weight, bias, eps=1e-6, out_dtype=None):
    """s = x + branch and y = LayerNorm(s) in one pass -> (s, y). x, branch (..., D) (branch None: s is x itself,
    y a plain LayerNorm), weight, bias (D,) (any float dtype, kept as they are), y in out_dtype (default s's
    dtype; give the next GEMM's dtype to fuse the cast). fp32 statistics. Differentiable in every input."""
    _check(x, branch, weight, bias)
    if not _kernel_ok(x, branch, weight, bias):
        return add_layer_norm_reference(x, branch, weight, bias, eps, out_dtype)
    stream_dtype = x.dtype if branch is None else torch.promote_types(x.dtype, branch.dtype)
    out_dtype = stream_dtype if out_dtype is None else out_dtype
    if branch is None:
        return x, _AddLayerNorm.apply(x, None, weight, bias, float(eps), out_dtype)
    return _AddLayerNorm.apply(x, branch, weight, bias, float(eps), out_dtype)


def layer_norm(x, weight, bias, eps=1e-6, out_dtype=None):
    """LayerNorm(x) over the last dim, in x's dtype (or out_dtype), fp32 statistics; keeps only y and rstd."""
    return add_layer_norm(x, None, weight, bias, eps, out_dtype)[1]
