"""R(2+1)D-18, the second video backbone (GDT, SeLaVi), written here without torchvision.

The module tree follows torchvision's `r2plus1d_18` (stem / layer1..4, `Conv2Plus1D` as a Sequential), so
GDT/SeLaVi/torchvision weights load key for key (minus their `fc`). Each (2+1)D conv is a spatial 1 x 3 x 3 conv
into `mid` channels, BN, ReLU, then a temporal 3 x 1 x 1 conv, with `mid` chosen so the pair has about the
parameters of a full 3 x 3 x 3 conv. Stages 2-4 stride 2 in T, H and W. Output: 512-d average-pooled features.
"""

from __future__ import annotations

from torch import Tensor, nn

from models.resnet import ResNetTower, downsample, stage_widths


class Conv2Plus1D(nn.Sequential):
    """Spatial (1, 3, 3) conv -> BN -> ReLU -> temporal (3, 1, 1) conv; stride `s` applied in both halves."""

    def __init__(self, cin: int, cout: int, mid: int, stride: int = 1):
        super().__init__(
            nn.Conv3d(cin, mid, (1, 3, 3), (1, stride, stride), (0, 1, 1), bias=False),
            nn.BatchNorm3d(mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(mid, cout, (3, 1, 1), (stride, 1, 1), (1, 0, 0), bias=False),
        )


class BasicBlock(nn.Module):
    """Two (2+1)D convs with a residual; a strided 1x1x1 conv + BN matches shapes when they change."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        mid = (cin * cout * 3 * 3 * 3) // (cin * 3 * 3 + 3 * cout)  # torchvision's parameter-matching rule
        self.conv1 = nn.Sequential(Conv2Plus1D(cin, cout, mid, stride), nn.BatchNorm3d(cout), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(Conv2Plus1D(cout, cout, mid), nn.BatchNorm3d(cout))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample(nn.Conv3d, nn.BatchNorm3d, cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv2(self.conv1(x)) + residual)


class R2Plus1D(ResNetTower):
    """R(2+1)D ResNet on `(B, 3, T, H, W)`; `forward_features -> (B, 512 * width)`; optional `fc` to `embed_dim`."""

    def __init__(self, layers: tuple[int, ...] = (2, 2, 2, 2), *, width: float = 1.0, embed_dim: int | None = None):
        super().__init__()
        widths = stage_widths(width, "R2Plus1D")
        stem_mid = max(1, round(45 * width))
        self.stem = nn.Sequential(
            nn.Conv3d(3, stem_mid, (1, 7, 7), (1, 2, 2), (0, 3, 3), bias=False),
            nn.BatchNorm3d(stem_mid),
            nn.ReLU(inplace=True),
            nn.Conv3d(stem_mid, widths[0], (3, 1, 1), 1, (1, 0, 0), bias=False),
            nn.BatchNorm3d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.add_stages(BasicBlock, widths[0], widths, layers)
        self.add_projection(embed_dim)
        self.init_weights()

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)
