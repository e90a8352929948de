"""The float LeNet-5 and ResNet-20/18 of pimjax.models, written in PyTorch (benchmarks only)."""

from __future__ import annotations

import torch
from torch import nn


def _w(c: int, width: float) -> int:
    return max(1, int(round(c * width)))


class LeNet5(nn.Module):
    """pimjax LeNet-5: conv5x5(6, SAME)-BN-ReLU-pool, conv5x5(16)-BN-ReLU-pool, 120, 84, 10."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 5, padding=2, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(400, 120, bias=False), nn.BatchNorm1d(120), nn.ReLU(),
            nn.Linear(120, 84, bias=False), nn.BatchNorm1d(84), nn.ReLU(),
            nn.Linear(84, num_classes))

    def forward(self, x):
        """Logits of a batch of NCHW images."""
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block with a 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x):
        """Block output."""
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.shortcut(x) + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    """CIFAR ResNet with a 3x3 stem, as pimjax.models.ResNet."""

    def __init__(self, stage_sizes, stage_features, num_classes=10, width=1.0):
        super().__init__()
        feats = [_w(f, width) for f in stage_features]
        layers = [nn.Conv2d(3, feats[0], 3, 1, 1, bias=False), nn.BatchNorm2d(feats[0]), nn.ReLU()]
        cin = feats[0]
        for stage, (blocks, f) in enumerate(zip(stage_sizes, feats, strict=True)):
            for block in range(blocks):
                layers.append(BasicBlock(cin, f, 2 if stage > 0 and block == 0 else 1))
                cin = f
        self.body = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        """Logits of a batch of NCHW images."""
        return self.fc(self.body(x).mean(dim=(2, 3)))


def build_torch_model(name: str, num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """The PyTorch twin of ``pimjax.models.get_model(name)`` (float)."""
    if name == "lenet5":
        return LeNet5(num_classes)
    if name == "resnet20":
        return ResNet((3, 3, 3), (16, 32, 64), num_classes, width)
    if name == "resnet18":
        return ResNet((2, 2, 2, 2), (64, 128, 256, 512), num_classes, width)
    raise ValueError(f"model={name!r} has no PyTorch twin here: use lenet5, resnet20, resnet18")
