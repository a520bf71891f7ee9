"""Tests of minivit/vit.py: sizes and names of the official models, and an independent functional ViT (the
paper's equations applied to a state_dict) that the model must match, which is what shows that an official DINO
checkpoint, loaded under these names, gives the official outputs."""
import math

import pytest
import torch

from minivit.vit import (DropPath, LayerNorm, VisionTransformer, ViTConfig, vit_base, vit_huge, vit_large, vit_small,
                         vit_tiny)

pytestmark = pytest.mark.usefixtures("reference_kernels")  # whole models: plain PyTorch path (see conftest)


def tiny_vit(**kwargs):
    """A ViT small enough for CPU tests: D 48, 2 blocks, 3 heads (Dh 16), patch 8, 32 px (16 patches)."""
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3)
    cfg.update(kwargs)
    return VisionTransformer(**cfg)


def randomize_(model, seed=0):
    """Fill every parameter with random values so that zero biases or unit LayerNorms cannot hide a mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- an independent ViT, straight from the paper

def layer_norm(x, weight, bias, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def functional_vit(sd, x, patch_size, num_heads):
    """ViT eqs. 1-4 in float64 from a state_dict with the official names; no code shared with minivit.
    Returns (output (B, D) or logits, last block's attention (B, heads, 1+N, 1+N), block outputs [(B, 1+N, D)])."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    B, C, H, W = x.shape
    p = patch_size
    D = sd["cls_token"].shape[-1]
    Dh = D // num_heads
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    # eq. 1: flatten each patch as (C, p, p), patches in raster order, project with E, prepend x_class, add E_pos
    patches = x.unfold(2, p, p).unfold(3, p, p)  # (B, C, H/p, W/p, p, p)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, (H // p) * (W // p), C * p * p)
    E = sd["patch_embed.proj.weight"].reshape(D, C * p * p)
    z = patches @ E.T + sd["patch_embed.proj.bias"]
    z = torch.cat([sd["cls_token"].expand(B, 1, D), z], dim=1) + sd["pos_embed"]
    outputs = []
    for i in range(depth):
        w = {k[len(f"blocks.{i}."):]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        # eq. 2: multi-head self-attention; qkv rows are q | k | v, each split into heads of Dh rows
        h = layer_norm(z, w["norm1.weight"], w["norm1.bias"])
        qkv = h @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]  # (B, 1+N, 3D)
        heads, attn = [], []
        for j in range(num_heads):
            q, k, v = (qkv[..., part * D + j * Dh: part * D + (j + 1) * Dh] for part in range(3))
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(Dh), dim=-1)  # (B, 1+N, 1+N)
            attn.append(a)
            heads.append(a @ v)
        z = z + torch.cat(heads, dim=-1) @ w["attn.proj.weight"].T + w["attn.proj.bias"]
        # eq. 3: MLP with the exact GELU, x * Phi(x)
        h = layer_norm(z, w["norm2.weight"], w["norm2.bias"])
        h = h @ w["mlp.fc1.weight"].T + w["mlp.fc1.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        z = z + h @ w["mlp.fc2.weight"].T + w["mlp.fc2.bias"]
        outputs.append(z)
    y = layer_norm(z[:, 0], sd["norm.weight"], sd["norm.bias"])  # eq. 4
    if "head.weight" in sd:
        y = y @ sd["head.weight"].T + sd["head.bias"]
    return y, torch.stack(attn, dim=1), outputs


def test_matches_functional_vit_from_state_dict():
    model = randomize_(tiny_vit(num_classes=5)).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref, ref_attn, _ = functional_vit(model.state_dict(), x, patch_size=8, num_heads=3)
    torch.testing.assert_close(model(x).double(), ref, atol=1e-4, rtol=1e-4)
    attn = model.get_last_selfattention(x)
    torch.testing.assert_close(attn.double(), ref_attn, atol=1e-5, rtol=1e-4)


def test_features_without_head_match_functional_vit():
    model = randomize_(tiny_vit(), seed=3).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ref, _, _ = functional_vit(model.state_dict(), x, patch_size=8, num_heads=3)
    out = model(x)
    assert out.shape == (2, 48) and isinstance(model.head, torch.nn.Identity)
    torch.testing.assert_close(out.double(), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- sizes, names and shapes of the official models

@pytest.mark.parametrize("factory, patch_size, expected", [
    (vit_small, 16, 21_665_664), (vit_small, 8, 21_670_272), (vit_base, 16, 85_798_656), (vit_base, 8, 85_807_872)])
def test_parameter_counts_exact(factory, patch_size, expected):
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        assert num_params(factory(patch_size)) == expected


def test_parameter_counts_approximate():
    with torch.device("meta"):
        assert round(num_params(vit_tiny()) / 1e6, 2) == 5.52
        assert round(num_params(vit_large()) / 1e6) == 303
        # ViT paper Table 1's 632M for ViT-H includes a 1000-class head; the backbone alone is 630.8M
        assert round(num_params(vit_huge(14, num_classes=1000)) / 1e6) == 632
        assert round(num_params(vit_huge(14)) / 1e6, 1) == 630.8


@pytest.mark.parametrize("factory, D, depth, heads", [
    (vit_tiny, 192, 12, 3), (vit_small, 384, 12, 6), (vit_base, 768, 12, 12), (vit_large, 1024, 24, 16),
    (vit_huge, 1280, 32, 16)])
def test_presets(factory, D, depth, heads):
    with torch.device("meta"):
        m = factory(patch_size=14)
    assert (m.embed_dim, m.num_features, len(m.blocks), m.num_heads, m.patch_size) == (D, D, depth, heads, 14)
    assert m.blocks[0].mlp.fc1.out_features == 4 * D  # mlp_ratio 4 for every size (ViT Table 1)
    assert m.blocks[0].attn.head_dim == D // heads and m.blocks[0].attn.scale == (D // heads) ** -0.5


def test_config_defaults_are_vit_b16():
    cfg = ViTConfig()
    assert (cfg.img_size, cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.num_heads) == (224, 16, 768, 12, 12)
    assert (cfg.mlp_ratio, cfg.qkv_bias, cfg.num_classes, cfg.drop_path_rate) == (4.0, True, 0, 0.0)
    m = tiny_vit(num_classes=3)
    assert m.config == ViTConfig(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=3)
    for ln in [m.blocks[0].norm1, m.blocks[1].norm2, m.norm]:
        assert ln.eps == 1e-6  # official ViT/DINO, not PyTorch's 1e-5
    # exact erf GELU: pinned numerically by the functional ViT tests (x * Phi(x)) and tests/test_bias_gelu.py


def official_vit_s16_keys(depth=12, D=384):
    keys = [("cls_token", (1, 1, D)), ("pos_embed", (1, 197, D)),
            ("patch_embed.proj.weight", (D, 3, 16, 16)), ("patch_embed.proj.bias", (D,))]
    for i in range(depth):
        for name, shape in [("norm1", (D,)), ("attn.qkv", (3 * D, D)), ("attn.proj", (D, D)), ("norm2", (D,)),
                            ("mlp.fc1", (4 * D, D)), ("mlp.fc2", (D, 4 * D))]:
            keys += [(f"blocks.{i}.{name}.weight", shape), (f"blocks.{i}.{name}.bias", (shape[0],))]
    return keys + [("norm.weight", (D,)), ("norm.bias", (D,))]


def test_state_dict_has_official_names_and_shapes():
    with torch.device("meta"):
        sd = vit_small().state_dict()
        sd_head = vit_small(num_classes=1000).state_dict()
    expected = official_vit_s16_keys()
    assert len(expected) == 150
    assert [(k, tuple(v.shape)) for k, v in sd.items()] == expected
    assert [(k, tuple(v.shape)) for k, v in sd_head.items()] == expected + [
        ("head.weight", (1000, 384)), ("head.bias", (1000,))]


def test_state_dict_strict_round_trip():
    a = randomize_(tiny_vit(num_classes=4), seed=5).eval()
    b = tiny_vit(num_classes=4).eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))
    with pytest.raises(RuntimeError, match="Missing key"):
        tiny_vit(num_classes=4).load_state_dict({k: v for k, v in a.state_dict().items() if k != "norm.bias"})


@pytest.mark.parametrize("patch_size, img, tokens", [(16, 224, 197), (8, 224, 785), (16, 96, 37), (8, 96, 145)])
def test_token_counts(patch_size, img, tokens):
    model = VisionTransformer(img_size=224, patch_size=patch_size, embed_dim=16, depth=1, num_heads=2).eval()
    (out,) = model.get_intermediate_layers(torch.randn(1, 3, img, img))
    assert out.shape == (1, tokens, 16)


def test_output_shapes_and_gradients():
    model = tiny_vit(num_classes=7)
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    logits = model(x)
    assert logits.shape == (3, 7) and logits.dtype == torch.float32
    logits.sum().backward()
    assert x.grad.shape == x.shape
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="num_heads"):
        VisionTransformer(embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="patch_size"):
        VisionTransformer(img_size=225)
    with pytest.raises(ValueError, match="drop_path_rate"):
        tiny_vit(drop_path_rate=1.0)
    model = tiny_vit()
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model(torch.randn(1, 3, 32, 36))
    with pytest.raises(ValueError, match="n=3"):
        model.get_intermediate_layers(torch.randn(1, 3, 32, 32), n=3)
    with pytest.raises(ValueError, match="n=0"):
        model.get_intermediate_layers(torch.randn(1, 3, 32, 32), n=0)


def test_weight_init_as_official():
    torch.manual_seed(0)
    model = VisionTransformer(img_size=224, patch_size=16, embed_dim=64, depth=2, num_heads=2, num_classes=10)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 4 + 1
    for m in linears:
        assert m.bias.abs().max() == 0
        assert abs(m.weight.std().item() - 0.02) < 0.002
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.equal(m.weight, torch.ones_like(m.weight)) and m.bias.abs().max() == 0
    assert abs(model.pos_embed.std().item() - 0.02) < 0.001 and model.cls_token.abs().max() > 0


# ---------------------------------------------------------------- position embedding at other resolutions

def test_pos_embed_identity_at_native_grid():
    model = tiny_vit()
    assert model.interpolate_pos_encoding(32, 32) is model.pos_embed


def test_pos_embed_interpolation_shapes_orientation_and_cls():
    for img_size, targets in [(224, [1, 3, 6, 7, 15, 20, 28, 61]), (176, [2, 5, 15, 30, 49])]:
        # 14 -> 61 and 11 -> 15, 30, 49 are grids where floor(grid * (rows / grid)) rounds down to rows - 1
        # in floating point: the official +0.1 keeps every size exact
        model = VisionTransformer(img_size=img_size, patch_size=16, embed_dim=4, depth=1, num_heads=2)
        for rows in targets:
            for cols in targets[:3]:
                table = model.interpolate_pos_encoding(16 * rows, 16 * cols)
                assert table.shape == (1, 1 + rows * cols, 4), (img_size, rows, cols)
                assert torch.equal(table[:, 0], model.pos_embed[:, 0])  # the CLS position is kept
    grid = 14
    with torch.no_grad():  # a table that varies along the image rows only must stay so (no H/W transposition)
        r = torch.arange(grid, dtype=torch.float32).repeat_interleave(grid)  # row index of each patch
        model = VisionTransformer(img_size=224, patch_size=16, embed_dim=8, depth=1, num_heads=2)
        model.pos_embed[0, 1:] = r[:, None] * torch.arange(1, 9)
    table = model.interpolate_pos_encoding(16 * 4, 16 * 6)[0, 1:].reshape(4, 6, 8)  # (rows, cols, D)
    torch.testing.assert_close(table, table[:, :1].expand(4, 6, 8))
    assert (table[1:, 0] > table[:-1, 0]).all()  # still increasing down the rows


def cubic_resize(v, out, scale):
    """Resize v (n, ...) along dim 0 to `out` samples by Keys' cubic convolution (a = -0.75, half-pixel centres,
    edge samples repeated), sampling position i at (i + 0.5) * scale - 0.5: what the official bicubic call does
    with scale = grid / (out + 0.1)."""
    a, n = -0.75, v.shape[0]

    def kernel(t):
        t = abs(t)
        return ((a + 2) * t - (a + 3)) * t * t + 1 if t <= 1 else ((a * t - 5 * a) * t + 8 * a) * t - 4 * a

    rows = []
    for i in range(out):
        src = (i + 0.5) * scale - 0.5
        base = math.floor(src)
        rows.append(sum(kernel(src - j) * v[min(max(j, 0), n - 1)] for j in range(base - 1, base + 3)))
    return torch.stack(rows)


@pytest.mark.parametrize("rows, cols", [(6, 6), (3, 5), (20, 9)])
def test_pos_embed_interpolation_is_official_bicubic(rows, cols):
    grid, D = 7, 3
    model = VisionTransformer(img_size=grid * 16, patch_size=16, embed_dim=D, depth=1, num_heads=1)
    table = model.pos_embed[0, 1:].detach().double().reshape(grid, grid, D)  # (rows, cols, D)
    expected = cubic_resize(table, rows, grid / (rows + 0.1))  # along the rows, then along the columns
    expected = cubic_resize(expected.transpose(0, 1), cols, grid / (cols + 0.1)).transpose(0, 1)
    got = model.interpolate_pos_encoding(16 * rows, 16 * cols)[0, 1:].reshape(rows, cols, D)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-5)


def test_forward_at_96_px_and_non_square():
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=32, depth=2, num_heads=2).eval()  # grid 2x2
    x = torch.randn(2, 3, 64, 96)
    assert model(x).shape == (2, 32)
    assert model.get_intermediate_layers(x)[0].shape == (2, 1 + 4 * 6, 32)
    assert model.get_last_selfattention(x).shape == (2, 2, 25, 25)
    assert model(torch.randn(1, 3, 96, 96)).shape == (1, 32)


def test_non_square_matches_functional_vit_with_interpolated_table():
    model = randomize_(tiny_vit(), seed=7).eval()
    x = torch.randn(2, 3, 48, 24)
    sd = dict(model.state_dict(), pos_embed=model.interpolate_pos_encoding(48, 24).detach())
    ref, _, _ = functional_vit(sd, x, patch_size=8, num_heads=3)
    torch.testing.assert_close(model(x).double(), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- attention maps and intermediate layers

def test_last_selfattention_rows_sum_to_one():
    model = randomize_(tiny_vit(), seed=2).eval()
    attn = model.get_last_selfattention(torch.randn(2, 3, 40, 32))
    assert attn.shape == (2, 3, 1 + 5 * 4, 1 + 5 * 4)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 21))
    assert (attn >= 0).all()


def test_intermediate_layers_are_normed_block_outputs():
    model = randomize_(tiny_vit(depth=3), seed=4).eval()
    x = torch.randn(2, 3, 32, 32)
    sd = model.state_dict()
    _, _, blocks = functional_vit(sd, x, patch_size=8, num_heads=3)
    outs = model.get_intermediate_layers(x, n=2)
    assert len(outs) == 2
    for out, z in zip(outs, blocks[-2:]):  # the last n blocks, in order, each through the final norm
        torch.testing.assert_close(out.double(), layer_norm(z, sd["norm.weight"].double(), sd["norm.bias"].double()),
                                   atol=1e-4, rtol=1e-4)
    assert len(model.get_intermediate_layers(x, n=3)) == 3
    torch.testing.assert_close(model.get_intermediate_layers(x)[0][:, 0], model(x))  # n=1: CLS is the feature


# ---------------------------------------------------------------- stochastic depth

def test_layer_norm_runs_in_the_input_dtype_under_autocast():
    """fp32: exactly nn.LayerNorm. bf16 under autocast: a bf16 result within rounding of the fp32 one, and no fp32
    copy of the input kept for the backward (what autocast's nn.LayerNorm keeps); gradients reach the fp32 weights."""
    torch.manual_seed(0)
    norm = LayerNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    plain = torch.nn.LayerNorm(64, eps=1e-6)
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(4, 10, 64) * 3 + 1
    assert torch.equal(norm(x), plain(x))

    xb = x.to(torch.bfloat16).requires_grad_()
    saved = []

    def keep(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = norm(xb)
    assert y.dtype == torch.bfloat16
    exact = plain(xb.detach().float())
    assert (y.float() - exact).abs().max() <= 2 ** -7 * exact.abs().max()  # one bf16 rounding of the output
    assert (torch.float32, xb.numel()) not in saved and (torch.bfloat16, xb.numel()) in saved
    y.float().sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and norm.weight.grad.abs().sum() > 0
    assert xb.grad.dtype == torch.bfloat16


def test_drop_path():
    x = torch.randn(4000, 3, 5)
    assert DropPath(0.5).eval()(x) is x
    assert DropPath(0.0).train()(x) is x
    torch.manual_seed(0)
    y = DropPath(0.25).train()(x)
    kept = (y != 0).flatten(1).all(1)
    dropped = (y == 0).flatten(1).all(1)
    assert (kept | dropped).all()  # a whole sample is dropped or kept
    torch.testing.assert_close(y[kept], x[kept] / 0.75)  # survivors scaled by 1 / keep_prob
    assert abs(kept.float().mean().item() - 0.75) < 0.03  # binomial sd ~0.007


def test_drop_path_rate_grows_linearly_over_depth():
    model = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=4, num_heads=2, drop_path_rate=0.3)
    rates = [blk.drop_path.drop_prob for blk in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), model.eval()(x))  # eval: deterministic
    plain = VisionTransformer(img_size=32, patch_size=16, embed_dim=16, depth=4, num_heads=2)
    torch.testing.assert_close(plain.train()(x), plain.eval()(x))  # rate 0: training changes nothing


# ---------------------------------------------------------------- the Triton kernels inside the model

def test_triton_path_matches_reference_path(monkeypatch):
    """The model's Triton path (compiled on a GPU, the interpreter on a CPU) gives the reference output, input
    gradient and parameter gradients. Each tensor is compared relative to its largest entry, to 1e-4: both paths
    are float32 but sum in different orders (online softmax, blocked GEMMs)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = randomize_(VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                         num_classes=3)).to(device)
    x0 = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    results = {}
    for mode in ["auto", "reference"]:
        monkeypatch.setenv("MINIVIT_KERNELS", mode)
        model.zero_grad()
        x = x0.clone().requires_grad_(True)
        out = model(x)
        out.square().sum().backward()
        results[mode] = [out.detach(), x.grad] + [p.grad.clone() for p in model.parameters()]
    names = ["output", "input grad"] + [f"grad of {n}" for n, _ in model.named_parameters()]
    for name, got, ref in zip(names, results["auto"], results["reference"]):
        scale = ref.abs().max()
        assert scale > 0, name
        torch.testing.assert_close(got / scale, ref / scale, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
