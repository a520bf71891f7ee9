"""ResNet: torchvision's names, sizes and outputs, checked against the rules written out here independently.

torchvision is not a dependency, so its naming is re-derived below (`torchvision_state_dict_shapes`) and its
forward pass re-implemented with torch.nn.functional over a state_dict (`functional_resnet`); a model that
matches both loads torchvision weights strictly and gives the same outputs.
"""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from minivit.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet34, resnet50, resnet101, resnet152

pytestmark = pytest.mark.usefixtures("reference_kernels")

# name -> (factory, bottleneck?, blocks per stage, torchvision's parameter count with the 1000-class fc)
DEPTHS = {
    "resnet18": (resnet18, False, [2, 2, 2, 2], 11_689_512),
    "resnet34": (resnet34, False, [3, 4, 6, 3], 21_797_672),
    "resnet50": (resnet50, True, [3, 4, 6, 3], 25_557_032),
    "resnet101": (resnet101, True, [3, 4, 23, 3], 44_549_160),
    "resnet152": (resnet152, True, [3, 8, 36, 3], 60_192_808),
}


def torchvision_state_dict_shapes(bottleneck: bool, layers: list[int], num_classes: int = 1000) -> dict:
    """Every key of a torchvision ResNet state_dict with its shape, from torchvision's naming rules."""
    shapes = {}

    def conv(name, c_out, c_in, k):
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)

    def bn(name, c):
        for s in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{s}"] = (c,)
        shapes[f"{name}.num_batches_tracked"] = ()

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    expansion = 4 if bottleneck else 1
    c_in = 64
    for stage, (width, n) in enumerate(zip([64, 128, 256, 512], layers), start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            if bottleneck:
                conv(f"{p}.conv1", width, c_in, 1), bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
                conv(f"{p}.conv3", 4 * width, width, 1), bn(f"{p}.bn3", 4 * width)
            else:
                conv(f"{p}.conv1", width, c_in, 3), bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3), bn(f"{p}.bn2", width)
            if i == 0 and (stage > 1 or c_in != width * expansion):
                conv(f"{p}.downsample.0", width * expansion, c_in, 1), bn(f"{p}.downsample.1", width * expansion)
            c_in = width * expansion
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, 512 * expansion), (num_classes,)
    return shapes


def random_state_dict(shapes: dict, seed: int = 0) -> dict:
    """A state_dict with the given shapes and non-trivial values (BN statistics far from 0/1 on purpose)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        if k.endswith("num_batches_tracked"):
            sd[k] = torch.tensor(7)
        elif k.endswith("running_var"):
            sd[k] = torch.rand(shape, generator=g) + 0.5
        elif k.endswith(("running_mean", "bias")):
            sd[k] = 0.1 * torch.randn(shape, generator=g)
        elif k.startswith("bn") or ".bn" in k or k.endswith("downsample.1.weight"):  # BN gamma
            sd[k] = torch.rand(shape, generator=g) + 0.5
        else:  # conv / fc weights, scaled by fan-in so activations stay O(1) through the depth
            fan_in = int(torch.tensor(shape[1:]).prod())
            sd[k] = torch.randn(shape, generator=g) * (1.0 / fan_in) ** 0.5
    return sd


def functional_resnet(sd: dict, x: torch.Tensor, bottleneck: bool, layers: list[int]) -> torch.Tensor:
    """torchvision's ResNet forward (eval mode, ImageNet stem, v1.5 stride on the 3x3) written with F.* only."""

    def bn(name, t):
        return F.batch_norm(t, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                            sd[f"{name}.bias"], training=False, eps=1e-5)

    x = F.relu(bn("bn1", F.conv2d(x, sd["conv1.weight"], stride=2, padding=3)))
    x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    for stage, n in enumerate(layers, start=1):
        for i in range(n):
            p = f"layer{stage}.{i}"
            stride = 2 if (i == 0 and stage > 1) else 1
            if bottleneck:
                out = F.relu(bn(f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"])))
                out = F.relu(bn(f"{p}.bn2", F.conv2d(out, sd[f"{p}.conv2.weight"], stride=stride, padding=1)))
                out = bn(f"{p}.bn3", F.conv2d(out, sd[f"{p}.conv3.weight"]))
            else:
                out = F.relu(bn(f"{p}.bn1", F.conv2d(x, sd[f"{p}.conv1.weight"], stride=stride, padding=1)))
                out = bn(f"{p}.bn2", F.conv2d(out, sd[f"{p}.conv2.weight"], padding=1))
            if f"{p}.downsample.0.weight" in sd:
                x = bn(f"{p}.downsample.1", F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=stride))
            x = F.relu(out + x)
    x = x.mean(dim=(2, 3))  # global average pool
    return F.linear(x, sd["fc.weight"], sd["fc.bias"])


@pytest.mark.parametrize("name", list(DEPTHS))
def test_parameter_count_and_names_match_torchvision(name):
    factory, bottleneck, layers, n_params = DEPTHS[name]
    with torch.device("meta"):  # no memory, no init time: only names and shapes matter here
        model = factory()
    assert sum(p.numel() for p in model.parameters()) == n_params
    expected = torchvision_state_dict_shapes(bottleneck, layers)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == expected


def test_torchvision_key_spot_checks():
    """A few keys written out by hand, so the rule-based list above is itself pinned down."""
    sd18 = resnet18().state_dict()
    assert len(sd18) == 122  # 62 parameters + 20 BN x 3 buffers
    assert "layer1.0.downsample.0.weight" not in sd18  # 64 -> 64 at stride 1: identity shortcut
    assert sd18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
    assert sd18["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert sd18["fc.weight"].shape == (1000, 512)
    assert sd18["layer3.1.bn2.num_batches_tracked"].shape == ()
    sd50 = resnet50().state_dict()
    assert len(sd50) == 320  # 161 parameters + 53 BN x 3 buffers
    assert sd50["conv1.weight"].shape == (64, 3, 7, 7)
    assert sd50["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)  # 64 -> 256 channels
    assert sd50["layer1.0.downsample.1.running_var"].shape == (256,)
    assert sd50["layer2.0.conv2.weight"].shape == (128, 128, 3, 3)
    assert sd50["layer3.5.bn3.weight"].shape == (1024,)
    assert sd50["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
    assert sd50["fc.weight"].shape == (1000, 2048)
    assert "layer3.6.conv1.weight" not in sd50  # [3, 4, 6, 3]: layer3 has blocks 0..5


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_torchvision_state_dict_loads_strictly_and_gives_the_same_outputs(name):
    factory, bottleneck, layers, _ = DEPTHS[name]
    sd = random_state_dict(torchvision_state_dict_shapes(bottleneck, layers, num_classes=10), seed=1)
    model = factory(num_classes=10)
    model.load_state_dict(sd, strict=True)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x)
    expected = functional_resnet(sd, x, bottleneck, layers)
    assert out.shape == (2, 10)
    assert expected.abs().max() > 1e-2  # the comparison below is not between two near-zero tensors
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(DEPTHS))
def test_output_shapes_for_every_depth_both_stems_32_and_64_px(name):
    """On the meta device: shapes are propagated without computing (ResNet-152 with the small stem at 64 px is
    ~15 GFLOPs per image); real forwards of the same blocks are checked numerically above."""
    factory = DEPTHS[name][0]
    with torch.device("meta"):
        for small_stem in (False, True):
            model = factory(num_classes=7, small_stem=small_stem).eval()
            for size in (32, 64):
                x = torch.empty(2, 3, size, size)
                side = size // 8 if small_stem else size // 32  # the small stem keeps 4x more resolution per side
                assert model.forward_features(x).shape == (2, model.num_features, side, side)
                assert model(x).shape == (2, 7)


def test_small_stem_layout():
    model = resnet18(small_stem=True)
    assert model.conv1.weight.shape == (64, 3, 3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    assert isinstance(resnet18().maxpool, nn.MaxPool2d)


@pytest.mark.parametrize("factory, num_features", [(resnet18, 512), (resnet50, 2048)])
def test_num_classes_zero_returns_pooled_features(factory, num_features):
    model = factory(num_classes=0).eval()
    assert isinstance(model.fc, nn.Identity) and model.num_features == num_features
    assert not any(k.startswith("fc.") for k in model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = model(x)
        pooled = model.forward_features(x).mean(dim=(2, 3))
    assert feats.shape == (3, num_features)
    torch.testing.assert_close(feats, pooled)


@pytest.mark.parametrize("factory", [resnet18, resnet50])
def test_zero_init_residual_makes_every_block_the_identity_path(factory):
    """With gamma = 0 on the last BN of each branch, a block outputs relu(x) (or relu(downsample(x))): F(x) = 0."""
    torch.manual_seed(0)
    model = factory(zero_init_residual=True, num_classes=0).eval()
    blocks = [m for m in model.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert len(blocks) == (8 if factory is resnet18 else 16)
    seen = []

    def check(block, inputs, output):
        x = inputs[0]
        identity = x if block.downsample is None else block.downsample(x)
        torch.testing.assert_close(output, torch.relu(identity), rtol=0, atol=0)
        seen.append(block)

    hooks = [b.register_forward_hook(check) for b in blocks]
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks)
    # and without the flag the residual branches do contribute
    plain = factory(num_classes=0).eval()
    x = torch.randn(1, 64, 8, 8) if factory is resnet18 else torch.randn(1, 256, 8, 8)
    with torch.no_grad():
        assert not torch.equal(plain.layer1[1](x), torch.relu(x))


def test_init_follows_torchvision():
    torch.manual_seed(0)
    model = resnet18()
    w = model.layer4[0].conv2.weight  # (512, 512, 3, 3): fan_out = 512 * 9
    assert abs(w.std().item() - (2.0 / (512 * 9)) ** 0.5) < 0.02 * (2.0 / (512 * 9)) ** 0.5
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bns)
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in bns)


def test_batchnorm_eval_is_deterministic_and_per_sample():
    """Eval mode uses the running statistics: same output twice, a sample's output does not depend on its batch,
    and nothing is updated. Train mode, by contrast, normalises with batch statistics and updates the buffers."""
    torch.manual_seed(0)
    model = resnet18(num_classes=5)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        model.train()
        model(x)  # move the running statistics away from their init
        model.eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        a, b = model(x), model(x)
        single = model(x[:1])
    assert torch.equal(a, b)
    torch.testing.assert_close(single, a[:1], rtol=1e-5, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model.train()
        train_single = model(x[:2])[:1]
        train_batch = model(x)[:1]
    assert not torch.allclose(train_single, train_batch)
    assert model.bn1.num_batches_tracked.item() == 3


def test_bad_inputs_raise_value_errors():
    with pytest.raises(ValueError, match="num_classes"):
        resnet18(num_classes=-1)
    with pytest.raises(ValueError, match="layers"):
        ResNet(BasicBlock, [2, 2, 2])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        resnet18()(torch.randn(3, 32, 32))
