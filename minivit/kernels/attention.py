"""Fused multi-head attention (FlashAttention-2, Dao 2023), forward and backward, in Triton.

The math, per (batch, head), with q, k, v of shape (N, D) and scale = D ** -0.5:

    S = scale * q k^T          (N, N)  scores
    P = softmax(S, dim=-1)     (N, N)  attention weights, rows sum to 1
    O = P v                    (N, D)

Backward, given dO = dLoss/dO:

    dV = P^T dO                dP = dO v^T
    dS = P * (dP - delta)      delta_i = sum_j P_ij dP_ij = sum_d dO_id O_id   (the softmax Jacobian)
    dQ = scale * dS k          dK = scale * dS^T q

Memory traffic. The plain version writes S, reads it for the softmax, writes P, reads it for P v: about 4 N^2
elements per head, and keeps P alive for the backward. ViT-S/8 at 224 px (N = 785, D = 64) moves 4 * 785^2 =
2.5M elements per head that way, against 4 N D = 0.2M for reading q, k, v and writing O: 12x more, and a batch of
64 images stores 64 * 6 heads * 785^2 * 2 bytes = 0.47 GB of P per block. The fused kernel keeps a (BLOCK_M, D)
block of queries on chip and streams k, v past it; the softmax is computed online (Milakov & Gimelshein 2018):

    m_new = max(m, rowmax(S_blk));   l = l * exp(m - m_new) + rowsum(exp(S_blk - m_new))
    acc   = acc * exp(m - m_new) + exp(S_blk - m_new) v_blk;   at the end  O = acc / l

so HBM sees q, k, v, O once each (k, v are re-read once per query block, mostly from L2). It saves only the
log-sum-exp L = m + log(l) per row (N floats), from which the backward recomputes P = exp(S - L) block by block:
no (N, N) buffer in either direction. Softmax runs in base 2: log2(e) is folded into the scale, so each
exponential is one exp2 instruction (exp(x) = exp2(x * log2(e))).

The backward is deterministic (no atomics: every output element has exactly one writer) and has two paths,
chosen by the sequence length (_backward_path):
- one tile (N <= 64 padded to a power of two >= 16; in fp32 32 tokens at D <= 64, 16 at D = 80..128): one program per
  (batch, head) holds all of S, so it computes P once and runs the five GEMMs S = q k^T, dV = P^T dO,
  dP = dO v^T, dQ = dS k, dK = dS^T q, reading q, k, v, O, dO once and writing dQ, dK, dV once: 8 N D elements
  of traffic per head and one launch. DINO's 96 px crops at /16 (N = 37) take this path.
- blocks (longer sequences): one program per block of keys accumulates dK, dV over all queries and computes
  delta = rowsum(dO * O) for the query rows it visits, which the programs of key block 0 store; then one program
  per block of queries accumulates dQ over all keys, reading that delta. Both recompute S and P, seven GEMMs in
  all instead of five, which is cheaper than keeping P; q, k, v, dO are read by both, O by the first.
Not built yet: for 64 < N <= ~256, one program per head looping over its key blocks, summing dQ in an fp32
scratch only it touches (deterministic; FlashAttention-2 adds dQ with fp32 atomics instead), would drop the dQ
kernel's re-reads and its two recomputed GEMMs; bench/NOTES.md section 8 counts what it would save and cost.

Precision: every sum accumulates in fp32. fp32 inputs get exact fp32 dots (not tf32), on CUDA cores: for speed
run the model in bf16 autocast. With fp16/bf16 inputs the tensor cores take P and dS rounded to that dtype, and
delta reads O after its rounding, as in FlashAttention-2 itself; with very few tokens or a very sharp softmax
this leaves dQ and dK a few units in the last place less accurate than the plain math (tests/test_attention.py).
"""
import torch

from minivit.kernels import interpreter_on, tl, triton, use_triton

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
_LOG2E = tl.constexpr(LOG2E)  # the same, as a compile-time constant the kernels can read


# ----------------------------------------------------------------------------------------------------------------
# Kernels. Tensors are (B, H, N, D); q, k, v, dO come with any strides (e.g. views of one qkv GEMM output); O is
# written with any strides too: by default in the token layout (B, N, H, D) that the output projection reads, so
# that concatenating the heads is a view, not a copy. The other buffers (LSE, delta, dQ, dK, dV) are contiguous.
# Grid axis 0 is B * H because it may grow past 65535 (axes 1 and 2 may not); axis 1 is the block index along N.

@triton.jit
def _dot(a, b, F32_DOT: tl.constexpr):
    """a @ b with fp32 accumulation. "ieee" keeps fp32 inputs exact: the default tf32 would round them to 10
    mantissa bits (~1e-3 error); for fp16/bf16 inputs the setting changes nothing. F32_DOT upcasts the operands
    first: Triton's CPU interpreter multiplies bf16 as raw uint16 bits (wrong results), while after rounding to
    bf16 an fp32 product of two bf16 numbers is exact, so the upcast reproduces the GPU's numerics."""
    if F32_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _attn_fwd_kernel(
    Q, K, V,  # (B, H, N, D) inputs, fp32/fp16/bf16, any strides
    O,  # (B, H, N, D) output, dtype of Q, any strides
    LSE,  # (B, H, N) fp32 output: L_i = log sum_j exp(S_ij), natural log, for the backward
    stride_qb, stride_qh, stride_qn, stride_qd,  # element strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # ... of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # ... of V
    stride_ob, stride_oh, stride_on, stride_od,  # ... of O
    H, N, D,  # heads, tokens, head dim (D <= BLOCK_D: the padding columns are masked)
    qk_scale,  # scale * log2(e): scores come out in base 2
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,  # head dim padded to a power of two >= 16 (tl.dot's smallest tile)
    F32_DOT: tl.constexpr,  # upcast dot operands (the interpreter's bf16), see _dot
):
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)  # int64: b * stride_qb overflows int32 at big B
    qk_scale = tl.cast(qk_scale, tl.float32)  # under torch.compile a Python float arrives as fp64
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += pid_bh.to(tl.int64) * N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's query rows
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_q = (offs_m[:, None] < N) & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_q, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max of the base-2 scores
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)  # running (unnormalised) output
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_kv = (cols[:, None] < N) & mask_d[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_kv, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_kv, other=0.0)
        s = _dot(q, tl.trans(k), F32_DOT) * qk_scale  # (BLOCK_M, BLOCK_N)
        # a zero-filled key still scores 0 and would take a share of the softmax: remove it with -inf
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is in the first block, since N >= 1
        alpha = tl.exp2(m_i - m_new)  # rescales what was summed under the old max (0 on the first step)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, F32_DOT)  # P rounded to the input dtype, as FA2
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty), mask=mask_q)
    tl.store(LSE + offs_m, (m_i + tl.log2(l_i)) / _LOG2E, mask=offs_m < N)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, O, DO,  # (B, H, N, D) inputs, any strides
    LSE,  # (B, H, N) fp32, from the forward
    DELTA,  # (B, H, N) fp32 output: delta_i = sum_d dO_id O_id, written by the programs of key block 0
    DK, DV,  # (B, H, N, D) outputs, contiguous, dtype of Q
    stride_qb, stride_qh, stride_qn, stride_qd,  # element strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # ... of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # ... of V
    stride_ob, stride_oh, stride_on, stride_od,  # ... of O
    stride_dob, stride_doh, stride_don, stride_dod,  # ... of DO
    H, N, D,  # heads, tokens, head dim
    qk_scale,  # scale * log2(e), as in the forward
    scale,  # the softmax scale itself: dK = scale * dS^T q
    BLOCK_M: tl.constexpr,  # queries per loop step
    BLOCK_N: tl.constexpr,  # keys per program (their dK, dV stay in registers)
    BLOCK_D: tl.constexpr,  # padded head dim
    F32_DOT: tl.constexpr,  # see _dot
):
    pid_bh, pid_n = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)  # fp64 under torch.compile
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    DO += b * stride_dob + h * stride_doh
    LSE += pid_bh.to(tl.int64) * N
    DELTA += pid_bh.to(tl.int64) * N

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # this program's keys
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_kv = (offs_n[:, None] < N) & mask_d[None, :]
    k = tl.load(K + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_kv, other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_kv, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        rows = start_m + offs_m
        mask_q = (rows[:, None] < N) & mask_d[None, :]
        q = tl.load(Q + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_q, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask_q, other=0.0)
        o = tl.load(O + rows[:, None] * stride_on + offs_d[None, :] * stride_od, mask=mask_q, other=0.0)
        lse = tl.load(LSE + rows, mask=rows < N, other=0.0)
        # delta here, not in a launch of its own: this program reads dO anyway, O costs one more (BLOCK_M, D) load
        # (from L2 after the first key block's programs), and the programs of key block 0 leave it for the dQ
        # kernel, which the stream runs after this one
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        if pid_n == 0:
            tl.store(DELTA + rows, delta, mask=rows < N)
        # work with transposes, (keys, queries), so that the reductions below run over queries
        sT = _dot(k, tl.trans(q), F32_DOT) * qk_scale
        pT = tl.exp2(sT - lse[None, :] * _LOG2E)  # P^T recomputed from the saved log-sum-exp
        pT = tl.where(rows[None, :] < N, pT, 0.0)  # padding queries contribute nothing
        dv += _dot(pT.to(do.dtype), do, F32_DOT)  # dV = P^T dO
        dpT = _dot(v, tl.trans(do), F32_DOT)  # dP^T = v dO^T
        dsT = pT * (dpT - delta[None, :])  # dS^T
        dk += _dot(dsT.to(q.dtype), q, F32_DOT)  # dK = dS^T q (times scale below)

    out = pid_bh.to(tl.int64) * N * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask_kv)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_kv)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO,  # (B, H, N, D) inputs, any strides
    LSE, DELTA,  # (B, H, N) fp32, from the forward and from _attn_bwd_dkdv_kernel
    DQ,  # (B, H, N, D) output, contiguous, dtype of Q
    stride_qb, stride_qh, stride_qn, stride_qd,  # element strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # ... of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # ... of V
    stride_dob, stride_doh, stride_don, stride_dod,  # ... of DO
    H, N, D,  # heads, tokens, head dim
    qk_scale,  # scale * log2(e)
    scale,  # dQ = scale * dS k
    BLOCK_M: tl.constexpr,  # queries per program (their dQ stays in registers)
    BLOCK_N: tl.constexpr,  # keys per loop step
    BLOCK_D: tl.constexpr,  # padded head dim
    F32_DOT: tl.constexpr,  # see _dot
):
    pid_bh, pid_m = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)  # fp64 under torch.compile
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # this program's queries
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask_q = (offs_m[:, None] < N) & mask_d[None, :]
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_q, other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask_q, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * N + offs_m, mask=offs_m < N, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        cols = start_n + offs_n
        mask_kv = (cols[:, None] < N) & mask_d[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_kv, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_kv, other=0.0)
        s = _dot(q, tl.trans(k), F32_DOT) * qk_scale
        p = tl.exp2(s - lse[:, None] * _LOG2E)
        p = tl.where(cols[None, :] < N, p, 0.0)  # padding keys: P = 0 (a zero-filled k would give exp(-L))
        dp = _dot(do, tl.trans(v), F32_DOT)  # dP = dO v^T
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k.dtype), k, F32_DOT)  # dQ = dS k (times scale below)

    out = pid_bh.to(tl.int64) * N * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=mask_q)


@triton.jit
def _attn_bwd_tile_kernel(
    Q, K, V, O, DO,  # (B, H, N, D) inputs, any strides
    LSE,  # (B, H, N) fp32, from the forward
    DQ, DK, DV,  # (B, H, N, D) outputs, contiguous, dtype of Q
    stride_qb, stride_qh, stride_qn, stride_qd,  # element strides of Q
    stride_kb, stride_kh, stride_kn, stride_kd,  # ... of K
    stride_vb, stride_vh, stride_vn, stride_vd,  # ... of V
    stride_ob, stride_oh, stride_on, stride_od,  # ... of O
    stride_dob, stride_doh, stride_don, stride_dod,  # ... of DO
    H, N, D,  # heads, tokens (N <= BLOCK), head dim
    qk_scale,  # scale * log2(e), as in the forward
    scale,  # dQ = scale * dS k, dK = scale * dS^T q
    BLOCK: tl.constexpr,  # N padded to a power of two >= 16: the whole sequence, as queries and as keys
    BLOCK_D: tl.constexpr,  # padded head dim
    F32_DOT: tl.constexpr,  # see _dot
):
    """The whole backward of one (batch, head) when its (N, N) scores fit one tile: S and P once, five GEMMs,
    every load once, every store once, one launch (no delta kernel, no recompute, no atomics)."""
    pid_bh = tl.program_id(0)
    b, h = (pid_bh // H).to(tl.int64), (pid_bh % H).to(tl.int64)
    qk_scale, scale = tl.cast(qk_scale, tl.float32), tl.cast(scale, tl.float32)  # fp64 under torch.compile
    offs = tl.arange(0, BLOCK)  # token index, for rows (queries) and columns (keys) alike
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs[:, None] < N) & (offs_d[None, :] < D)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask, other=0.0)
    k = tl.load(K + b * stride_kb + h * stride_kh + offs[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask, other=0.0)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * N + offs, mask=offs < N, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # (BLOCK,) the softmax Jacobian's row term

    s = _dot(q, tl.trans(k), F32_DOT) * qk_scale  # 1. S (BLOCK, BLOCK), base 2
    p = tl.exp2(s - lse[:, None] * _LOG2E)  # P from the saved log-sum-exp: no row max or sum again
    p = tl.where((offs[:, None] < N) & (offs[None, :] < N), p, 0.0)  # padding rows and keys: P = 0
    dv = _dot(tl.trans(p.to(do.dtype)), do, F32_DOT)  # 2. dV = P^T dO
    dp = _dot(do, tl.trans(v), F32_DOT)  # 3. dP = dO v^T
    ds = (p * (dp - delta[:, None])).to(q.dtype)  # dS, rounded once for both GEMMs that read it, as FA2
    dq = _dot(ds, k, F32_DOT)  # 4. dQ = dS k (times scale below)
    dk = _dot(tl.trans(ds), q, F32_DOT)  # 5. dK = dS^T q (times scale below)

    out = pid_bh.to(tl.int64) * N * D + offs[:, None] * D + offs_d[None, :]
    tl.store(DQ + out, (dq * scale).to(DQ.dtype.element_ty), mask=mask)
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers: check, allocate, pick the tiles, launch.

MAX_HEAD_DIM = 128  # the forward keeps a (BLOCK_M, D) fp32 accumulator per program: beyond 128 it spills


def _check_inputs(q, k, v):
    """Raise ValueError unless q, k, v are one (B, H, N, D) shape, dtype and device, floating, 1 <= D <= 128."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise ValueError(f"attention: {name} must be a 4-d tensor (B, H, N, D), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"attention: q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} differ: "
                         "self-attention needs one (B, H, N, D) for all three")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} differ: cast them to one")
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"attention: dtype {q.dtype} is not supported: use float32, float16 or bfloat16")
    if not q.device == k.device == v.device:
        raise ValueError(f"attention: q, k, v are on {q.device}, {k.device}, {v.device}: move them to one device")
    if q.numel() == 0:
        raise ValueError(f"attention: empty input of shape {tuple(q.shape)}: B, H, N and D must all be >= 1")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D={q.shape[-1]} > {MAX_HEAD_DIM} is not supported: use more heads")


def _tiles(D, dtype, N):
    """BLOCK_D, then (BLOCK_M, BLOCK_N, num_warps, num_stages) for the forward, dK/dV and dQ kernels.

    tests/test_aot_compile.py compiles every launch of a DINO step (ViT-S, D = 64; N = 197, 785, 37, 145) and of
    ViT-H's heads (D = 80) for sm_80 and sm_90 as the JIT specialises them (divisibility-by-16 hints included), and
    ptxas reports, Triton 3.6 and 3.9 alike: shared memory at most 64 KB at D <= 64 and 80 KB at D = 80-128 on
    sm_90, 56 / 72 KB on sm_80 (whose count consumer GPUs, 99 KB, share); no register spills but two. The dK/dV
    kernel's (32, 128) 16-bit tile spills 20 B (Triton 3.6) to 68 B (3.9) a thread, kept because it timed fastest
    (the test's SPILL_ALLOWED says why); the fp32 forward at D = 80-128 spills 20 B on sm_80 with Triton 3.9."""
    BLOCK_D = max(16, triton.next_power_of_2(D))  # tl.dot needs >= 16; D=80 (ViT-H) runs as 128, masked
    if dtype == torch.float32:
        # exact fp32 dots run on CUDA cores (FMA), operands in registers: with the fp16 tiles they spill. At D = 128
        # the dK/dV kernel's 4 warps spilled 364-444 B a thread, half of it inside its loop (255 registers on sm_90,
        # and on sm_80 with Triton 3.6); 8 warps hold the same tile in 94-115 registers, no spill, and still fit two
        # programs per SM (registers and shared memory), so nothing is given up for it
        dkdv_warps = 8 if BLOCK_D > 64 else 4
        return BLOCK_D, (64, 32, 8, 2), (16, 32, dkdv_warps, 2), (32, 32, 4, 2)
    if BLOCK_D <= 64:
        # Measured on an H200, bf16, D = 64, by bench/tune_attention.py (its table is in bench/NOTES.md), the
        # fastest of 16-24 tiles per kernel. Short sequences (DINO's 96 px crops: 37 and 145 tokens) want small
        # tiles, which make more programs: at N = 37 the forward takes half the time of a 128-row tile.
        if N <= 160:
            return BLOCK_D, (64, 32, 4, 3), (32, 64, 4, 3), (64, 32, 4, 3)
        return BLOCK_D, (128, 64, 8, 3), (32, 128, 4, 3), (128, 32, 8, 3)  # 197 and 785 tokens
    big = BLOCK_D > 64
    warps = 8 if big else 4  # 8 warps share the (BLOCK, 128) fp32 accumulators of D=80 and 128
    # forward: 128 queries share each k, v tile (half the K/V re-reads of 64); at D=128 that many rows spill
    fwd = (64 if big else 128, 64, warps, 2 if big else 3)
    # backward: a program keeps two (BLOCK, D) operand tiles and two fp32 accumulators for its whole loop, next
    # to the recomputed (BLOCK_M, BLOCK_N) P and dS: at D=128 the streamed side shrinks to 32 rows
    dkdv = (32 if big else 64, 64, warps, 2)
    dq = (64, 32 if big else 64, warps, 2)
    return BLOCK_D, fwd, dkdv, dq


def _buffer(out, shape, dtype, like, contiguous=True):
    """An output buffer: the caller's (checked; the tests pre-fill them with NaN) or a new contiguous one."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or (contiguous and not out.is_contiguous()):
        raise ValueError(f"attention: output buffer {tuple(out.shape)} {out.dtype} must be {shape} {dtype}"
                         + (", contiguous" if contiguous else ""))
    return out


def _f32_dot(q):
    """Upcast dot operands in the kernels? Only for bf16 in Triton's CPU interpreter (see _dot)."""
    return q.dtype == torch.bfloat16 and interpreter_on()


def _attn_forward(q, k, v, scale, o=None, lse=None):
    """q, k, v (B, H, N, D), any strides -> o (B, H, N, D) in q's dtype, lse (B, H, N) fp32 (natural log).
    o is a view of a (B, N, H, D) tensor unless the caller passes a buffer: o.transpose(1, 2).reshape(B, N, H * D),
    the heads concatenated, is then free."""
    B, H, N, D = q.shape
    if o is None:
        o = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device).transpose(1, 2)
    o = _buffer(o, (B, H, N, D), q.dtype, q, contiguous=False)
    lse = _buffer(lse, (B, H, N), torch.float32, q)
    BLOCK_D, (BLOCK_M, BLOCK_N, warps, stages), _, _ = _tiles(D, q.dtype, N)
    grid = (B * H, triton.cdiv(N, BLOCK_M))
    _attn_fwd_kernel[grid](
        q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, N, D, scale * LOG2E,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, F32_DOT=_f32_dot(q), num_warps=warps, num_stages=stages)
    return o, lse


# The backward's two paths, chosen by the padded sequence length BLOCK. The one-tile kernel keeps (BLOCK, BLOCK)
# fp32 tiles (S, P, dP, dS) next to five (BLOCK, BLOCK_D) operands and three fp32 accumulators for its whole life.
# ptxas on that kernel, compiled as the JIT specialises it (divisibility-by-16 hints on the pointers and strides;
# without them 64 x 64 takes 209 registers instead of 154 on sm_90 and spills 316 B on sm_80), Triton 3.9 / 3.6,
# sm_90 and sm_80 (tests/test_aot_compile.py compiles the launched ones; the others were forced with path="tile"),
# 16-bit inputs:
#   64 x 64, 4 warps: 154 / 152 registers on sm_90, 238 on sm_80, no spill; 64 x 128, 8 warps: 148 and 158, none;
#   128 x 64, 8 warps: 215-217 on sm_90, none (but 96 KB of shared memory), while sm_80 spills 472-484 B; 16 warps
#   spill on both (264-272 B on sm_90, ~12 KB on sm_80).
# fp32 operands stay in registers (exact dots on CUDA cores): 32 x 32 and 16 x 128 fit (64-134 and 79-96 registers);
# 32 x 64 takes 255 and spills 12-20 B on sm_90 (none on sm_80), stored and reloaded once per thread, since this
# kernel has no loop; 64 x 64 spills 3-45 KB. Hence at most 64 tokens in 16 bits (any D <= 128), and 32 x 64
# elements in fp32. Past that the blocked path, whose tiles do not grow with N, is the one that scales.
TILE_MAX_TOKENS = 64  # padded N of the one-tile backward, fp16/bf16
TILE_MAX_ELEMENTS_FP32 = 32 * 64  # padded N times padded D of the one-tile backward in fp32 (and N <= 32)
TILE_LIMIT = 128  # what the one-tile kernel accepts when a caller forces it (tests, sweeps): beyond, S spills badly


def _backward_path(N, D, dtype):
    """Which backward runs: "tile" (_attn_bwd_tile_kernel, one program per (batch, head)) when the padded (N, N)
    scores and (N, D) operands fit one program's registers (the limits above), else "blocks" (_attn_bwd_dkdv_kernel
    then _attn_bwd_dq_kernel)."""
    block, block_d = max(16, triton.next_power_of_2(N)), max(16, triton.next_power_of_2(D))
    if dtype == torch.float32:
        fits = block <= 32 and block * block_d <= TILE_MAX_ELEMENTS_FP32
    else:
        fits = block <= TILE_MAX_TOKENS
    return "tile" if fits else "blocks"


def _attn_backward(q, k, v, o, lse, do, scale, dq=None, dk=None, dv=None, delta=None, path=None):
    """Gradients of o = attention(q, k, v) for upstream do (B, H, N, D): dq, dk, dv (B, H, N, D), q's dtype.
    path: "tile" or "blocks", default _backward_path's choice (the tests run both on the same shapes). delta, a
    (B, H, N) fp32 buffer, is the blocked path's scratch (the tile path keeps it in registers)."""
    B, H, N, D = q.shape
    do = do.to(q.dtype)  # a no-op unless something upstream changed the dtype
    dq, dk, dv = (_buffer(t, (B, H, N, D), q.dtype, q) for t in (dq, dk, dv))
    path = _backward_path(N, D, q.dtype) if path is None else path
    BLOCK_D, _, (M1, N1, warps1, stages1), (M2, N2, warps2, stages2) = _tiles(D, q.dtype, N)
    strides = (*q.stride(), *k.stride(), *v.stride())
    if path == "tile":
        BLOCK = max(16, triton.next_power_of_2(N))
        if BLOCK > TILE_LIMIT:
            raise ValueError(f"attention: N={N} is too large for the one-tile backward (<= {TILE_LIMIT} tokens): "
                             "use path='blocks'")
        _attn_bwd_tile_kernel[(B * H,)](
            q, k, v, o, do, lse, dq, dk, dv, *strides, *o.stride(), *do.stride(), H, N, D, scale * LOG2E, scale,
            BLOCK=BLOCK, BLOCK_D=BLOCK_D, F32_DOT=_f32_dot(q), num_warps=8 if BLOCK * BLOCK_D > 64 * 64 else 4,
            num_stages=1)  # no loop: nothing to pipeline; warps as in the ptxas notes above
        return dq, dk, dv
    if path != "blocks":
        raise ValueError(f"attention: backward path {path!r}: use 'tile' or 'blocks'")
    delta = _buffer(delta, (B, H, N), torch.float32, q)
    _attn_bwd_dkdv_kernel[(B * H, triton.cdiv(N, N1))](  # also writes delta, which the dQ kernel reads
        q, k, v, o, do, lse, delta, dk, dv, *strides, *o.stride(), *do.stride(), H, N, D, scale * LOG2E, scale,
        BLOCK_M=M1, BLOCK_N=N1, BLOCK_D=BLOCK_D, F32_DOT=_f32_dot(q), num_warps=warps1, num_stages=stages1)
    _attn_bwd_dq_kernel[(B * H, triton.cdiv(N, M2))](
        q, k, v, do, lse, delta, dq, *strides, *do.stride(), H, N, D, scale * LOG2E, scale,
        BLOCK_M=M2, BLOCK_N=N2, BLOCK_D=BLOCK_D, F32_DOT=_f32_dot(q), num_warps=warps2, num_stages=stages2)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    """Saves q, k, v, O and the log-sum-exp (N floats per row), never P."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        o, lse = _attn_forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _attn_backward(q, k, v, o, lse, do, ctx.scale)
        return dq, dk, dv, None


def attention(q, k, v, scale=None):
    """softmax(scale * q k^T) v, non-causal, differentiable.

    q, k, v: (B, H, N, D), float32, float16 or bfloat16, one shape, dtype and device, any strides (e.g. the
    views of a single qkv projection), any N >= 1, D <= 128. scale: a float, default D ** -0.5.
    Returns (B, H, N, D) in the input dtype; accumulation is in fp32. The kernels return a view of a (B, N, H, D)
    tensor, so that the heads' concatenation o.transpose(1, 2).reshape(B, N, H * D) is free. Runs the Triton
    kernels where minivit.kernels.use_triton(q) says so (CUDA, or the interpreter on CPU), otherwise attention_reference.
    """
    _check_inputs(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if not use_triton(q):
        return attention_reference(q, k, v, scale)
    return _FlashAttention.apply(q, k, v, scale)


# ----------------------------------------------------------------------------------------------------------------
# The plain PyTorch version: the ground truth for the tests, and the path on machines without Triton.

def attention_reference(q, k, v, scale=None):
    """softmax(scale * q k^T) v with the (B, H, N, N) scores materialised. q, k, v: (B, H, N, D) -> (B, H, N, D)
    in q's dtype, computed in float32 (float64 for float64 inputs, which the tests use as the exact answer)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    compute = torch.promote_types(q.dtype, torch.float32)
    s = (q.to(compute) @ k.to(compute).transpose(-2, -1)) * scale  # (B, H, N, N)
    return (s.softmax(dim=-1) @ v.to(compute)).to(q.dtype)
