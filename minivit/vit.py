"""The Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words"), as DINO uses it.

An image (B, C, H, W) is cut into N = (H/p)(W/p) patches of p x p pixels; each patch is flattened and projected
to D dimensions; a learned [class] token is prepended and a learned position embedding added (ViT eq. 1):

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos                  (B, 1+N, D)
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                                (eq. 2, pre-norm residual)
    z_l  = MLP(LN(z'_l)) + z'_l                                      (eq. 3)
    y    = LN(z_L^0)                                                 (eq. 4: the final-norm CLS token)

y is the image feature (what DINO's k-NN and linear probes read); an optional linear `head` maps it to logits.
Parameter names and shapes are exactly those of the official DINO / timm code, so their checkpoints load strictly.
Hand-written Triton kernels (minivit/kernels/) run the patch projection, the fused attention, LayerNorm with the
residual add before it, and fc1's bias with GELU.
"""
import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from minivit.kernels.attention import attention
from minivit.kernels.bias_gelu import mlp
from minivit.kernels.layernorm import add_layer_norm, layer_norm
from minivit.kernels.patch_embed import patch_embed, patch_embed_tokens

LN_EPS = 1e-6  # LayerNorm epsilon of the official ViT/DINO code (PyTorch's default is 1e-5)


@dataclass
class ViTConfig:
    """Hyper-parameters of a ViT; the defaults are ViT-B/16 (ViT paper, Table 1)."""
    img_size: int = 224  # training resolution: sets the position table's grid (ViT sec. 4.1, DINO global crops)
    patch_size: int = 16  # p: "/16" in ViT-B/16; DINO also trains p = 8 (4x the tokens, better features)
    in_chans: int = 3  # RGB
    num_classes: int = 0  # 0 -> no head, forward returns the CLS feature (DINO backbones have no head)
    embed_dim: int = 768  # D, ViT-Base (ViT Table 1)
    depth: int = 12  # L, number of blocks (ViT Table 1)
    num_heads: int = 12  # heads of MSA; head_dim = D / heads = 64 for ViT-S/B (ViT Table 1)
    mlp_ratio: float = 4.0  # MLP hidden size = 4 D for every ViT size (ViT Table 1: 3072 for D = 768)
    qkv_bias: bool = True  # the official ViT and DINO code use a bias in the q, k, v projection
    drop_path_rate: float = 0.0  # stochastic depth of the last block; DINO's student uses 0.1 (main_dino.py)

    def __post_init__(self):
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}: "
                             "pick num_heads dividing embed_dim")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} is not a multiple of patch_size={self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate={self.drop_path_rate} must be in [0, 1)")


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (Ba et al. 2016) that runs in its input's dtype, also under autocast, on one Triton kernel
    (minivit/kernels/layernorm.py). Autocast would copy a bf16 input to fp32 first and keep that copy for the backward;
    the kernel computes the mean and variance in fp32 whatever the input, so the copy buys nothing: without it a
    LayerNorm moves a third of the bytes. The kernel keeps only its output (which the next Linear keeps anyway) and
    one fp32 per row. The parameters stay fp32 (names and shapes as nn.LayerNorm's)."""

    def forward(self, x):
        """x (..., D) -> (..., D), x's dtype."""
        return layer_norm(x, self.weight, self.bias, self.eps)

    def add_norm(self, x, branch):
        """The residual add and this norm in one pass: x, branch (..., D) -> (x + branch, norm(x + branch))."""
        return add_layer_norm(x, branch, self.weight, self.bias, self.eps)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): in training, drop a residual branch for a whole sample with
    probability `drop_prob` and scale the survivors by 1 / (1 - drop_prob) so the expectation is unchanged."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        """x (B, ...) -> (B, ...), same dtype; the identity in eval mode or when drop_prob == 0."""
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)  # (B, 1, ..., 1)
        return x * mask / keep_prob

    def extra_repr(self):
        return f"drop_prob={self.drop_prob:.3f}"


class PatchEmbed(nn.Module):
    """Split the image into p x p patches and project each to D dims (ViT eq. 1, the matrix E).

    `proj` stays an nn.Conv2d (stride = kernel = p) so that names and shapes match the official checkpoints,
    but the forward runs one fused GEMM kernel (minivit/kernels/patch_embed.py) on its weight and bias."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        """x (B, C, H, W) -> tokens (B, N, D), N = (H/p)(W/p) in row-major (raster) order."""
        return patch_embed(x, self.proj.weight, self.proj.bias)


class Attention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017; ViT appendix A): softmax(q k^T / sqrt(Dh)) v per head."""

    def __init__(self, dim, num_heads=8, qkv_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5  # 1/sqrt(Dh) keeps the logits at unit variance
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)  # rows q | k | v, each head-major (official layout)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x):
        """x (B, N, D) -> q, k, v, each a strided view (B, H, N, Dh) of the one qkv GEMM output (no copy)."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, H, Dh)
        qkv = qkv.permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        return qkv.unbind(0)  # one backward copy for the three views; qkv[0], qkv[1], qkv[2] would zero-fill three

    def forward(self, x):
        """x (B, N, D) -> (B, N, D). The fused kernel never builds the (N, N) attention matrix."""
        B, N, D = x.shape
        q, k, v = self._qkv(x)
        x = attention(q, k, v, self.scale)  # (B, H, N, Dh)
        x = x.transpose(1, 2).reshape(B, N, D)  # (B, N, H * Dh): concatenate the heads
        return self.proj(x)

    def attention_map(self, x):
        """x (B, N, D) -> softmax attention (B, H, N, N), rows sum to 1, in plain PyTorch (for visualisation)."""
        q, k, v = self._qkv(x)
        return ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, H, N, N)


class MLP(nn.Module):
    """Two-layer MLP with exact (erf) GELU (ViT eq. 3): fc2(GELU(fc1(x))), hidden = mlp_ratio * D. fc1's bias and
    GELU run as one kernel (minivit/kernels/bias_gelu.py) whose backward recomputes GELU instead of keeping its
    output."""

    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x):
        """x (B, N, D) -> (B, N, D)."""
        return mlp(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)


class Block(nn.Module):
    """One pre-norm Transformer block (ViT eqs. 2-3), each residual branch under stochastic depth."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, drop_path=0.0):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNorm(dim, eps=LN_EPS)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x):
        """x (B, N, D) -> (B, N, D)."""
        h = self.norm1(x)
        x, h = self.norm2.add_norm(x, self.drop_path(self.attn(h)))  # x + attention branch, and norm2 of it
        return x + self.drop_path(self.mlp(h))


class VisionTransformer(nn.Module):
    """ViT backbone (+ optional linear head). Accepts any H, W that are multiples of patch_size: the position
    table is interpolated to the input's grid (DINO runs 224 px global and 96 px local crops through one model)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.0):
        super().__init__()
        self.config = ViTConfig(  # validates the arguments; asdict(model.config) rebuilds the model
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop_path_rate=drop_path_rate)
        self.embed_dim = self.num_features = embed_dim
        self.patch_size, self.num_heads = patch_size, num_heads

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # x_class (ViT eq. 1)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))  # E_pos
        # stochastic depth grows linearly from 0 at the first block to drop_path_rate at the last (official code)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, dpr[i]) for i in range(depth))
        self.norm = LayerNorm(embed_dim, eps=LN_EPS)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()

        # initialisation of the official DINO code (the patch Conv2d keeps PyTorch's default there too)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def interpolate_pos_encoding(self, H, W):
        """Position table for an H x W input -> (1, 1 + (H/p)(W/p), D).

        Returns `self.pos_embed` itself at the native grid; otherwise resizes the patch part bicubically (as the
        official DINO code does) and keeps the CLS position as it is."""
        rows, cols = H // self.patch_size, W // self.patch_size
        grid = int(math.sqrt(self.pos_embed.shape[1] - 1))  # native grid side, img_size / p
        if (rows, cols) == (grid, grid):
            return self.pos_embed
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]  # (1, 1, D), (1, grid^2, D)
        D = patch_pos.shape[-1]
        patch_pos = patch_pos.reshape(1, grid, grid, D).permute(0, 3, 1, 2)  # (1, D, grid, grid)
        # +0.1: floor(grid * (rows / grid)) can round down to rows - 1 in floating point (official DINO trick)
        patch_pos = F.interpolate(patch_pos, scale_factor=((rows + 0.1) / grid, (cols + 0.1) / grid),
                                  mode="bicubic")  # (1, D, rows, cols)
        if patch_pos.shape[-2:] != (rows, cols):
            raise RuntimeError(f"pos_embed interpolated to {tuple(patch_pos.shape[-2:])}, expected {(rows, cols)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, D)  # (1, rows * cols, D), raster order
        return torch.cat((cls_pos, patch_pos), dim=1)

    def prepare_tokens(self, x):
        """Images (B, C, H, W) -> z_0 (B, 1 + N, D): patch tokens, CLS token prepended, positions added (eq. 1)."""
        H, W = x.shape[-2:]
        if H % self.patch_size or W % self.patch_size:
            raise ValueError(f"image size {H}x{W} is not a multiple of patch_size={self.patch_size}: "
                             "resize or crop the input")
        # One kernel does it all: the patch GEMM, then CLS row and positions added in its epilogue, written once.
        # Plain PyTorch: cat((cls_token, patch_embed(x)), 1) + pos_embed, which reads and writes the tokens twice more.
        proj = self.patch_embed.proj
        return patch_embed_tokens(x, proj.weight, proj.bias, self.cls_token, self.interpolate_pos_encoding(H, W))

    def forward(self, x):
        """x (B, C, H, W) float -> logits (B, num_classes), or the final-norm CLS feature (B, D) when
        num_classes == 0 (ViT eq. 4)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)
        return self.head(x[:, 0])

    @torch.no_grad()
    def get_last_selfattention(self, x):
        """x (B, C, H, W) -> the last block's softmax attention (B, heads, 1 + N, 1 + N); row 0 is the CLS
        query, whose weights over the patches are DINO's attention maps (DINO fig. 1)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        last = self.blocks[-1]
        return last.attn.attention_map(last.norm1(x))

    @torch.no_grad()
    def get_intermediate_layers(self, x, n=1):
        """x (B, C, H, W) -> list of the last n blocks' outputs, each (B, 1 + N, D) after the final `norm`
        (official semantics; DINO's linear probe concatenates the CLS tokens of the last 4 for ViT-S)."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n={n}: ask for between 1 and depth={len(self.blocks)} layers")
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                outputs.append(self.norm(x))
        return outputs


# Presets (ViT Table 1; ViT-Ti and ViT-S from DeiT, Touvron et al. 2021), as factories like the official code:
# vit_small(patch_size=8, drop_path_rate=0.1) is DINO's ViT-S/8 student.

def vit_tiny(patch_size=16, **kwargs):
    """ViT-Ti: D 192, 12 blocks, 3 heads (5.5M parameters at /16)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4, **kwargs)


def vit_small(patch_size=16, **kwargs):
    """ViT-S: D 384, 12 blocks, 6 heads (21.7M parameters at /16)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4, **kwargs)


def vit_base(patch_size=16, **kwargs):
    """ViT-B: D 768, 12 blocks, 12 heads (85.8M parameters at /16)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4, **kwargs)


def vit_large(patch_size=16, **kwargs):
    """ViT-L: D 1024, 24 blocks, 16 heads (303M parameters at /16)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4, **kwargs)


def vit_huge(patch_size=16, **kwargs):
    """ViT-H: D 1280, 32 blocks, 16 heads (head_dim 80; 632M parameters at /14)."""
    return VisionTransformer(patch_size=patch_size, embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4, **kwargs)


# arch name -> factory; "/16" in ViT-S/16 is the patch size (ViT Table 1, DINO Table 2). models.ARCHS adds the ResNets.
ARCHS = {
    "vit_ti16": partial(vit_tiny, patch_size=16),
    "vit_s16": partial(vit_small, patch_size=16),
    "vit_s8": partial(vit_small, patch_size=8),
    "vit_b16": partial(vit_base, patch_size=16),
    "vit_b8": partial(vit_base, patch_size=8),
    "vit_l16": partial(vit_large, patch_size=16),
    "vit_h14": partial(vit_huge, patch_size=14),
}
