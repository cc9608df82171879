"""Whole networks for ``convgrad bench --model``, written with ``torch.nn`` alone.

The shapes follow torchvision's ResNet-18 and MobileNetV2 (width 1.0), so a training step
exercises the same convolutions, batch norms and activations; torchvision itself is not
needed.  MobileNetV2 here has no dropout before its classifier: the gradient check runs
the native and the patched copy side by side, and a random mask would make them differ.

``MODELS`` maps each name ``--model`` accepts to a function that builds the network.
This module imports PyTorch; the bench package imports it only when a model is asked for.
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """ResNet's two 3x3 convolutions with a shortcut (a strided 1x1 projection when the shape changes)."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


def resnet18(num_classes: int = 1000) -> nn.Module:
    """ResNet-18: a 7x7/2 stem and max-pool, four stages of two basic blocks (64-512 channels), a linear head."""
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                               nn.MaxPool2d(3, 2, 1)]
    in_channels = 64
    for channels, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)]
        in_channels = channels
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


def _conv_bn(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1,
             activation: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, groups=groups,
                                         bias=False), nn.BatchNorm2d(out_channels)]
    return layers + [nn.ReLU6(inplace=True)] if activation else layers


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, linear 1x1 projection; a residual when shapes allow."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_channels * expand
        layers = _conv_bn(in_channels, hidden, 1) if expand != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, out_channels, 1, activation=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: Tensor) -> Tensor:
        y = self.block(x)
        return x + y if self.residual else y


def mobilenetv2(num_classes: int = 1000) -> nn.Module:
    """MobileNetV2 (width 1.0): a 3x3/2 stem, 17 inverted residual blocks, a 1x1 to 1280 channels, a linear head."""
    settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                (6, 320, 1, 1)]  # expansion, output channels, blocks, stride of the first block
    layers: list[nn.Module] = _conv_bn(3, 32, 3, 2)
    in_channels = 32
    for expand, channels, blocks, stride in settings:
        for i in range(blocks):
            layers.append(InvertedResidual(in_channels, channels, stride if i == 0 else 1, expand))
            in_channels = channels
    layers += _conv_bn(in_channels, 1280, 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1280, num_classes)]
    return nn.Sequential(*layers)


MODELS: dict[str, Callable[[], nn.Module]] = {"resnet18": resnet18, "mobilenetv2": mobilenetv2}
