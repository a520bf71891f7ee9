"""Sweep the tiles of minivit/kernels/attention.py on a GPU and print the fastest per kernel and shape (bf16, ViT-S heads).

    python3 bench/tune_attention.py            # ~2 min on an H200 (most of it compiling); prints a markdown table

How `_tiles` in minivit/kernels/attention.py was chosen. Each kernel is swept on its own: the forward; then the dK/dV
kernel with the dQ kernel at its current tiles; then the dQ kernel with the dK/dV kernel at its current tiles (the
blocked backward is timed whole, forced also where N is short enough for the one-tile path, whose only knob is its
warps; so differences between rows are the swept kernel's). q, k, v are views of one qkv tensor,
as in the ViT; times are triton.testing.do_bench medians.
"""
import itertools
import os
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from minivit.kernels import attention as attn  # noqa: E402
from bench_kernels import ATTENTION_SHAPES  # noqa: E402

_TILES = attn._tiles  # the tile choice the sweep patches over and restores after each kernel

# (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates, all powers of two >= 16 (tl.dot's smallest tile)
SWEEP = {
    "fwd": list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3))),
    "dkdv": list(itertools.product((32, 64), (64, 128), (4, 8), (2, 3))),
    "dq": list(itertools.product((64, 128), (32, 64), (4, 8), (2, 3))),
}


def main():
    dtype = torch.bfloat16
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16\n")
    print("| kernel | (B, H, N, D) | current ms | best ms | best (BLOCK_M, BLOCK_N, warps, stages) | top 3 |")
    print("|---|---|---:|---:|---|---|")
    for B, H, N, D in ATTENTION_SHAPES:
        default = _TILES(D, dtype, N)  # BLOCK_D, fwd, dkdv, dq: what minivit/kernels/attention.py runs now
        qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        do = torch.randn(B, H, N, D, device="cuda", dtype=dtype)
        scale = D ** -0.5
        o, lse = attn._attn_forward(q, k, v, scale)
        for kernel, configs in SWEEP.items():
            times = {}
            for cfg in configs:
                tiles = list(default)
                tiles[{"fwd": 1, "dkdv": 2, "dq": 3}[kernel]] = cfg
                attn._tiles = lambda D_, dtype_, N_, tiles=tuple(tiles): tiles  # noqa: E731
                if kernel == "fwd":
                    fn = lambda: attn._attn_forward(q, k, v, scale)  # noqa: E731
                else:
                    fn = lambda: attn._attn_backward(q, k, v, o, lse, do, scale, path="blocks")  # noqa: E731
                try:
                    times[cfg] = do_bench(fn, warmup=10, rep=40, return_mode="median")
                except Exception as error:  # noqa: BLE001 -- out of shared memory, say: not a candidate
                    print(f"<!-- {kernel} {cfg}: {type(error).__name__} -->")
            attn._tiles = _TILES
            current = default[{"fwd": 1, "dkdv": 2, "dq": 3}[kernel]]
            ranked = sorted(times, key=times.get)
            top = ", ".join(f"{c} {times[c]:.3f}" for c in ranked[:3])
            print(f"| {kernel} | {(B, H, N, D)} | {times.get(current, float('nan')):.3f} | {times[ranked[0]]:.3f} "
                  f"| {ranked[0]} | {top} |", flush=True)


if __name__ == "__main__":
    main()
