"""Fused (flash) attention. PLACEHOLDER: the Triton kernels are being written (issue 2); the reference runs."""
import torch


def attention_reference(q, k, v, scale=None):
    """softmax(q k^T * scale) v in plain PyTorch. q, k, v: (B, H, N, D) -> (B, H, N, D), dtype of q."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = (q.float() @ k.float().transpose(-2, -1)) * scale  # (B, H, N, N)
    return (s.softmax(dim=-1) @ v.float()).to(q.dtype)


def attention(q, k, v, scale=None):
    """Non-causal multi-head attention. q, k, v: (B, H, N, D) -> (B, H, N, D)."""
    return attention_reference(q, k, v, scale)
