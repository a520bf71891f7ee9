"""Fused patch embedding: the ViT's first layer as one GEMM read straight out of the image, forward and backward.

The math (ViT sec. 3.1, eq. 1). A convolution with kernel = stride = p (`patch_size`) cuts x (B, C, H, W) into
Np = (H/p)(W/p) non-overlapping patches and projects each one with the same weight (D, C, p, p):

    y[b, n, d] = bias[d] + sum_{c,i,j} x[b, c, ph*p + i, pw*p + j] * weight[d, c, i, j],   n = ph * (W/p) + pw

Since every pixel belongs to exactly one patch this is a single matrix product

    Y (M, D) = A (M, K) @ W^T (K, D) + bias,     M = B*Np rows (one per patch), K = C*p*p, N = D = embed_dim

where A[m, k] = x[b, c, ph*p + i, pw*p + j] is the image itself seen through a strided view: the address of
A[m, k] is row_offset(m) + col_offset(k), so a tile of A is gathered by pointer arithmetic, with no im2col buffer.
The backward is that of a linear layer:
    dA = dY @ W     scattered back into dx: patches do not overlap, so each pixel is stored once, never added to;
    dW = dY^T @ A   a reduction over all M = B*Np rows, split over several programs to keep every SM busy;
    dbias = column sums of dY, accumulated in the same pass as dW.

Memory traffic, ViT-S/16 entry in bf16 (B=256, 224 px, C=3, D=384): |x| = 77 MB, the tokens |Y| = 38.5 MB.
  - conv2d writes (B, D, h, w) channel-first; torch.cat with the CLS token copies it into (B, 1+Np, D) and adding
    pos_embed reads and writes it again: 77 + 38.5 + 2*38.5 + 2*38.5 = 270 MB;
  - unfold + linear first writes an im2col buffer as large as x (stride = kernel makes it a permutation of x) and
    reads it back: 77 + 77 + 77 + 38.5, + 154 for cat and add = 424 MB;
  - `patch_embed_tokens` reads x once and writes the finished tokens once, CLS row and pos_embed added in the
    epilogue: 77 + 38.5 = 116 MB.
An H200 moves 116 MB in ~24 us and does the 2*M*K*D = 29.6 GFLOP in ~40 us: the op is close to balanced, so the
bytes saved are time saved.
"""
import torch
import torch.nn.functional as F

from minivit.kernels import autocast_inputs, interpreter_on, tl, triton, use_triton


@triton.jit
def _row_offsets(offs_m, Np, Wp, P, sxb, sxh, sxw):
    """Offset in x of each patch's top-left pixel: row m -> image b, patch n = (ph, pw)."""
    b, n = offs_m // Np, offs_m % Np
    ph, pw = n // Wp, n % Wp
    return b.to(tl.int64) * sxb + ph * P * sxh + pw * P * sxw  # int64: B*C*H*W may pass 2^31


@triton.jit
def _col_offsets(offs_k, P, sxc, sxh, sxw):
    """Offset inside a patch of each column k = (c, i, j), the order of weight.reshape(D, C*p*p)."""
    c, r = offs_k // (P * P), offs_k % (P * P)
    return c * sxc + (r // P) * sxh + (r % P) * sxw


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr,  # image (B, C, H, W), any strides
    w_ptr,  # weight as (D, K), contiguous
    bias_ptr,  # (D,); not read unless HAS_BIAS
    cls_ptr,  # cls_token (D,); not read unless TOKENS
    pos_ptr,  # pos_embed (1+Np, D), contiguous; not read unless TOKENS
    out_ptr,  # the patch rows of the output: (B, Np, D), or tokens[:, 1:] of (B, 1+Np, D) when TOKENS
    M, K, D,  # GEMM sizes: M = B*Np patches, K = C*p*p, D = embed_dim
    Np, Wp, P,  # patches per image, patches per image row, patch size p
    sxb, sxc, sxh, sxw,  # strides of x
    sob, son,  # strides of out over images and tokens (over d it is 1)
    HAS_BIAS: tl.constexpr, TOKENS: tl.constexpr,  # add bias; prepend CLS and add pos_embed
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,  # fp32 operands in the interpreter; tl.dot input precision
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < D
    row_x = _row_offsets(offs_m, Np, Wp, P, sxb, sxh, sxw)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K  # K = 3*14*14 = 588 is no multiple of any block: the tail is masked
        col_x = _col_offsets(offs_k, P, sxc, sxh, sxw)
        a = tl.load(x_ptr + row_x[:, None] + col_x[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=mask_k[:, None] & mask_n[None, :],
                     other=0.0)  # (BLOCK_K, BLOCK_N) tile of W^T
        if UPCAST:  # the interpreter's tl.dot gets bf16 wrong (it multiplies the raw uint16 bits): go through fp32
            a, wt = a.to(tl.float32), wt.to(tl.float32)
        acc = tl.dot(a, wt, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    n = offs_m % Np
    out_offs = (offs_m // Np).to(tl.int64)[:, None] * sob + n[:, None] * son + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if TOKENS:
        acc += tl.load(pos_ptr + (1 + n)[:, None] * D + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        # each image's first patch also writes the CLS row, one token before it: cls_token + pos_embed[0]
        cls = tl.load(cls_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        cls += tl.load(pos_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        cls_tile = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32) + cls[None, :]
        tl.store(out_ptr + out_offs - son, cls_tile.to(out_ptr.dtype.element_ty), mask=mask & (n == 0)[:, None])
    tl.store(out_ptr + out_offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_embed_dx_kernel(
    dy_ptr,  # gradient of the patch rows (B, Np, D), any strides
    w_ptr,  # weight as (D, K), contiguous
    dx_ptr,  # gradient of the image (B, C, H, W), written once per pixel
    M, K, D, Np, Wp, P,  # as in the forward
    sdb, sdn, sdd,  # strides of dy
    sxb, sxc, sxh, sxw,  # strides of dx
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m, mask_k = offs_m < M, offs_k < K
    row_dy = (offs_m // Np).to(tl.int64) * sdb + (offs_m % Np) * sdn
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):  # dA = dY @ W, reducing over embed_dim
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        dy = tl.load(dy_ptr + row_dy[:, None] + offs_d[None, :] * sdd, mask=mask_m[:, None] & mask_d[None, :],
                     other=0.0)
        w = tl.load(w_ptr + offs_d[:, None] * K + offs_k[None, :], mask=mask_d[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            dy, w = dy.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    row_x = _row_offsets(offs_m, Np, Wp, P, sxb, sxh, sxw)
    col_x = _col_offsets(offs_k, P, sxc, sxh, sxw)
    tl.store(dx_ptr + row_x[:, None] + col_x[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _patch_embed_dw_kernel(
    x_ptr,  # image (B, C, H, W), any strides
    dy_ptr,  # gradient of the patch rows (B, Np, D), any strides
    dw_ptr,  # fp32 partial sums (SPLIT, D, K): program pid_s reduces rows [pid_s*rows_per_split, +rows_per_split)
    db_ptr,  # fp32 partial sums (SPLIT, D) of dbias; not written unless HAS_BIAS
    M, K, D, Np, Wp, P, rows_per_split,
    sxb, sxc, sxh, sxw,  # strides of x
    sdb, sdn, sdd,  # strides of dy
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_n, pid_k, pid_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_n, mask_k = offs_n < D, offs_k < K
    col_x = _col_offsets(offs_k, P, sxc, sxh, sxw)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(0, rows_per_split, BLOCK_M):  # dW = dY^T @ A, reducing over this program's share of patches
        offs_m = pid_s * rows_per_split + m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        row_x = _row_offsets(offs_m, Np, Wp, P, sxb, sxh, sxw)
        row_dy = (offs_m // Np).to(tl.int64) * sdb + (offs_m % Np) * sdn
        a = tl.load(x_ptr + row_x[:, None] + col_x[None, :], mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        dy = tl.load(dy_ptr + row_dy[:, None] + offs_n[None, :] * sdd, mask=mask_m[:, None] & mask_n[None, :],
                     other=0.0)
        if UPCAST:
            a, dy = a.to(tl.float32), dy.to(tl.float32)
        acc = tl.dot(tl.trans(dy), a, acc, input_precision=PRECISION)
        if HAS_BIAS:  # every pid_k sums the same columns (1/BLOCK_K extra work); only pid_k == 0 stores them
            db += tl.sum(dy.to(tl.float32), axis=0)
    tl.store(dw_ptr + pid_s * D * K + offs_n[:, None] * K + offs_k[None, :], acc,
             mask=mask_n[:, None] & mask_k[None, :])
    if HAS_BIAS:
        if pid_k == 0:
            tl.store(db_ptr + pid_s * D + offs_n, db, mask=mask_n)


# Tuning constants, per kernel: (GPU blocks, interpreter blocks). GPU: the forward tile 128 x 128 x 32 is the
# Triton matmul tutorial's choice for 16-bit operands on Ampere/Hopper (8 warps, 3 stages = 48 KB of shared memory;
# fp32 tiles take twice the room, hence 2 stages); the backward tiles are smaller because dx has few D columns to
# reduce and dW few output tiles. Interpreter: it pays ~0.1 ms of Python per operation whatever the tile size, so the
# tests run faster on few large tiles. Every block shrinks to the problem (a power of two, >= 16 for tl.dot).
BLOCKS = {
    "fwd": ((128, 128, 32), (64, 128, 256)),  # (BLOCK_M, BLOCK_N, BLOCK_K): output tile (patches, D), K reduced
    "dx": ((128, 64, 32), (64, 256, 128)),  # (BLOCK_M, BLOCK_K, BLOCK_D): output tile (patches, pixels), D reduced
    "dw": ((64, 64, 32), (128, 256, 32)),  # (BLOCK_N, BLOCK_K, BLOCK_M): output tile (D, pixels), patches reduced
}
DW_PROGRAMS_PER_SM = 4  # dW has only (D/64)*(K/64) tiles (72 for ViT-S/16): split the M rows until each SM gets ~4


def _blocks(kernel, *sizes):
    caps = BLOCKS[kernel][int(interpreter_on())]  # int: torch.compile (dynamo) refuses a bool index
    return tuple(min(cap, max(16, triton.next_power_of_2(size))) for cap, size in zip(caps, sizes))


def _launch_options(dtype, tile):
    """(tl.dot input precision, num_warps, num_stages) for an output tile of `tile` elements."""
    fp32 = dtype == torch.float32  # fp32 in means fp32 products ("ieee", no TF32), as the reference computes
    return ("ieee" if fp32 else "tf32"), (8 if tile >= 128 * 128 else 4), (2 if fp32 else 3)


def _dw_split(M, D, K, device):
    """How many programs share the M-reduction of dW (the partial sums are then added by torch)."""
    BN, BK, BM = _blocks("dw", D, K, M)
    # 4 "SMs" in the interpreter, so that the tests exercise the split path too
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    tiles = triton.cdiv(D, BN) * triton.cdiv(K, BK)
    return max(1, min(triton.cdiv(M, BM), triton.cdiv(DW_PROGRAMS_PER_SM * sms, tiles)))


def _forward(x, weight, bias, cls_token, pos_embed):
    """Launch the forward kernel: (B, Np, D) patch tokens, or (B, 1+Np, D) tokens when cls_token is given."""
    B, C, H, W = x.shape
    D, p = weight.shape[0], weight.shape[-1]
    Hp, Wp = H // p, W // p
    M, K, tokens = B * Hp * Wp, C * p * p, cls_token is not None
    w = weight.reshape(D, K).contiguous()
    out = torch.empty(B, Hp * Wp + tokens, D, device=x.device, dtype=x.dtype)
    patches = out[:, 1:] if tokens else out  # a view: the kernel writes the CLS row one token before patch 0
    BM, BN, BK = _blocks("fwd", M, D, K)
    precision, warps, stages = _launch_options(x.dtype, BM * BN)
    grid = (triton.cdiv(M, BM), triton.cdiv(D, BN))
    _patch_embed_fwd_kernel[grid](
        x, w, w if bias is None else bias.contiguous(),
        cls_token.contiguous() if tokens else w, pos_embed.contiguous() if tokens else w, patches,
        M, K, D, Hp * Wp, Wp, p, *x.stride(), patches.stride(0), patches.stride(1),
        HAS_BIAS=bias is not None, TOKENS=tokens, UPCAST=interpreter_on(), PRECISION=precision,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_K=BK, num_warps=warps, num_stages=stages)
    return out


def _grad_x(dy, weight, x_shape):
    """dx (B, C, H, W) from dy (B, Np, D): dY @ W, each pixel stored exactly once."""
    B, C, H, W = x_shape
    D, p = weight.shape[0], weight.shape[-1]
    M, K, Wp = dy.shape[0] * dy.shape[1], C * p * p, W // p
    dx = torch.empty(x_shape, device=dy.device, dtype=dy.dtype)
    BM, BK, BD = _blocks("dx", M, K, D)
    precision, warps, stages = _launch_options(dy.dtype, BM * BK)
    _patch_embed_dx_kernel[(triton.cdiv(M, BM), triton.cdiv(K, BK))](
        dy, weight.reshape(D, K).contiguous(), dx, M, K, D, dy.shape[1], Wp, p, *dy.stride(), *dx.stride(),
        UPCAST=interpreter_on(), PRECISION=precision, BLOCK_M=BM, BLOCK_K=BK, BLOCK_D=BD,
        num_warps=warps, num_stages=stages)
    return dx


def _grad_weight_bias(x, dy, weight, has_bias):
    """dweight (D, C, p, p) and dbias (D,) or None, from x and dy (B, Np, D); fp32 sums, cast once at the end."""
    B, C, H, W = x.shape
    D, p = weight.shape[0], weight.shape[-1]
    M, K = B * dy.shape[1], C * p * p
    BN, BK, BM = _blocks("dw", D, K, M)
    split = _dw_split(M, D, K, x.device)
    rows_per_split = triton.cdiv(triton.cdiv(M, BM), split) * BM
    dw = torch.empty(split, D, K, device=x.device, dtype=torch.float32)
    db = torch.empty(split, D, device=x.device, dtype=torch.float32)
    precision, warps, stages = _launch_options(x.dtype, BN * BK)
    _patch_embed_dw_kernel[(triton.cdiv(D, BN), triton.cdiv(K, BK), split)](
        x, dy, dw, db, M, K, D, dy.shape[1], W // p, p, rows_per_split, *x.stride(), *dy.stride(),
        HAS_BIAS=has_bias, UPCAST=interpreter_on(), PRECISION=precision, BLOCK_N=BN, BLOCK_K=BK, BLOCK_M=BM,
        num_warps=warps, num_stages=stages)
    dbias = db.sum(0).to(weight.dtype) if has_bias else None
    return dw.sum(0).reshape(weight.shape).to(weight.dtype), dbias


class _PatchEmbed(torch.autograd.Function):
    """Triton forward and backward; cls_token and pos_embed are None for plain patch tokens."""

    @staticmethod
    def forward(ctx, x, weight, bias, cls_token, pos_embed):
        ctx.save_for_backward(x, weight)
        ctx.has_bias, ctx.tokens = bias is not None, cls_token is not None
        return _forward(x, weight, bias, cls_token, pos_embed)

    @staticmethod
    def backward(ctx, dout):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_cls, need_pos = ctx.needs_input_grad
        dy = dout[:, 1:] if ctx.tokens else dout  # a strided view: the kernels take any strides
        dx = _grad_x(dy, weight, x.shape) if need_x else None
        dw = dbias = dcls = dpos = None
        if need_w or need_b:
            dw, dbias = _grad_weight_bias(x, dy, weight, ctx.has_bias)
        if need_cls:  # the CLS row and pos_embed are shared by the batch: their gradients are batch sums
            dcls = dout[:, :1].sum(0, keepdim=True, dtype=torch.float32).to(dout.dtype)
        if need_pos:
            dpos = dout.sum(0, keepdim=True, dtype=torch.float32).to(dout.dtype)
        return dx, dw, dbias, dcls, dpos


def _check(x, weight, bias, cls_token=None, pos_embed=None):
    """Raise ValueError naming the first bad input."""
    if x.dim() != 4 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty (B, C, H, W) image batch, got shape {tuple(x.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must be (D, C, p, p) with C = {x.shape[1]} channels of x, "
                         f"got {tuple(weight.shape)}")
    D, p, (H, W) = weight.shape[0], weight.shape[-1], x.shape[2:]
    if H % p or W % p:
        raise ValueError(f"image size {H}x{W} is not a multiple of patch_size {p}: resize or crop it")
    if bias is not None and tuple(bias.shape) != (D,):
        raise ValueError(f"bias must be ({D},) or None, got {tuple(bias.shape)}")
    if cls_token is not None and tuple(cls_token.shape) != (1, 1, D):
        raise ValueError(f"cls_token must be (1, 1, {D}), got {tuple(cls_token.shape)}")
    n_tokens = 1 + (H // p) * (W // p)
    if pos_embed is not None and tuple(pos_embed.shape) != (1, n_tokens, D):
        raise ValueError(f"pos_embed must be (1, {n_tokens}, {D}) for a {H}x{W} image at patch_size {p}, got "
                         f"{tuple(pos_embed.shape)}: interpolate it to this grid first")
    tensors = [t for t in (x, weight, bias, cls_token, pos_embed) if t is not None]
    if len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1:
        raise ValueError("x, weight, bias, cls_token, pos_embed must share one dtype and device, got "
                         f"{[str(t.dtype) for t in tensors]} on {[str(t.device) for t in tensors]}")


def patch_embed_reference(x, weight, bias=None):
    """conv2d with stride = kernel, flattened to tokens. x (B, C, H, W), weight (D, C, p, p), bias (D,) -> (B, N, D)."""
    p = weight.shape[-1]
    return F.conv2d(x, weight, bias, stride=p).flatten(2).transpose(1, 2)


def patch_embed_tokens_reference(x, weight, bias, cls_token, pos_embed):
    """The ViT input: cat(CLS, patch tokens) + pos_embed. cls_token (1, 1, D), pos_embed (1, 1+N, D) -> (B, 1+N, D)."""
    patches = patch_embed_reference(x, weight, bias)
    return torch.cat([cls_token.expand(x.shape[0], -1, -1), patches], dim=1) + pos_embed


def _kernel_ok(x):
    if not use_triton(x):
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton kernels take float32/float16/bfloat16, got {x.dtype}: "
                         "cast, or set MINIVIT_KERNELS=reference")
    return True


def patch_embed(x, weight, bias=None):
    """Patch embedding as one GEMM. x (B, C, H, W), weight (D, C, p, p), bias (D,) or None -> (B, (H/p)*(W/p), D).

    Equals nn.Conv2d(C, D, p, stride=p) followed by flatten(2).transpose(1, 2); fp32/fp16/bf16 in and out, fp32
    accumulation. H and W must be multiples of p."""
    x, weight, bias = autocast_inputs(x, weight, bias)
    _check(x, weight, bias)
    if not _kernel_ok(x):
        return patch_embed_reference(x, weight, bias)
    return _PatchEmbed.apply(x, weight, bias, None, None)


def patch_embed_tokens(x, weight, bias, cls_token, pos_embed):
    """The whole ViT input in one kernel: cat(cls_token, patch tokens) + pos_embed -> (B, 1+(H/p)*(W/p), D).

    x (B, C, H, W), weight (D, C, p, p), bias (D,) or None, cls_token (1, 1, D), pos_embed (1, 1+N, D) already at
    this grid size; gradients for all of them."""
    if cls_token is None or pos_embed is None:
        raise ValueError("patch_embed_tokens needs cls_token and pos_embed; use patch_embed for patch tokens alone")
    x, weight, bias, cls_token, pos_embed = autocast_inputs(x, weight, bias, cls_token, pos_embed)
    _check(x, weight, bias, cls_token, pos_embed)
    if not _kernel_ok(x):
        return patch_embed_tokens_reference(x, weight, bias, cls_token, pos_embed)
    return _PatchEmbed.apply(x, weight, bias, cls_token, pos_embed)
