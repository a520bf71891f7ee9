"""The arch registry and load_pretrained on every checkpoint layout of the DINO project (built here, small)."""
import argparse

import pytest
import torch
import torch.nn as nn

from minivit.models import ARCHS, LoadReport, arch_family, build_model, load_pretrained, resize_pos_embed
from minivit.resnet import ResNet
from minivit.vit import VisionTransformer

pytestmark = pytest.mark.usefixtures("reference_kernels")

# arch -> (embed_dim, depth, patch_size) for ViTs (ViT Table 1, DeiT for Ti/S), num_features for ResNets
VIT_SHAPES = {"vit_ti16": (192, 12, 16), "vit_s16": (384, 12, 16), "vit_s8": (384, 12, 8),
              "vit_b16": (768, 12, 16), "vit_b8": (768, 12, 8), "vit_l16": (1024, 24, 16), "vit_h14": (1280, 32, 14)}
RESNET_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048}
# parameter counts without a head at 224 px (FACTS.md: the official DINO / timm backbones), ResNet-50 without fc
PARAMS = {"vit_s16": 21_665_664, "vit_s8": 21_670_272, "vit_b16": 85_798_656, "vit_b8": 85_807_872,
          "resnet50": 23_508_032}


def small_vit(img_size=32, num_classes=0, embed_dim=32, depth=2, seed=0):
    """A ViT small enough to save, load and run in milliseconds (same names as every preset)."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img_size, patch_size=16, num_classes=num_classes, embed_dim=embed_dim,
                             depth=depth, num_heads=2)


def dino_head_state(prefix, embed_dim=32, K=16, seed=0):
    """DINOHead keys as the official files have them: 3-layer MLP, weight-normalised last layer (weight_g/_v)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (fan_out, fan_in) in zip((0, 2, 4), ((64, embed_dim), (64, 64), (8, 64))):
        sd[f"{prefix}mlp.{i}.weight"] = torch.randn(fan_out, fan_in, generator=g)
        sd[f"{prefix}mlp.{i}.bias"] = torch.randn(fan_out, generator=g)
    sd[f"{prefix}last_layer.weight_g"] = torch.ones(K, 1)
    sd[f"{prefix}last_layer.weight_v"] = torch.randn(K, 8, generator=g)
    return sd


def assert_same_weights(model, state):
    got = model.state_dict()
    assert set(got) == set(state)
    for k in state:
        assert torch.equal(got[k], state[k]), k


def test_registry_lists_the_paper_models():
    assert list(ARCHS) == ["vit_ti16", "vit_s16", "vit_s8", "vit_b16", "vit_b8", "vit_l16", "vit_h14",
                           "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_every_arch_builds_with_its_shape(arch):
    with torch.device("meta"):  # ViT-H is 630M parameters: names and shapes only, no memory
        model = build_model(arch)
    if arch_family(arch) == "vit":
        D, depth, p = VIT_SHAPES[arch]
        assert isinstance(model, VisionTransformer)
        assert (model.embed_dim, len(model.blocks), model.patch_size) == (D, depth, p)
        assert model.num_features == D and isinstance(model.head, nn.Identity)
        assert model.pos_embed.shape == (1, (224 // p) ** 2 + 1, D)
    else:
        assert isinstance(model, ResNet) and model.num_features == RESNET_FEATURES[arch]
        assert isinstance(model.fc, nn.Identity)
    if arch in PARAMS:
        assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]


def test_built_models_run_with_family_options():
    x = torch.randn(2, 3, 32, 32)
    vit = build_model("vit_ti16", num_classes=10, img_size=32, drop_path_rate=0.1)
    assert vit.pos_embed.shape == (1, 5, 192) and vit(x).shape == (2, 10)
    net = build_model("resnet18", num_classes=10, small_stem=True, zero_init_residual=True)
    assert net.conv1.weight.shape == (64, 3, 3, 3) and torch.all(net.layer1[0].bn2.weight == 0)
    assert net(x).shape == (2, 10)


def test_bad_arch_and_foreign_options_are_clear_errors():
    with pytest.raises(ValueError) as e:
        build_model("vit_small")
    assert "unknown arch 'vit_small'" in str(e.value) and "vit_s16" in str(e.value) and "resnet50" in str(e.value)
    with pytest.raises(ValueError, match="drop_path_rate does not apply to resnet50"):
        build_model("resnet50", drop_path_rate=0.1)
    with pytest.raises(ValueError, match="small_stem does not apply to vit_s16"):
        build_model("vit_s16", small_stem=True)


def test_full_dino_checkpoint_file_loads_the_teacher(tmp_path):
    """Official layout: student keys under module.backbone./module.head. (DDP), teacher under backbone./head.,
    plus optimizer, epoch, pickled argparse args and the loss center."""
    student, teacher = small_vit(seed=1).state_dict(), small_vit(seed=2).state_dict()
    ckpt = {
        "student": {**{f"module.backbone.{k}": v for k, v in student.items()}, **dino_head_state("module.head.")},
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.items()}, **dino_head_state("head.")},
        "optimizer": {"state": {}, "param_groups": []}, "epoch": 3,
        "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=16),
        "dino_loss": {"center": torch.zeros(1, 16)},
        "fp16_scaler": None,
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(ckpt, path)
    model = small_vit(seed=3)
    report = load_pretrained(model, str(path))
    assert isinstance(report, LoadReport) and report.source == "teacher" and report.loaded == len(teacher)
    assert_same_weights(model, teacher)
    assert len(report.dropped) == 8 and all("DINO projection head" in d for d in report.dropped)
    assert report.head_kept_init == [] and report.resized == []
    assert "teacher" in str(report)
    # without a teacher entry the student is taken, its DDP prefix stripped
    del ckpt["teacher"]
    report = load_pretrained(model, ckpt)
    assert report.source == "student"
    assert_same_weights(model, student)


def test_backbone_only_file_into_a_classifier_keeps_the_head_init(tmp_path):
    backbone = small_vit(seed=1).state_dict()
    path = tmp_path / "backbone.pth"
    torch.save(backbone, path)
    model = small_vit(num_classes=10, seed=4)
    head_before = model.head.weight.clone()
    report = load_pretrained(model, path)
    assert report.source == "file" and report.head_kept_init == ["head.weight", "head.bias"]
    assert torch.equal(model.head.weight, head_before)
    assert torch.equal(model.pos_embed, backbone["pos_embed"])
    assert torch.equal(model.blocks[1].mlp.fc2.weight, backbone["blocks.1.mlp.fc2.weight"])


def test_classifier_of_another_shape_is_dropped_and_reported():
    source = small_vit(num_classes=1000, seed=1).state_dict()
    model = small_vit(num_classes=10, seed=5)
    head_before = model.head.weight.clone()
    report = load_pretrained(model, source)
    assert [d.split()[0] for d in report.dropped] == ["head.weight", "head.bias"]
    assert "(1000, 32)" in report.dropped[0] and report.head_kept_init == ["head.weight", "head.bias"]
    assert torch.equal(model.head.weight, head_before) and torch.equal(model.cls_token, source["cls_token"])
    # ResNet: torchvision's 1000-class fc into a 10-class model and into a backbone (num_classes=0)
    tv = build_model("resnet18", num_classes=1000).state_dict()
    assert load_pretrained(build_model("resnet18", num_classes=10), tv).head_kept_init == ["fc.weight", "fc.bias"]
    report = load_pretrained(build_model("resnet18"), tv)
    assert report.dropped == ["fc.weight (the model has no classifier)", "fc.bias (the model has no classifier)"]


def test_resnet_dino_teacher_with_ddp_prefix_and_old_files_without_bn_counters():
    """DINO's ResNet teacher is DDP-wrapped (it has BatchNorm), so its keys read module.backbone.*;
    torchvision's original ResNet-50 file predates BN's num_batches_tracked."""
    source = build_model("resnet18", num_classes=0)
    with torch.no_grad():
        source.bn1.running_mean.normal_()
    teacher = {f"module.backbone.{k}": v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    model = build_model("resnet18", num_classes=0)
    report = load_pretrained(model, {"teacher": teacher, "epoch": 0})
    assert report.loaded == len(teacher) == 100  # 120 tensors less 20 BN counters
    assert torch.equal(model.bn1.running_mean, source.bn1.running_mean)


def test_resnet_weights_into_a_vit_say_so():
    with pytest.raises(ValueError) as e:
        load_pretrained(small_vit(), build_model("resnet50", num_classes=1000).state_dict())
    msg = str(e.value)
    assert "\n" not in msg and "checkpoint of another model? it looks like a ResNet (resnet50)" in msg
    assert "missing (cls_token" in msg and "unexpected (conv1.weight" in msg


def test_other_mismatches_are_errors_naming_the_keys():
    with pytest.raises(ValueError, match=r"another shape \(cls_token \(1, 1, 48\) vs \(1, 1, 32\).*embed_dim 48"):
        load_pretrained(small_vit(), small_vit(embed_dim=48).state_dict())
    with pytest.raises(ValueError, match=r"unexpected \(blocks\.2\.norm1\.weight.*depth 3"):
        load_pretrained(small_vit(), small_vit(depth=3).state_dict())
    partial = small_vit().state_dict()
    del partial["blocks.1.mlp.fc2.bias"]
    with pytest.raises(ValueError, match=r"1 missing \(blocks\.1\.mlp\.fc2\.bias\)"):
        load_pretrained(small_vit(), partial)
    with pytest.raises(ValueError, match="no weights found"):
        load_pretrained(small_vit(), {"epoch": 3, "args": None})
    with pytest.raises(ValueError, match="no checkpoint file"):
        load_pretrained(small_vit(), "/nonexistent/checkpoint.pth")


def test_pos_embed_is_resized_like_the_model_interpolates_it():
    """Loaded at 64 px, weights from a 32 px model give what that model gives on 64 px inputs (where it
    interpolates its table on the fly); the CLS position is kept as it is."""
    source = small_vit(img_size=32, seed=1).eval()
    model = small_vit(img_size=64, seed=2).eval()
    report = load_pretrained(model, source.state_dict())
    assert report.resized == ["pos_embed (1, 5, 32) -> (1, 17, 32)"]
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=1e-5, atol=1e-5)
    # bicubic weights sum to one: a table constant over the grid stays constant
    const = torch.cat((torch.zeros(1, 1, 4), torch.arange(4.0).expand(1, 49, 4)), dim=1)  # 7 x 7 grid
    resized = resize_pos_embed(const, grid=3)
    assert resized.shape == (1, 10, 4)
    torch.testing.assert_close(resized[:, 1:], torch.arange(4.0).expand(1, 9, 4))


def test_weight_norm_names_and_wrapper_prefixes_are_mapped():
    """A model that has its own `backbone` keeps the prefix; the official weight_g/weight_v names load into the
    parametrization API's original0/original1, and torch.compile's _orig_mod. prefix is stripped."""

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = small_vit(seed=6)
            self.head = nn.Module()
            self.head.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(8, 16, bias=False))

    source = {f"_orig_mod.backbone.{k}": v for k, v in small_vit(seed=1).state_dict().items()}
    source["head.last_layer.weight_g"] = torch.full((16, 1), 2.0)
    source["head.last_layer.weight_v"] = torch.randn(16, 8)
    model = Wrapper()
    report = load_pretrained(model, source)
    assert report.loaded == len(source) and report.dropped == []
    weight = model.head.last_layer.weight  # g * v / ||v||, row by row
    torch.testing.assert_close(weight.norm(dim=1), torch.full((16,), 2.0))
    assert torch.equal(model.backbone.cls_token, source["_orig_mod.backbone.cls_token"])
    # and the other way: parametrization names in the file, official weight_g/weight_v names in the model
    head = nn.Module()
    head.last_layer = nn.Module()
    head.last_layer.weight_g = nn.Parameter(torch.ones(16, 1))
    head.last_layer.weight_v = nn.Parameter(torch.ones(16, 8))
    parametrized = {k: v for k, v in model.state_dict().items() if k.startswith("head.")}
    wrapper = nn.Module()
    wrapper.head = head
    report = load_pretrained(wrapper, parametrized)
    assert report.loaded == 2 and torch.equal(head.last_layer.weight_g, source["head.last_layer.weight_g"])
