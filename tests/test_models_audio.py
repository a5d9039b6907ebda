"""Audio ResNets: torchvision-equal parameter counts, the 1-channel stem, shapes on log-mel input."""

from __future__ import annotations

import pytest
import torch

from models import build_encoder
from models.audio import AudioResNet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_resnet18_parameters_equal_torchvision_with_a_one_channel_stem_and_no_fc():
    # torchvision resnet18: 11,689,512 = body + 3-channel 7x7 stem (9,408) + fc (513,000); ours: 1-channel stem, no fc.
    assert sum(p.numel() for p in AudioResNet((2, 2, 2, 2)).parameters()) == 11_689_512 - 513_000 - 9_408 + 3_136


def test_resnet9_is_one_basic_block_per_stage():
    model = AudioResNet((1, 1, 1, 1))
    assert [len(getattr(model, f"layer{i}")) for i in range(1, 5)] == [1, 1, 1, 1]
    assert model.conv1.weight.shape == (64, 1, 7, 7) and model.conv1.stride == (2, 2)
    assert model.feature_dim == 512


@pytest.mark.parametrize("name", ["audio_tiny", "audio_resnet9"])
def test_forward_on_contract_sized_log_mel(name):
    model = build_encoder(name).eval()
    c = model.input_contract
    x = torch.randn(2, 1, c.num_mel_bins, c.num_frames)
    with torch.no_grad():
        feats = model.forward_features(x)
    assert feats.shape == (2, model.feature_dim)
    assert not torch.allclose(feats[0], feats[1])
