"""Audio towers: a torchvision-style 2D ResNet on log-mel spectrograms `(B, 1, F, T)` (H = frequency, W = time).

ResNet-9 is GDT's and SeLaVi's audio encoder: BasicBlock stages [1, 1, 1, 1] with 64/128/256/512 channels and a
1-channel 7x7/2 stem followed by a 3x3/2 max-pool; ResNet-18 uses [2, 2, 2, 2]. Output: 512-d average-pooled.
Key names follow torchvision (`conv1`, `bn1`, `layerN.i.conv1`, `downsample.0`), so GDT/SeLaVi audio weights load.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.resnet import ResNetTower, downsample, stage_widths


class BasicBlock(nn.Module):
    """3x3 conv -> BN -> ReLU -> 3x3 conv -> BN, plus the (projected) input, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample(nn.Conv2d, nn.BatchNorm2d, cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        x = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(x)) + residual)


class AudioResNet(ResNetTower):
    """2D ResNet on `(B, 1, F, T)` log-mel; `forward_features -> (B, 512 * width)`; optional `fc` to `embed_dim`."""

    def __init__(self, layers: tuple[int, ...] = (1, 1, 1, 1), *, width: float = 1.0, embed_dim: int | None = None):
        super().__init__()
        widths = stage_widths(width, "AudioResNet")
        self.conv1 = nn.Conv2d(1, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.add_stages(BasicBlock, widths[0], widths, layers)
        self.add_projection(embed_dim)
        self.init_weights()

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))
