"""ResNet-50 with random weights, for the end-to-end benchmark.

torchvision's ``resnet50(weights=None)`` is used whenever torchvision imports.
Neither of this project's machines can have it today: the CPU machines carry
a CPU build of torch that PyPI's torchvision does not import beside, and the
GPU machine has no torchvision and no network. So the same architecture
(He et al. 2016, torchvision's v1.5 layout: the stride on the 3 x 3
convolution of each bottleneck) is written out here, with torchvision's
module names (``conv1``, ``bn1``, ``layer1`` ... ``layer4``, ``fc``), so that
``layers=["layer3"]`` means the same module either way and the activation
shapes agree (``layer3`` of a 224 x 224 image: 1024 x 14 x 14).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet50"]


class _Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carries the stride), 1x1 expand by 4, plus the shortcut."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        c_out = width * 4
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class _ResNet50(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        c = 64
        for i, (width, blocks, stride) in enumerate(
            [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
        ):
            layer = []
            for b in range(blocks):
                layer.append(_Bottleneck(c, width, stride if b == 0 else 1))
                c = width * 4
            setattr(self, f"layer{i}", nn.Sequential(*layer))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():  # torchvision's initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 3, H, W) -> (N, classes)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet50(seed: int = 0) -> tuple[nn.Module, str]:
    """A ResNet-50 with random weights (seeded), and where its definition came from."""
    torch.manual_seed(seed)
    try:
        from torchvision.models import resnet50 as tv_resnet50
    except Exception:  # torchvision missing, or built for another torch
        return _ResNet50(), "benchmarks/_resnet.py (torchvision is not importable here)"
    return tv_resnet50(weights=None), "torchvision.models.resnet50(weights=None)"
