"""Audio towers: a torchvision-style 2D ResNet on log-mel spectrograms `(B, 1, F, T)` (H = frequency, W = time).

ResNet-9 is GDT's and SeLaVi's audio encoder: BasicBlock stages [1, 1, 1, 1] with 64/128/256/512 channels and a
1-channel 7x7/2 stem followed by a 3x3/2 max-pool; ResNet-18 uses [2, 2, 2, 2]. Output: 512-d average-pooled.
Key names follow torchvision (`conv1`, `bn1`, `layerN.i.conv1`, `downsample.0`), so GDT/SeLaVi audio weights load.
"""

from __future__ import annotations

from torch import Tensor, nn


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)) + residual)


class AudioResNet(nn.Module):
    """2D ResNet on `(B, 1, F, T)` log-mel; `forward_features -> (B, 512 * width)`; optional `fc` to `embed_dim`."""

    def __init__(self, layers: tuple[int, ...] = (1, 1, 1, 1), *, width: float = 1.0, embed_dim: int | None = None):
        super().__init__()
        if width <= 0:
            raise ValueError(f"AudioResNet width must be > 0, got {width}")
        widths = [max(1, round(c * width)) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(1, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = widths[0]
        for i, (cout, blocks) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            stage = [BasicBlock(cin, cout, stride)] + [BasicBlock(cout, cout) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = cout
        self.feature_dim = cin
        self.embed_dim = embed_dim
        self.fc = nn.Linear(cin, embed_dim) if embed_dim else None
        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """Average-pooled layer4 features `(B, feature_dim)` of spectrograms `(B, 1, F, T)`."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))

    def project(self, features: Tensor) -> Tensor:
        return self.fc(features) if self.fc is not None else features

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.forward_features(x))
