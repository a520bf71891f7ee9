"""Benchmark of the hand-written kernels against what PyTorch offers; prints the table the README quotes.

    python -m kernels.bench                    # GPU: ViT-S sizes in bf16; CPU: reference paths at small sizes
    python -m kernels.bench --quick            # tiny sizes: a smoke test, well under a minute on a CPU
    python -m kernels.bench --out bench.md     # also write the table as markdown

Attention, (B, heads, N, head_dim) of ViT-S (6 heads of 64): ours (kernels.attention), every
F.scaled_dot_product_attention backend (flash, efficient, cuDNN, math; an unavailable one is listed with the
reason) and the naive matmul-softmax-matmul. Non-causal FLOPs: forward 4*B*H*N*N*D (two matmuls of 2*N*N*D);
forward+backward 3.5x that, since the backward counts 2.5x the forward (four matmuls, plus recomputing Q K^T, the
Triton tutorial's convention), the same count for every row.
Patch embedding, B=256 images of 224 px at patch 16 and 8, D = 384 (ViT-S): ours, plain and with CLS + pos_embed
fused, vs conv2d (what nn.Conv2d runs) and unfold + linear. FLOPs: forward 2*M*K*D; forward+backward 2x that,
because, as in training, only the weights want gradients (images do not: no dx).

GPU times: triton.testing.do_bench, median over ~100 ms of runs after warm-up, L2 flushed between runs.
CPU times: medians of time.perf_counter over a few runs after one warm-up, at sizes scaled down.
"""
import argparse
import datetime
import platform
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from kernels import HAS_TRITON, interpreter_on, triton, use_triton
from kernels.attention import attention
from kernels.patch_embed import patch_embed, patch_embed_tokens

ATTENTION_SHAPES = [  # (B, H, N, D) for ViT-S: 6 heads of 64; N = 1 + patches (FACTS: 224 px -> 196+1 at /16)
    (256, 6, 197, 64),  # 224 px images at patch 16
    (64, 6, 785, 64),  # 224 px at patch 8
    (1024, 6, 37, 64),  # DINO's 96 px local crops at patch 16
    (256, 6, 145, 64),  # 96 px local crops at patch 8
]
PATCH_SHAPES = [(256, 3, 224, 16, 384), (256, 3, 224, 8, 384)]  # (B, C, image size, patch_size, embed_dim)


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
        impls = [(ours_label(q), attention)]
        impls += [(f"sdpa {name}", sdpa(getattr(SDPBackend, backend)))
                  for name, backend in [("flash", "FLASH_ATTENTION"), ("efficient", "EFFICIENT_ATTENTION"),
                                        ("cuDNN", "CUDNN_ATTENTION"), ("math", "MATH")]
                  if hasattr(SDPBackend, backend)]
        impls.append(("naive matmul-softmax-matmul", naive))
        flops = 4 * B * H * N * N * D
        case = f"attention B*H={B}*{H} N={N} D={D}"
        rows += [measure(name, case, fn, (q, k, v), flops, 3.5 * flops, device) for name, fn in impls]
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that every path runs (seconds)")
    parser.add_argument("--out", default=None, help="also write the table as markdown to this file")
    parser.add_argument("--only", choices=["attention", "patch_embed"], default=None, help="run one benchmark")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # bf16 on a CPU measures nothing useful
    # batch divisor: the GPU runs the real sizes; a CPU (and --quick) a small slice of them
    shrink = (1 if device.type == "cuda" else 64) * (256 if args.quick else 1)
    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # a smoke test: on a busy machine, threads waiting for each other cost the most
    lines = header(device, dtype, args.quick)
    for line in lines:
        print(line, flush=True)
    rows = []
    if args.only in (None, "attention"):
        rows += bench_attention(device, dtype, shrink)
    if args.only in (None, "patch_embed"):
        rows += bench_patch_embed(device, dtype, shrink)
    lines += [""] + table(rows)
    print("\n".join(table(rows)))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
