"""DINO pieces (minivit/dino.py) against the paper's invariants and torch's own weight norm / grad clipping.

Tiny dims (in_dim 32, K 64-256) and a small conv backbone that takes any resolution, so the file runs in seconds.
"""
import inspect
import math
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from minivit.dino import (DINOHead, DINOLoss, MultiCropWrapper, cancel_gradients_last_layer, clip_gradients,
                          koleo_loss, remap_head_state_dict, update_teacher)


class TinyBackbone(nn.Module):
    """(B, 3, H, W) -> (B, 32) for any H, W; counts its calls and the batch size of each call."""

    def __init__(self, dim=32, use_bn=False):
        super().__init__()
        self.conv = nn.Conv2d(3, dim, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(dim) if use_bn else nn.Identity()
        self.fc = nn.Linear(dim, dim)
        self.num_features = dim
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        return self.fc(F.gelu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def tiny_dino(K=64, norm_last_layer=True, use_bn=False, seed=0):
    torch.manual_seed(seed)
    head = DINOHead(32, K, use_bn=use_bn, norm_last_layer=norm_last_layer, hidden_dim=48, bottleneck_dim=16)
    return MultiCropWrapper(TinyBackbone(use_bn=use_bn), head)


def reference_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp):
    """The paper's eq. 3 written independently: CE matrix over (teacher view, student view), diagonal dropped."""
    s = F.log_softmax(student_output.double() / student_temp, dim=-1).chunk(ncrops)
    t = F.softmax((teacher_output.double() - center.double()) / teacher_temp, dim=-1).chunk(2)
    ce = torch.stack([torch.stack([-(q * log_p).sum(-1).mean() for log_p in s]) for q in t])  # (2, ncrops)
    off_diagonal = ~torch.eye(2, ncrops, dtype=torch.bool)
    return ce, ce[off_diagonal].sum() / (2 * ncrops - 2)


# --- head --------------------------------------------------------------------------------------------------------

def test_head_state_dict_has_official_names_and_shapes():
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"mlp.0.weight": (48, 32), "mlp.0.bias": (48,), "mlp.2.weight": (48, 48), "mlp.2.bias": (48,),
                      "mlp.4.weight": (16, 48), "mlp.4.bias": (16,),
                      "last_layer.weight_g": (64, 1), "last_layer.weight_v": (64, 16)}
    bn_keys = DINOHead(32, 64, use_bn=True, hidden_dim=48, bottleneck_dim=16).state_dict().keys()
    assert {k.split(".")[1] for k in bn_keys if k.startswith("mlp.")} == {"0", "1", "3", "4", "6"}
    assert set(DINOHead(32, 64, nlayers=1, bottleneck_dim=16).state_dict()) == {
        "mlp.weight", "mlp.bias", "last_layer.weight_g", "last_layer.weight_v"}
    with pytest.raises(ValueError, match="nlayers"):
        DINOHead(32, 64, nlayers=0)


def test_head_defaults_and_init_follow_the_paper():
    defaults = {k: p.default for k, p in inspect.signature(DINOHead).parameters.items()}
    assert defaults == dict(in_dim=inspect.Parameter.empty, out_dim=inspect.Parameter.empty, use_bn=False,
                            norm_last_layer=True, nlayers=3, hidden_dim=2048, bottleneck_dim=256)
    torch.manual_seed(0)
    head = DINOHead(384, 256, hidden_dim=512, bottleneck_dim=64)
    for i in (0, 2, 4):
        assert torch.all(head.mlp[i].bias == 0)
        assert abs(head.mlp[i].weight.std().item() - 0.02) < 0.002
    assert torch.all(head.last_layer.weight_g == 1)


def test_norm_last_layer_freezes_weight_g():
    frozen, free = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16), DINOHead(32, 64, norm_last_layer=False)
    assert not frozen.last_layer.weight_g.requires_grad and free.last_layer.weight_g.requires_grad
    frozen(torch.randn(4, 32)).sum().backward()
    assert frozen.last_layer.weight_g.grad is None and frozen.last_layer.weight_v.grad is not None
    w = frozen.last_layer.weight_g * frozen.last_layer.weight_v / frozen.last_layer.weight_v.norm(dim=1, keepdim=True)
    assert torch.allclose(w.norm(dim=1), torch.ones(64))  # g = 1: unit-norm prototypes


def official_style_head(parametrized, K=64):
    """The official head built with torch's own weight norm (either API), random g and v."""
    ref = nn.Module()
    ref.mlp = nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 48), nn.GELU(), nn.Linear(48, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the old nn.utils.weight_norm is deprecated: exactly why we avoid it
        wn = nn.utils.parametrizations.weight_norm if parametrized else nn.utils.weight_norm
        ref.last_layer = wn(nn.Linear(16, K, bias=False))
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p))
    return ref


@pytest.mark.parametrize("parametrized", [True, False])
def test_head_loads_both_official_layouts_strictly_and_matches_torch_weight_norm(parametrized):
    torch.manual_seed(0)
    ref = official_style_head(parametrized)
    sd = ref.state_dict()
    if parametrized:
        assert "last_layer.parametrizations.weight.original0" in sd
    head = DINOHead(32, 64, norm_last_layer=False, hidden_dim=48, bottleneck_dim=16)
    head.load_state_dict(remap_head_state_dict(sd), strict=True)
    x = torch.randn(5, 32)
    expected = ref.last_layer(F.normalize(ref.mlp(x), dim=-1))
    torch.testing.assert_close(head(x), expected)


def test_remap_keeps_prefixes_and_other_keys():
    sd = {"module.head.last_layer.parametrizations.weight.original0": 1, "backbone.norm.weight": 2,
          "head.last_layer.parametrizations.weight.original1": 3}
    assert remap_head_state_dict(sd) == {"module.head.last_layer.weight_g": 1, "backbone.norm.weight": 2,
                                         "head.last_layer.weight_v": 3}


# --- multi-crop wrapper ------------------------------------------------------------------------------------------

def test_multicrop_groups_by_resolution_and_matches_crop_by_crop():
    model = tiny_dino(K=64)
    B = 3
    crops = [torch.randn(B, 3, 32, 32) for _ in range(2)] + [torch.randn(B, 3, 16, 16) for _ in range(4)]
    out = model(crops)
    assert out.shape == (6 * B, 64)
    assert model.backbone.calls == [(2 * B, 3, 32, 32), (4 * B, 3, 16, 16)]  # one call per resolution
    one_by_one = torch.cat([model(c) for c in crops])  # a single tensor is accepted too
    torch.testing.assert_close(out, one_by_one)
    logits, features = model(crops, return_features=True)  # the backbone's features too, in the same order
    torch.testing.assert_close(logits, out)
    torch.testing.assert_close(features, torch.cat([model.backbone(c) for c in crops]))


def test_compiled_backbone_matches_eager_and_keeps_the_state_dict(reference_kernels):
    """compile_backbone(): the wrapper's forward runs the backbone through torch.compile (a graph is built), with
    the eager results and gradients; the parameter names do not change, and the backbone called directly stays
    eager. A 2-block ViT with drop path (a rate per block) in eval mode, so that both runs are deterministic."""
    from torch._dynamo.utils import counters

    from minivit.vit import VisionTransformer
    torch.manual_seed(0)
    backbone = VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.1)
    model = MultiCropWrapper(backbone, DINOHead(32, 64, hidden_dim=32, bottleneck_dim=16)).eval()
    crops = [torch.randn(2, 3, 16, 16) for _ in range(3)]  # one resolution: one graph to compile (~30 s on CPU)
    keys = list(model.state_dict())
    eager = model(crops)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()

    torch._dynamo.reset()
    graphs = counters["stats"]["unique_graphs"]
    model.compile_backbone()
    compiled = model(crops)
    compiled.square().sum().backward()
    assert counters["stats"]["unique_graphs"] > graphs  # dynamo did compile the backbone
    assert list(model.state_dict()) == keys
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(eager_grads) > 10
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    model.backbone(torch.randn(3, 3, 24, 24))  # another batch and size, called directly: no new graph
    assert counters["stats"]["unique_graphs"] == graphs


def test_multicrop_groups_only_consecutive_crops_of_equal_height_and_width():
    model = tiny_dino()
    crops = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 32, 32),
             torch.randn(2, 3, 24, 32), torch.randn(2, 3, 24, 32)]  # same width, another height: a new group
    assert model(crops).shape == (10, 64)
    assert [c[0] for c in model.backbone.calls] == [2, 2, 2, 4]


@pytest.mark.usefixtures("reference_kernels")
@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_multicrop_with_the_real_backbones(arch):
    from minivit.resnet import resnet18
    from minivit.vit import VisionTransformer
    torch.manual_seed(0)
    backbone = (VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2) if arch == "vit"
                else resnet18(num_classes=0))
    model = MultiCropWrapper(backbone, DINOHead(backbone.num_features, 64, hidden_dim=48, bottleneck_dim=16)).eval()
    crops = [torch.randn(2, 3, 32, 32) for _ in range(2)] + [torch.randn(2, 3, 16, 16) for _ in range(3)]
    out = model(crops)
    assert out.shape == (10, 64)
    torch.testing.assert_close(out, torch.cat([model(c) for c in crops]), rtol=1e-4, atol=1e-5)
    keys = model.state_dict().keys()  # the official teacher layout: backbone.* and head.*
    assert {k.split(".")[0] for k in keys} == {"backbone", "head"} and "head.last_layer.weight_g" in keys


def test_multicrop_rejects_a_backbone_without_pooled_features():
    model = MultiCropWrapper(nn.Conv2d(3, 32, 3), DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16))
    with pytest.raises(ValueError, match="num_classes=0"):
        model([torch.randn(2, 3, 8, 8)])


# --- loss --------------------------------------------------------------------------------------------------------

def test_loss_defaults_follow_the_paper():
    params = inspect.signature(DINOLoss).parameters
    assert params["student_temp"].default == 0.1 and params["center_momentum"].default == 0.9


@given(B=st.integers(1, 5), K=st.integers(2, 256), temp=st.floats(0.01, 1.0), scale=st.floats(0.1, 20.0))
def test_teacher_targets_are_distributions(B, K, temp, scale):
    loss = DINOLoss(K, 4, temp, temp, 0, 3)
    loss.center.normal_()
    p = loss.teacher_targets(scale * torch.randn(2 * B, K), epoch=1)
    assert p.dtype == torch.float32 and not p.requires_grad
    assert torch.all(p >= 0)
    torch.testing.assert_close(p.sum(-1), torch.ones(2 * B))


@given(ncrops=st.integers(2, 6), B=st.integers(1, 4), K=st.integers(2, 128), student_temp=st.floats(0.05, 1.0),
       teacher_temp=st.floats(0.01, 0.2), scale=st.floats(0.1, 10.0), seed=st.integers(0, 2**16))
def test_loss_is_nonnegative_and_averages_the_2ncrops_minus_2_view_pairs(ncrops, B, K, student_temp, teacher_temp,
                                                                         scale, seed):
    g = torch.Generator().manual_seed(seed)
    s, t = scale * torch.randn(ncrops * B, K, generator=g), scale * torch.randn(2 * B, K, generator=g)
    loss = DINOLoss(K, ncrops, teacher_temp, teacher_temp, 0, 1, student_temp=student_temp)
    loss.center.copy_(torch.randn(1, K, generator=g))
    ce, expected = reference_loss(s, t, loss.center.clone(), ncrops, student_temp, teacher_temp)
    value = loss(s, t, epoch=0)
    assert value.ndim == 0 and value.item() >= 0
    torch.testing.assert_close(value.double(), expected, rtol=1e-4, atol=1e-4)
    # the pairs differ, so a wrong pair set or divisor would show: the diagonal (same view) is not counted
    assert ce.diagonal().abs().sum() > 0


def test_loss_counts_exactly_the_pairs_of_different_views():
    # uniform teacher targets and a different, known CE for every student view: the mean is checked by hand
    K, B, ncrops = 8, 2, 5
    loss = DINOLoss(K, ncrops, 0.04, 0.04, 0, 1, student_temp=1.0)
    teacher = torch.zeros(2 * B, K)  # uniform targets q = 1/K, so CE(q, s_v) = -mean_k log softmax(s_v)_k
    views = [torch.zeros(B, K) for _ in range(ncrops)]
    for v in range(ncrops):
        views[v][:, 0] = float(v)  # CE grows with v
    ce = [(-F.log_softmax(x, -1).mean(-1)).mean().item() for x in views]
    expected = (sum(ce[1:]) + (ce[0] + sum(ce[2:]))) / (2 * ncrops - 2)  # teacher view 0 skips v=0, view 1 skips v=1
    assert loss(torch.cat(views), teacher, 0).item() == pytest.approx(expected, rel=1e-6)


@given(K=st.integers(2, 4096), B=st.integers(1, 3), seed=st.integers(0, 100))
def test_loss_of_a_uniform_student_is_ln_K(K, B, seed):
    """Whatever the teacher says, a student that predicts the uniform distribution pays exactly ln(K): the
    value a collapsed run gets stuck at (11.09 for K = 65536)."""
    t = torch.randn(2 * B, K, generator=torch.Generator().manual_seed(seed))
    loss = DINOLoss(K, 4, 0.04, 0.04, 0, 1)
    assert loss(torch.full((4 * B, K), 0.3), t, 0).item() == pytest.approx(math.log(K), rel=1e-5)


def test_collapse_stats_tell_uniform_and_one_dimension_collapse_from_healthy_targets():
    K = 16
    loss = DINOLoss(K, 4, 0.04, 0.04, 0, 1)
    uniform = loss.collapse_stats(torch.zeros(8, K), 0)
    assert uniform["entropy"].item() == pytest.approx(math.log(K), rel=1e-5)
    assert uniform["kl_to_uniform"].item() == pytest.approx(0, abs=1e-5)
    one_dim = torch.zeros(8, K)
    one_dim[:, 3] = 5.0  # every image picks prototype 3
    stats = loss.collapse_stats(one_dim, 0)
    assert stats["entropy"].item() < 1e-3 and stats["kl_to_uniform"].item() == pytest.approx(math.log(K), rel=1e-3)
    healthy = 5.0 * torch.eye(K)  # each image its own confident prototype
    stats = loss.collapse_stats(healthy, 0)
    assert stats["entropy"].item() < 1e-3 and stats["kl_to_uniform"].item() < 1e-3
    torch.testing.assert_close(loss.center, torch.zeros(1, K))  # diagnostics do not move the centre


def test_center_update_and_loss_uses_the_centre_before_the_update():
    torch.manual_seed(0)
    K, B, ncrops = 32, 4, 3
    loss = DINOLoss(K, ncrops, 0.04, 0.04, 0, 1, center_momentum=0.9)
    c0 = torch.randn(1, K)
    loss.center.copy_(c0)
    s, t = torch.randn(ncrops * B, K), torch.randn(2 * B, K)
    _, expected = reference_loss(s, t, c0, ncrops, 0.1, 0.04)
    torch.testing.assert_close(loss(s, t, 0).double(), expected, rtol=1e-5, atol=1e-5)
    assert not dist.is_initialized()  # the plain mean path
    torch.testing.assert_close(loss.center, 0.9 * c0 + 0.1 * t.mean(0, keepdim=True))
    assert "center" in loss.state_dict()


def test_only_the_student_gets_gradients():
    loss = DINOLoss(16, 4, 0.04, 0.04, 0, 1)
    s, t = torch.randn(8, 16, requires_grad=True), torch.randn(4, 16, requires_grad=True)
    loss(s, t, 0).backward()
    assert s.grad is not None and t.grad is None


def test_teacher_temperature_schedule_hits_both_ends():
    loss = DINOLoss(64, 10, 0.04, 0.07, 30, 100)
    assert len(loss.teacher_temp_schedule) == 100
    assert loss.teacher_temp_at(0) == pytest.approx(0.04)
    assert loss.teacher_temp_at(29) == pytest.approx(0.07) and loss.teacher_temp_at(99) == pytest.approx(0.07)
    assert loss.teacher_temp_at(1) == pytest.approx(0.04 + 0.03 / 29)  # linear, as np.linspace
    assert DINOLoss(64, 10, 0.04, 0.07, 0, 5).teacher_temp_schedule == [0.07] * 5
    with pytest.raises(ValueError, match="nepochs"):
        loss.teacher_temp_at(100)
    with pytest.raises(ValueError, match="warm-up"):
        DINOLoss(64, 10, 0.04, 0.07, 30, 10)


def test_loss_rejects_mismatched_shapes():
    loss = DINOLoss(16, 4, 0.04, 0.04, 0, 1)
    with pytest.raises(ValueError, match="ncrops=4"):
        loss(torch.randn(10, 16), torch.randn(4, 16), 0)
    with pytest.raises(ValueError, match="teacher_output"):
        loss(torch.randn(8, 16), torch.randn(8, 16), 0)


# --- KoLeo (DINOv2's regulariser, optional) ------------------------------------------------------------------------

def test_koleo_is_minus_the_mean_log_distance_to_the_nearest_neighbour():
    """Four points on the unit circle at 0, 10, 90 and 180 degrees (given at other lengths: they are normalised):
    nearest neighbours 10 deg, 10 deg, 80 deg and 90 deg away, chords 2 sin(angle / 2)."""
    angles = torch.tensor([0.0, 10.0, 90.0, 180.0]).deg2rad()
    x = torch.stack([angles.cos(), angles.sin()], 1) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])
    chords = 2 * torch.tensor([5.0, 5.0, 40.0, 45.0]).deg2rad().sin()
    assert koleo_loss(x).item() == pytest.approx(-chords.log().mean().item(), rel=1e-5)
    assert koleo_loss(x.double()).dtype == torch.float32


@given(B=st.integers(2, 12), D=st.integers(2, 16), seed=st.integers(0, 99))
def test_koleo_matches_a_brute_force_computation(B, D, seed):
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    u = x / x.norm(dim=1, keepdim=True)
    distances = torch.cdist(u, u) + torch.diag(torch.full((B,), math.inf, dtype=torch.float64))
    assert koleo_loss(x).item() == pytest.approx(-distances.min(1).values.log().mean().item(), rel=1e-4, abs=1e-5)


def test_koleo_gradient_spreads_bunched_features():
    """A step down the gradient moves the two nearest features apart and leaves the batch more spread out."""
    x = torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0], [-1.0, 0.2]], requires_grad=True)
    koleo_loss(x).backward()
    with torch.no_grad():
        y = x - 0.05 * x.grad
        assert F.cosine_similarity(y[0], y[1], dim=0) < F.cosine_similarity(x[0], x[1], dim=0)
        assert koleo_loss(y) < koleo_loss(x)
    with pytest.raises(ValueError, match="at least 2"):
        koleo_loss(torch.randn(1, 8))


# --- teacher EMA, last-layer freezing, clipping -------------------------------------------------------------------

def test_ema_momentum_one_is_identity_and_zero_copies_the_student():
    student, teacher = tiny_dino(seed=0, use_bn=True), tiny_dino(seed=1, use_bn=True)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    update_teacher(student, teacher, 1.0)
    assert all(torch.equal(v, t0[k]) for k, v in teacher.state_dict().items())
    update_teacher(student, teacher, 0.0)
    for name, p in teacher.named_parameters():
        assert torch.equal(p, dict(student.named_parameters())[name])
    # buffers (BN running stats) are the teacher's own, as the official code
    assert torch.equal(teacher.backbone.bn.running_mean, t0["backbone.bn.running_mean"])


def test_ema_formula_and_no_gradient_tracking():
    student, teacher = tiny_dino(seed=0), tiny_dino(seed=1)
    for p in teacher.parameters():
        p.requires_grad = False
    before = {k: v.clone() for k, v in teacher.named_parameters()}
    update_teacher(student, teacher, 0.996)
    for name, s in student.named_parameters():
        torch.testing.assert_close(dict(teacher.named_parameters())[name], 0.996 * before[name] + 0.004 * s.detach())
    assert all(not p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="share no parameter"):
        update_teacher(nn.Linear(2, 2), teacher, 0.9)


def dino_step(model, epoch, freeze_last_layer):
    crops = [torch.randn(4, 3, 16, 16) for _ in range(2)] + [torch.randn(4, 3, 8, 8) for _ in range(2)]
    out = model(crops)
    DINOLoss(64, 4, 0.04, 0.04, 0, 2)(out, out[:8].detach() + torch.randn(8, 64), epoch).backward()
    cancel_gradients_last_layer(epoch, model, freeze_last_layer)


def test_last_layer_is_frozen_during_the_first_epoch_only():
    for epoch, frozen in [(0, True), (1, False)]:
        model = tiny_dino(norm_last_layer=False)
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.04)
        before = {k: v.clone() for k, v in model.named_parameters()}
        dino_step(model, epoch, freeze_last_layer=1)
        assert (model.head.last_layer.weight_v.grad is None) == frozen
        opt.step()
        for name, p in model.named_parameters():
            unchanged = torch.equal(p, before[name])
            assert unchanged == (frozen and "last_layer" in name), name


def set_grads(params, norms):
    for p, n in zip(params, norms):
        g = torch.randn_like(p)
        p.grad = g * (n / g.norm())


@given(clip=st.floats(0.1, 10.0), norms=st.lists(st.floats(1e-3, 100.0), min_size=1, max_size=6))
def test_clip_gradients_clips_each_parameter_on_its_own(clip, norms):
    model = nn.ParameterList([nn.Parameter(torch.zeros(i + 1, 3)) for i in range(len(norms))])
    model.append(nn.Parameter(torch.zeros(2)))  # no gradient: ignored
    set_grads(list(model)[:-1], norms)
    before = [p.grad.clone() for p in list(model)[:-1]]
    returned = clip_gradients(model, clip)
    torch.testing.assert_close(returned, torch.stack([g.norm() for g in before]))
    for p, g0 in zip(list(model)[:-1], before):
        assert p.grad.norm() <= clip * (1 + 1e-5)
        if g0.norm() + 1e-6 <= clip:
            assert torch.equal(p.grad, g0)  # unclipped: bit for bit
        else:
            torch.testing.assert_close(p.grad / p.grad.norm(), g0 / g0.norm())  # same direction
    assert list(model)[-1].grad is None


def test_per_parameter_clipping_differs_from_global_norm_clipping():
    a, b = nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4))
    set_grads([a, b], [30.0, 0.5])
    small = b.grad.clone()
    clip_gradients(nn.ParameterList([a, b]), 3.0)
    assert torch.equal(b.grad, small) and a.grad.norm().item() == pytest.approx(3.0, rel=1e-5)
    set_grads([a, b], [30.0, 0.5])
    torch.nn.utils.clip_grad_norm_([a, b], 3.0)  # global: the small gradient shrinks too
    assert b.grad.norm().item() < 0.1


# --- distributed: the centre is averaged over processes, DDP is unwrapped -----------------------------------------

def _distributed_worker(rank, world_size, init_file):
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loss = DINOLoss(8, 2, 0.04, 0.04, 0, 1)
        loss.update_center(torch.full((4, 8), float(rank)))  # rank r contributes 4 rows of value r
        expected = 0.1 * sum(range(world_size)) / world_size
        torch.testing.assert_close(loss.center, torch.full((1, 8), expected))
        student = tiny_dino(seed=0)
        teacher = tiny_dino(seed=1)
        update_teacher(nn.parallel.DistributedDataParallel(student), teacher, 0.0)
        assert all(torch.equal(p, q) for p, q in zip(teacher.parameters(), student.parameters()))
    finally:
        dist.destroy_process_group()


def test_center_is_all_reduced_across_processes_and_ddp_is_unwrapped(tmp_path):
    # fork: the children reuse the imported torch instead of importing it again (seconds on a small CPU)
    mp.start_processes(_distributed_worker, args=(2, str(tmp_path / "init")), nprocs=2, start_method="fork")
