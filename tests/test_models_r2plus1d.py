"""R(2+1)D-18: torchvision-equal parameter count and feature-map sizes; tiny forward/backward."""

from __future__ import annotations

import pytest
import torch

from models import build_encoder
from models.r2plus1d import R2Plus1D

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_parameter_count_equals_torchvision_r2plus1d_18_without_fc():
    # torchvision lists r2plus1d_18 at 31,505,325 parameters with a 400-way fc (512 * 400 + 400 = 205,200).
    model = R2Plus1D((2, 2, 2, 2))
    assert sum(p.numel() for p in model.parameters()) == 31_505_325 - 205_200
    assert model.layer1[0].conv1[0][0].weight.shape == (144, 64, 1, 3, 3)  # torchvision's mid-channel rule


def test_layer4_sizes_at_gdt_input():
    sizes = {}
    with torch.device("meta"):
        model = R2Plus1D((2, 2, 2, 2))
        model.layer4.register_forward_hook(lambda m, i, o: sizes.__setitem__("layer4", tuple(o.shape)))
        feats = model.forward_features(torch.zeros(1, 3, 32, 112, 112))
    assert sizes["layer4"] == (1, 512, 4, 7, 7)  # strides 1/2/2/2 in T, H, W after a stride-(1, 2, 2) stem
    assert feats.shape == (1, 512)


def test_tiny_trains_a_step():
    model = build_encoder("r2plus1d_tiny", embed_dim=8)
    x = torch.rand(2, 3, 8, 32, 32)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x).pow(2).mean()
    loss.backward()
    opt.step()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
