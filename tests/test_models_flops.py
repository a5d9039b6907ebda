"""Parameter/FLOP counting against hand counts and the reference S3D-G measurement; the `vatp models` listing."""

from __future__ import annotations

import pytest
import torch

from launch.cli import main
from models.flops import count_flops, count_params, variant_cost
from models.s3d import S3D


def test_linear_flops_are_two_per_multiply_add():
    layer = torch.nn.Linear(7, 5)
    assert count_flops(layer, torch.zeros(3, 7)) == 2 * 3 * 7 * 5
    assert count_flops(layer, torch.zeros(3, 7), backward=True) == 2 * (2 * 3 * 7 * 5)  # fwd + grad_w (input: no grad)
    x = torch.zeros(3, 7, requires_grad=True)
    assert count_flops(layer, x, backward=True) == 3 * (2 * 3 * 7 * 5)  # + grad_input
    assert count_params(layer) == 7 * 5 + 5


def test_s3d_flops_match_the_reference_measurement():
    # performance.md 1.1 (FlopCounterMode on the MIL-NCE s3dg.py): 9.53 GFLOP at 16x112^2, 74.2 at 32x224^2.
    with torch.device("meta"):
        model = S3D()
        small, large = torch.zeros(1, 3, 16, 112, 112), torch.zeros(1, 3, 32, 224, 224)
    assert count_flops(model, small) / 1e9 == pytest.approx(9.53, rel=0.005)
    assert count_flops(model, large) / 1e9 == pytest.approx(74.2, rel=0.005)


def test_variant_cost_counts_the_tower_without_its_projection():
    cost = variant_cost("s3d")
    assert cost.modality == "video"
    assert cost.params == 9_670_800 - (1024 * 512 + 512)  # the released video tower minus fc
    assert cost.gflops == pytest.approx(74.2, rel=0.005)
    with pytest.raises(ValueError, match="unknown encoder variant 'x'"):
        variant_cost("x")


def test_models_command_lists_the_requested_variants(capsys):
    assert main(["models", "s3d_tiny", "text_tiny"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["variant", "modality", "params", "GFLOPs/clip"]
    assert [line.split()[0] for line in lines[2:]] == ["s3d_tiny", "text_tiny"]
    assert "8x64^2 @ 10 fps" in lines[2] and "vocab 1000" in lines[3]
    assert main(["models", "nope"]) == 2
