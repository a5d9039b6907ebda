"""MIL-NCE against a naive loop over the official formula, masks, gradients, and the module wrapper."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.losses.milnce import MilNCE, milnce_loss


def naive_milnce(video, text, mask=None, temperature=None):
    """Row i: -log( Σ_k e^{x[i,i,k]} / (Σ_{j,k} e^{x[i,j,k]} + Σ_{j,k} e^{x[j,i,k]}) ), averaged over clips."""
    b, k, _ = text.shape
    mask = torch.ones(b, k, dtype=torch.bool) if mask is None else mask
    t = 1.0 if temperature is None else temperature
    losses = []
    for i in range(b):
        if not mask[i].any():
            continue
        num = sum(math.exp(float(video[i] @ text[i, kk]) / t) for kk in range(k) if mask[i, kk])
        den = 0.0
        for j in range(b):
            for kk in range(k):
                if mask[j, kk]:
                    den += math.exp(float(video[i] @ text[j, kk]) / t)
                if mask[i, kk]:
                    den += math.exp(float(video[j] @ text[i, kk]) / t)
        losses.append(-math.log(num / den))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_matches_naive_loop(k, dtype, scale):
    video = torch.randn(5, 8, dtype=dtype) * scale
    text = torch.randn(5, k, 8, dtype=dtype) * scale
    got = float(milnce_loss(video, text))
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    assert got == pytest.approx(naive_milnce(video.double(), text.double()), rel=tol, abs=tol)


def test_temperature_and_candidate_mask():
    video, text = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 3, 6, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    got = float(milnce_loss(video, text, mask, temperature=0.5))
    assert got == pytest.approx(naive_milnce(video, text, mask, 0.5), rel=1e-10)
    # A masked caption must not matter, whatever its value.
    text2 = text.clone()
    text2[0, 2] = 100.0
    assert float(milnce_loss(video, text2, mask, temperature=0.5)) == pytest.approx(got, rel=1e-12)


def test_gradients_match_finite_differences_and_stay_finite_with_an_empty_clip():
    video = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    text = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda v, t: milnce_loss(v, t, mask), (video, text))
    milnce_loss(video, text, mask).backward()
    assert torch.isfinite(video.grad).all() and torch.isfinite(text.grad).all()
    assert video.grad[1].abs().sum() > 0  # the empty clip's video is still every other caption's negative
    assert text.grad[1].abs().sum() == 0  # its masked captions take no part


def test_module_reads_view_zero_and_token_mask():
    b, k, length, d = 4, 2, 5, 6
    out = {"video@vt": torch.randn(b, 1, d), "text@vt": torch.randn(b, k, d)}
    text_mask = torch.zeros(b, k, length, dtype=torch.bool)
    text_mask[:, 0, :3] = True
    text_mask[1, 1, 0] = True
    terms = MilNCE("vt")(out, {"text_mask": text_mask})
    expected = naive_milnce(out["video@vt"][:, 0].double(), out["text@vt"].double(), text_mask.any(-1))
    assert set(terms) == {"milnce"}
    assert float(terms["milnce"]) == pytest.approx(expected, rel=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="video \\(B, D\\)"):
        milnce_loss(torch.randn(4, 6), torch.randn(3, 2, 6))
    with pytest.raises(ValueError, match="text_mask"):
        milnce_loss(torch.randn(4, 6), torch.randn(4, 2, 6), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="video@vt"):
        MilNCE("vt")({"video@va": torch.randn(2, 1, 4)}, {})


def test_empty_clip_with_temperature_keeps_gradients_finite():
    video = torch.randn(3, 4, requires_grad=True)
    text = torch.randn(3, 2, 4, requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    milnce_loss(video, text, mask, temperature=0.07).backward()
    assert torch.isfinite(video.grad).all() and torch.isfinite(text.grad).all()
