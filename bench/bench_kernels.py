"""Benchmark of the hand-written kernels against what PyTorch offers; prints the table the README quotes.

    python bench/bench_kernels.py                    # GPU: ViT-S sizes in bf16; CPU: reference paths at small sizes
    python bench/bench_kernels.py --quick            # tiny sizes: a smoke test, well under a minute on a CPU
    python bench/bench_kernels.py --out bench.md     # also write the table as markdown

Attention, (B, heads, N, head_dim) of ViT-S (6 heads of 64): ours (minivit.kernels.attention, the row names the backward
path it picked; where that is the one-tile path a second row forces the blocked one, to show the gain), every
F.scaled_dot_product_attention backend (flash, efficient, cuDNN, math; an unavailable one is listed with the
reason) and the naive matmul-softmax-matmul. Non-causal FLOPs: forward 4*B*H*N*N*D (two matmuls of 2*N*N*D);
forward+backward 3.5x that, since the backward counts 2.5x the forward (four matmuls, plus recomputing Q K^T, the
Triton tutorial's convention), the same count for every row.
Patch embedding, B=256 images of 224 px at patch 16 and 8, D = 384 (ViT-S): ours, plain and with CLS + pos_embed
fused, vs conv2d (what nn.Conv2d runs) and unfold + linear. FLOPs: forward 2*M*K*D; forward+backward 2x that,
because, as in training, only the weights want gradients (images do not: no dx).

Memory-bound fused ops (each its own table, ms and effective GB/s against the H200's ~4.3 TB/s copy ceiling; the
bytes are the op's compulsory traffic, the same count for every row, so GB/s compares implementations):
  layernorm  residual add + LayerNorm (minivit.kernels.layernorm) on ViT-S tokens, bf16: ours vs `x + branch` then
             F.layer_norm vs torch.compile of those two ops;
  bias_gelu  fc1 bias + exact GELU (minivit.kernels.bias_gelu) on ViT-S hidden units, bf16: ours vs F.gelu(h + b) vs
             torch.compile of it; and the whole MLP (fc1, bias + GELU, fc2: GEMM-bound, ms only);
  dino_loss  the DINO loss (minivit.kernels.dino_loss), B = 128, 2 + 8 crops, K = 65536, fp32 logits: ours vs DINOLoss's
             PyTorch sum vs torch.compile of it.

GPU times: triton.testing.do_bench, median over ~100 ms of runs after warm-up, L2 flushed between runs.
CPU times: medians of time.perf_counter over a few runs after one warm-up, at sizes scaled down.
"""
import datetime
import platform
import statistics
import time
import warnings
from unittest import mock

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from minivit import cli  # noqa: E402
from minivit.kernels import HAS_TRITON, interpreter_on, triton, use_triton  # noqa: E402
from minivit.kernels import attention as attention_module  # noqa: E402
from minivit.kernels.attention import _backward_path, attention  # noqa: E402
from minivit.kernels.bias_gelu import bias_gelu, bias_gelu_reference, mlp, mlp_reference  # noqa: E402
from minivit.kernels.dino_loss import dino_loss, dino_loss_reference  # noqa: E402
from minivit.kernels.layernorm import add_layer_norm, add_layer_norm_reference  # noqa: E402
from minivit.kernels.patch_embed import patch_embed, patch_embed_tokens  # noqa: E402

ATTENTION_SHAPES = [  # (B, H, N, D) for ViT-S: 6 heads of 64; N = 1 + patches (FACTS: 224 px -> 196+1 at /16)
    (256, 6, 197, 64),  # 224 px images at patch 16
    (64, 6, 785, 64),  # 224 px at patch 8
    (1024, 6, 37, 64),  # DINO's 96 px local crops at patch 16
    (256, 6, 145, 64),  # 96 px local crops at patch 8
]
PATCH_SHAPES = [(256, 3, 224, 16, 384), (256, 3, 224, 8, 384)]  # (B, C, image size, patch_size, embed_dim)
# (rows M, D) of the residual stream: a DINO step's student global crops (2 x 128 images x 197 tokens at /16) and
# local crops (8 x 128 x 37), ViT-S D = 384; the same rows at ViT-B's 768
TOKEN_SHAPES = [(256 * 197, 384), (1024 * 37, 384), (256 * 197, 768)]
DINO_LOSS_SHAPES = [(10, 128, 65536), (10, 32, 65536)]  # (ncrops, B, K): ViT-S/16 at b128, ViT-S/8 at b32
COPY_CEILING = 4.3e12  # bytes/s, device-to-device copy measured on the lent H200 (shared/GPU.md)


def time_ms(fn, device):
    """Median milliseconds of fn()."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up: first-call allocations and library initialisation
    times = []
    while len(times) < 3 or (len(times) < 10 and sum(times) < 0.3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def measure(name, case, forward, inputs, flops_fwd, flops_both, device):
    """One table row: forward alone (no graph) and forward + backward of `forward(*inputs)` for the grad inputs."""
    wanted = [t for t in inputs if t.requires_grad]
    row = dict(case=case, impl=name, note="")
    try:
        with warnings.catch_warnings():  # sdpa explains at length why a backend it was forced to use cannot run
            warnings.simplefilter("ignore")
            dout = torch.randn_like(forward(*inputs))  # also checks that this implementation runs here at all
    except (RuntimeError, torch.OutOfMemoryError) as e:  # "No available kernel", a backend lacking this GPU, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        row["note"] = "unavailable: " + reason[:80]
        return row

    def fwd():
        with torch.no_grad():
            forward(*inputs)

    def fwd_bwd():
        torch.autograd.grad(forward(*inputs), wanted, dout)

    row["fwd"], row["both"] = time_ms(fwd, device), time_ms(fwd_bwd, device)
    row["fwd_tflops"], row["both_tflops"] = flops_fwd / row["fwd"] / 1e9, flops_both / row["both"] / 1e9
    return row


def ours_label(t):
    if not use_triton(t):
        return "ours (reference path)"
    return "ours (Triton interpreter)" if interpreter_on() else "ours (Triton)"


def bench_attention(device, dtype, shrink):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return run

    def naive(q, k, v):
        return ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v

    rows = []
    for B, H, N, D in ATTENTION_SHAPES:
        B = max(1, B // shrink)
        q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        path = _backward_path(N, D, dtype)
        impls = [(ours_label(q) + (f", {path} backward" if use_triton(q) else ""), attention)]
        impls += [(f"sdpa {name}", sdpa(getattr(SDPBackend, backend)))
                  for name, backend in [("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                                        ("cuDNN", "CUDNN_ATTENTION"), ("math", "MATH")]
                  if hasattr(SDPBackend, backend)]
        impls.append(("naive matmul-softmax-matmul", naive))
        flops = 4 * B * H * N * N * D
        case = f"attention B*H={B}*{H} N={N} D={D}"
        rows += [measure(name, case, fn, (q, k, v), flops, 3.5 * flops, device) for name, fn in impls]
        if use_triton(q) and path != "blocks":  # the same kernels with the longer sequences' backward: the gain
            with mock.patch.object(attention_module, "_backward_path", lambda *args: "blocks"):
                rows.insert(len(rows) - len(impls) + 1,
                            measure(ours_label(q) + ", blocks backward", case, attention, (q, k, v), flops,
                                    3.5 * flops, device))
    return rows


def bench_patch_embed(device, dtype, shrink):
    def conv(x, w, b):  # nn.Conv2d(C, D, p, stride=p) and the flatten to tokens the ViT does
        return F.conv2d(x, w, b, stride=w.shape[-1]).flatten(2).transpose(1, 2)

    def conv_tokens(x, w, b, cls, pos):
        return torch.cat([cls.expand(x.shape[0], -1, -1), conv(x, w, b)], dim=1) + pos

    def unfold_linear(x, w, b):
        p = w.shape[-1]
        return F.linear(F.unfold(x, p, stride=p).transpose(1, 2), w.reshape(w.shape[0], -1), b)

    rows = []
    for B, C, S, p, D in PATCH_SHAPES:
        B = max(1, B // shrink)
        x = torch.randn(B, C, S, S, device=device, dtype=dtype)  # images: no gradient, as in training
        w = (torch.randn(D, C, p, p, device=device) * (C * p * p) ** -0.5).to(dtype).requires_grad_()
        b = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
        cls = torch.randn(1, 1, D, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, 1 + (S // p) ** 2, D, device=device, dtype=dtype, requires_grad=True)
        flops = 2 * B * (S // p) ** 2 * (C * p * p) * D
        case = f"patch_embed B={B} {S}px p={p} D={D}"
        plain, tokens = (x, w, b), (x, w, b, cls, pos)
        for name, fn, args in [(ours_label(x), patch_embed, plain),
                               (ours_label(x) + ", fused CLS + pos_embed", patch_embed_tokens, tokens),
                               ("conv2d (nn.Conv2d)", conv, plain),
                               ("conv2d + cat CLS + pos_embed", conv_tokens, tokens),
                               ("unfold + linear", unfold_linear, plain)]:
            rows.append(measure(name, case, fn, args, flops, 2 * flops, device))
    return rows


def measure_bytes(name, case, forward, inputs, bytes_fwd, bytes_both, device):
    """A row of a memory-bound table: like measure(), with effective GB/s instead of TFLOP/s."""
    row = measure(name, case, forward, inputs, 1.0, 1.0, device)
    if not row["note"]:
        row["fwd_gbs"], row["both_gbs"] = bytes_fwd / row["fwd"] / 1e6, bytes_both / row["both"] / 1e6
    return row


def compiled(fn, device):
    """torch.compile of the plain ops (inductor fuses them), or None on a CPU: there it would measure the C++
    compiler of this machine, not a GPU kernel, and take minutes."""
    return torch.compile(fn) if device.type == "cuda" else None


def _rows(case, impls, inputs, bytes_fwd, bytes_both, device):
    rows = []
    for name, fn in impls:
        if fn is None:
            rows.append(dict(case=case, impl=name, note="GPU only"))
        else:
            rows.append(measure_bytes(name, case, fn, inputs, bytes_fwd, bytes_both, device))
    return rows


def bench_layernorm(device, dtype, shrink):
    """s, y = x + branch, LayerNorm(x + branch). Compulsory bytes per value: forward reads x, branch, writes s, y;
    backward reads dy, ds, y, writes dx (the branch gets the same gradient tensor): 4 + 4 values."""
    def plain(x, br, w, b):  # what minivit.vit ran before the kernel: the add, then F.layer_norm in the input dtype
        return add_layer_norm_reference(x, br, w, b, 1e-6)

    def ours(x, br, w, b):
        return add_layer_norm(x, br, w, b, 1e-6)

    def both(fn):  # measure() wants one output: s and y summed, so that both get a gradient
        return None if fn is None else (lambda *a: sum(o.float() for o in fn(*a)))

    rows = []
    for M, D in TOKEN_SHAPES:
        M = max(1, M // shrink)
        x, br = (torch.randn(M, D, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        w = torch.randn(D, device=device, requires_grad=True)
        b = torch.randn(D, device=device, requires_grad=True)
        size = x.element_size() * M * D
        case = f"add + layernorm M={M} D={D}"
        rows += _rows(case, [(ours_label(x), both(ours)), ("x + branch, F.layer_norm", both(plain)),
                             ("torch.compile of those", both(compiled(plain, device)))],
                      (x, br, w, b), 4 * size, 8 * size, device)
    return rows


def bench_bias_gelu(device, dtype, shrink):
    """GELU(h + b) alone (forward reads h, writes a; backward reads h, da, writes dh: 2 + 3 values), then the MLP
    it sits in (fc1 -> bias + GELU -> fc2), which the GEMMs dominate: its GB/s counts the hidden activations only."""
    rows = []
    for M, D in TOKEN_SHAPES[:2]:
        M, Fdim = max(1, M // shrink), 4 * D
        h = torch.randn(M, Fdim, device=device, dtype=dtype, requires_grad=True)
        b = torch.randn(Fdim, device=device, dtype=dtype, requires_grad=True)
        size = h.element_size() * M * Fdim
        rows += _rows(f"bias + gelu M={M} F={Fdim}",
                      [(ours_label(h), bias_gelu), ("F.gelu(h + b)", bias_gelu_reference),
                       ("torch.compile of it", compiled(bias_gelu_reference, device))],
                      (h, b), 2 * size, 5 * size, device)
        x = torch.randn(M, D, device=device, dtype=dtype, requires_grad=True)
        w1 = (torch.randn(Fdim, D, device=device) * D ** -0.5).to(dtype).requires_grad_()
        w2 = (torch.randn(D, Fdim, device=device) * Fdim ** -0.5).to(dtype).requires_grad_()
        b2 = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
        rows += _rows(f"mlp M={M} D={D} F={Fdim}",
                      [(ours_label(x) + ", bias_gelu_linear", mlp), ("Linear, GELU, Linear", mlp_reference),
                       ("torch.compile of those", compiled(mlp_reference, device))],
                      (x, w1, b, w2, b2), 2 * size, 5 * size, device)
    return rows


def bench_dino_loss(device, shrink):
    """DINO's loss: compulsory bytes = one read of the student and teacher logits forward, the same plus the write
    of the student gradient backward (fp32: the head's output dtype)."""
    rows = []
    for ncrops, B, K in DINO_LOSS_SHAPES:
        B = max(1, B // shrink)
        s = torch.randn(ncrops * B, K, device=device, requires_grad=True)
        t = torch.randn(2 * B, K, device=device)
        c = torch.randn(1, K, device=device)
        read = 4 * K * (ncrops + 2) * B
        case = f"dino loss ncrops={ncrops} B={B} K={K}"

        def wrap(fn):
            return None if fn is None else (lambda s, t, c: fn(s, t, c, ncrops, 0.1, 0.04))

        rows += _rows(case, [(ours_label(s), wrap(dino_loss)), ("DINOLoss in PyTorch", wrap(dino_loss_reference)),
                             ("torch.compile of it", wrap(compiled(dino_loss_reference, device)))],
                      (s, t, c), read, 2 * read + 4 * K * ncrops * B, device)
    return rows


def header(device, dtype, quick):
    if device.type == "cuda":
        hardware = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        hardware = f"CPU {platform.processor() or platform.machine()}, threads: {torch.get_num_threads()}"
    lines = [
        "# minivit kernel benchmark",
        f"date {datetime.datetime.now().isoformat(timespec='seconds')}; {hardware}; torch {torch.__version__}; "
        f"triton {triton.__version__ if HAS_TRITON else 'not installed'}; {dtype}",
        "GPU: triton.testing.do_bench median" if device.type == "cuda"
        else "CPU: reference paths, small sizes (batch divided as noted in each case); time.perf_counter medians",
    ]
    if quick:
        lines.append("--quick: tiny sizes, a smoke test, not a measurement")
    if interpreter_on():
        lines.append("TRITON_INTERPRET=1: 'ours' runs in Triton's CPU interpreter, far slower than any real path")
    lines.append("TFLOP/s: attention fwd 4*B*H*N^2*D, fwd+bwd 3.5x; patch_embed fwd 2*M*K*D, fwd+bwd 2x (no dx)")
    lines.append(f"GB/s: compulsory bytes / time (each table's docstring), against the {COPY_CEILING / 1e12:.1f} TB/s "
                 "copy ceiling")
    return lines


def table(rows):
    out = ["| case | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | note |",
           "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["note"]:
            out.append(f"| {r['case']} | {r['impl']} | - | - | - | - | {r['note']} |")
        else:
            out.append(f"| {r['case']} | {r['impl']} | {r['fwd']:.3g} | {r['fwd_tflops']:.3g} | {r['both']:.3g} | "
                       f"{r['both_tflops']:.3g} | |")
    return out


def bytes_table(rows):
    out = ["| case | implementation | fwd ms | fwd GB/s | fwd+bwd ms | fwd+bwd GB/s | % of copy ceiling | note |",
           "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["note"]:
            out.append(f"| {r['case']} | {r['impl']} | - | - | - | - | - | {r['note']} |")
        else:
            out.append(f"| {r['case']} | {r['impl']} | {r['fwd']:.3g} | {r['fwd_gbs']:.4g} | {r['both']:.3g} | "
                       f"{r['both_gbs']:.4g} | {100 * r['both_gbs'] * 1e9 / COPY_CEILING:.0f}% | |")
    return out


FLOP_SECTIONS = {"attention": bench_attention, "patch_embed": bench_patch_embed}
BYTE_SECTIONS = {"layernorm": bench_layernorm, "bias_gelu": bench_bias_gelu,
                 "dino_loss": lambda device, dtype, shrink: bench_dino_loss(device, shrink)}


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every path runs (seconds)")
    parser.add_argument("--out", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--only", choices=[*FLOP_SECTIONS, *BYTE_SECTIONS], default=None, help="run one benchmark")
    args = parser.parse_args(argv)
    cli.check_output_file(args.out, "--out")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on a CPU measures nothing useful
    # batch divisor: the GPU runs the real sizes; a CPU (and --quick) a small slice of them
    shrink = (1 if device.type == "cuda" else 64) * (256 if args.quick else 1)
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # a smoke test: on a busy machine, threads waiting for each other cost the most
    lines = header(device, dtype, args.quick)
    for line in lines:
        print(line, flush=True)
    for name, bench in {**FLOP_SECTIONS, **BYTE_SECTIONS}.items():
        if args.only in (None, name):
            rows = bench(device, dtype, shrink)
            section = table(rows) if name in FLOP_SECTIONS else bytes_table(rows)
            lines += ["", f"## {name}", ""] + section
            print("\n".join(["", f"## {name}", ""] + section), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
