"""The skeleton shared by the ResNet towers (models/audio.py 2D, models/r2plus1d.py (2+1)D).

Both follow torchvision's layout: a stem, then `layer1`..`layer4` of residual blocks with 64/128/256/512
channels (times `width`), stride 2 from `layer2` on, average pooling over every non-channel axis, and an
optional `fc` to `embed_dim`. Subclasses build the stem and name the block; key names stay torchvision's,
so released GDT/SeLaVi/torchvision weights load.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

STAGE_CHANNELS = (64, 128, 256, 512)


def stage_widths(width: float, name: str) -> list[int]:
    """Channels of layer1..4 at `width` (at least 1 each); ValueError naming `name` for a width <= 0."""
    if width <= 0:
        raise ValueError(f"{name} width must be > 0, got {width}")
    return [max(1, round(c * width)) for c in STAGE_CHANNELS]


def downsample(conv: type[nn.Module], norm: type[nn.Module], cin: int, cout: int, stride: int) -> nn.Module | None:
    """The shortcut projection (strided 1x1 conv + BN) when a block changes shape, else None (identity)."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))


class ResNetTower(nn.Module):
    """Stages, pooling and projection; a subclass sets up its stem and implements `forward_stem`."""

    def add_stages(
        self, block: Callable[[int, int, int], nn.Module], cin: int, widths: list[int], layers: tuple[int, ...]
    ) -> None:
        """Register layer1..4 (`block(cin, cout, stride)`) and set `feature_dim`."""
        for i, (cout, blocks) in enumerate(zip(widths, layers)):
            stride = 1 if i == 0 else 2
            stage = [block(cin, cout, stride)] + [block(cout, cout, 1) for _ in range(blocks - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*stage))
            cin = cout
        self.feature_dim = cin

    def add_projection(self, embed_dim: int | None) -> None:
        self.embed_dim = embed_dim
        self.fc = nn.Linear(self.feature_dim, embed_dim) if embed_dim else None

    def init_weights(self) -> None:
        """torchvision's init: Kaiming-normal (fan_out) convs, BatchNorm weight 1 and bias 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_stem(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_features(self, x: Tensor) -> Tensor:
        """Average-pooled layer4 features `(B, feature_dim)`."""
        x = self.forward_stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.flatten(2).mean(dim=2)

    def project(self, features: Tensor) -> Tensor:
        return self.fc(features) if self.fc is not None else features

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.forward_features(x))
