"""ResNet (He et al. 2015, "Deep Residual Learning for Image Recognition"): the convolutional baseline.

Read top to bottom: two residual blocks, then the network that stacks them, then the named depths.

    stem:    7x7/2 conv -> BN -> ReLU -> 3x3/2 max-pool            (B, 64, H/4, W/4)
    layer1:  blocks at width 64,  stride 1                          (B, 64 * e, H/4,  W/4)
    layer2:  blocks at width 128, the first one with stride 2       (B, 128 * e, H/8,  W/8)
    layer3:  blocks at width 256, the first one with stride 2       (B, 256 * e, H/16, W/16)
    layer4:  blocks at width 512, the first one with stride 2       (B, 512 * e, H/32, W/32)
    head:    global average pool -> fc                              (B, num_classes)

with expansion e = 1 for BasicBlock (ResNet-18/34) and e = 4 for Bottleneck (ResNet-50/101/152). Each block
computes relu(x + F(x)) (paper eq. 1); when F changes the shape, the shortcut is a 1x1 conv + BN ("option B",
paper sec. 3.3) named `downsample`.

Parameter and buffer names are exactly torchvision's (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`,
`fc`, BN `running_mean/var/num_batches_tracked`), so torchvision, timm and DINO ResNet state_dicts load with
strict=True and give the same outputs (tests/test_resnet.py checks this against a functional re-implementation).
"""
import torch
import torch.nn as nn


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (the BN that follows has its own shift)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias: changes the number of channels (and, with stride 2, the resolution)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (ResNet-18/34, paper fig. 5 left). x (B, C_in, H, W) -> (B, planes, H/stride, W/stride)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample  # None when the shapes already match: then the shortcut is the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand x4 (ResNet-50/101/152, paper fig. 5 right).
    x (B, C_in, H, W) -> (B, 4 * planes, H/stride, W/stride).

    The stride sits on the 3x3 conv, not on the first 1x1 as in the paper: torchvision's "ResNet v1.5", about
    +0.5% top-1, and the layout of every public ResNet-50 checkpoint (torchvision, timm, DINO)."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """A ResNet: stem, four stages of residual blocks, global average pool, `fc`.

    block: BasicBlock or Bottleneck; layers: number of blocks per stage, e.g. [3, 4, 6, 3] for ResNet-50.
    num_classes: size of `fc`; 0 makes `fc` an nn.Identity and forward returns the pooled feature
        (B, num_features), e.g. as a DINO backbone (DINO's released ResNet-50 has no fc).
    zero_init_residual: start the last BN of every residual branch at gamma = 0, so each block begins as the
        identity (relu(x + 0)); Goyal et al. 2017 ("ImageNet in 1 hour") found this helps large-batch training.
    small_stem: for 32 px images (CIFAR): a 3x3/1 conv stem without max-pool. The ImageNet stem divides the
        resolution by 4 before the first block, which leaves a 32 px image 8x8 in layer1 and 1x1 in layer4;
        the small stem keeps 32x32 in layer1 and 4x4 in layer4 (paper sec. 4.2 uses the same 3x3 first layer).
        Its `conv1` has shape (64, 3, 3, 3), so ImageNet checkpoints no longer fit it.
    """

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False, small_stem: bool = False):
        super().__init__()
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers={layers}: give 4 stage depths, each >= 1 (e.g. [3, 4, 6, 3] for ResNet-50)")
        if num_classes < 0:
            raise ValueError(f"num_classes={num_classes}: use 0 for a feature extractor or the number of classes")
        self.inplanes = 64  # channels entering the next block; _make_layer advances it
        if small_stem:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(block, 64, layers[0], stride=1)
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        # torchvision's init: He et al. 2015 ("Delving deep into rectifiers") normal init with fan_out for convs,
        # BN as the identity; `fc` keeps PyTorch's default Linear init.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck):
                    nn.init.zeros_(m.bn3.weight)
                elif isinstance(m, BasicBlock):
                    nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """One stage: `blocks` blocks of width `planes`; the first one changes stride/channels, the rest keep them."""
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) float, normalised -> last feature map (B, num_features, H/32, W/32) (H/8 with small_stem)."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"ResNet expects images (B, 3, H, W), got a tensor of shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) float -> logits (B, num_classes), or the pooled feature (B, num_features) if num_classes=0."""
        x = self.avgpool(self.forward_features(x)).flatten(1)  # (B, num_features)
        return self.fc(x)


def resnet18(**kwargs) -> ResNet:
    """ResNet-18: BasicBlock x [2, 2, 2, 2], 11.7M parameters with a 1000-class fc. kwargs go to ResNet."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


def resnet34(**kwargs) -> ResNet:
    """ResNet-34: BasicBlock x [3, 4, 6, 3], 21.8M parameters with a 1000-class fc. kwargs go to ResNet."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


def resnet50(**kwargs) -> ResNet:
    """ResNet-50: Bottleneck x [3, 4, 6, 3], 25.6M parameters with a 1000-class fc (23.5M without).
    kwargs go to ResNet."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


def resnet101(**kwargs) -> ResNet:
    """ResNet-101: Bottleneck x [3, 4, 23, 3], 44.5M parameters with a 1000-class fc. kwargs go to ResNet."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


def resnet152(**kwargs) -> ResNet:
    """ResNet-152: Bottleneck x [3, 8, 36, 3], 60.2M parameters with a 1000-class fc. kwargs go to ResNet."""
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)
