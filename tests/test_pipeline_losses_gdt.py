"""GDT hypotheses 1-9 against a naive per-query loop of the documented rule, stop-gradient keys, audio masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses.gdt import GDT, gdt_loss

# Written out from the GDT table (algorithms.md §3.2), independently of pipeline.losses.gdt.
VAR, INV, BASE = "variant", "invariant", "basecase"
TERMS = {
    2: [(VAR, 0, 1)],
    3: [(INV, 0, 1), (BASE, 0, 1)],
    4: [(VAR, 0, 2)],
    5: [(INV, 0, 2), (BASE, 0, 2)],
    6: [(VAR, 0, 1), (VAR, 2, 3), (VAR, 0, 2), (VAR, 1, 3)],
    7: [(INV, 0, 1), (INV, 2, 3), (VAR, 0, 2), (VAR, 1, 3), (BASE, 0, 1)],
    8: [(VAR, 0, 1), (VAR, 2, 3), (INV, 0, 2), (INV, 1, 3), (BASE, 0, 2)],
    9: [(INV, 0, 1), (INV, 2, 3), (INV, 0, 2), (INV, 1, 3), (BASE, 0, 1), (BASE, 0, 2)],
}


def ce(query, positive, negatives, t):
    """-log softmax of the positive among [positive, negatives], one query at a time."""
    logits = torch.stack([query @ positive] + [query @ n for n in negatives]) / t
    return torch.logsumexp(logits, 0) - logits[0]


def naive_term(mode, video, audio, x, y, t, keep, key):
    """Mean over samples and the 4 query kinds of one pair term; `key` is applied to every key feature."""
    total, count = 0.0, 0
    for i in keep:
        for q_mod, k_mod in ((video, audio), (audio, video)):
            for view, other in ((x, y), (y, x)):
                pos = key(k_mod[i, other] if mode == INV else k_mod[i, view])
                negs = [key(k_mod[j, v]) for j in keep for v in (x, y) if j != i]
                if mode == VAR:
                    negs.append(key(k_mod[i, other]))  # own transformed view: the hard negative
                total = total + ce(q_mod[i, view], pos, negs, t)
                count += 1
    return total / count


def naive_gdt(video, audio, hyp, t=0.07, keep=None, detach_keys=True):
    video, audio = F.normalize(video, dim=-1), F.normalize(audio, dim=-1)
    keep = list(range(video.shape[0])) if keep is None else keep
    key = (lambda f: f.detach()) if detach_keys else (lambda f: f)
    if hyp == 1:
        vals = [ce(video[i, 0], key(audio[i, 0]), [key(audio[j, 0]) for j in keep if j != i], t) for i in keep]
        vals += [ce(audio[i, 0], key(video[i, 0]), [key(video[j, 0]) for j in keep if j != i], t) for i in keep]
        return sum(vals) / len(vals)
    terms = [naive_term(mode, video, audio, x, y, t, keep, key) for mode, x, y in TERMS[hyp]]
    return sum(terms) / len(terms)


def naive_value(*args, **kwargs) -> float:
    return float(naive_gdt(*args, **kwargs))


@pytest.mark.parametrize("hyp", range(1, 10))
def test_every_hypothesis_matches_naive_loop(hyp):
    video, audio = torch.randn(4, 4, 6, dtype=torch.float64), torch.randn(4, 4, 6, dtype=torch.float64)
    assert float(gdt_loss(video, audio, hyp)) == pytest.approx(naive_value(video, audio, hyp), rel=1e-10)
    assert float(gdt_loss(video, audio, hyp, temperature=0.5)) == pytest.approx(
        naive_value(video, audio, hyp, 0.5), rel=1e-10
    )


def test_variant_and_invariant_disagree_on_the_same_features():
    video, audio = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    assert float(gdt_loss(video, audio, 2)) != pytest.approx(float(gdt_loss(video, audio, 3)), rel=1e-3)


@pytest.mark.parametrize("hyp", [1, 3, 8])
def test_keys_are_stop_gradient(hyp):
    video = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    audio = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    got = torch.autograd.grad(gdt_loss(video, audio, hyp), (video, audio))
    want = torch.autograd.grad(naive_gdt(video, audio, hyp), (video, audio))
    live = torch.autograd.grad(naive_gdt(video, audio, hyp, detach_keys=False), (video, audio))
    for g, w, lv in zip(got, want, live):
        torch.testing.assert_close(g, w)
        assert not torch.allclose(g, lv, atol=1e-6)  # keys with gradients would change it: the check is sensitive


def test_samples_without_audio_are_neither_queries_nor_keys():
    video, audio = torch.randn(5, 4, 6, dtype=torch.float64), torch.randn(5, 4, 6, dtype=torch.float64)
    has_audio = torch.tensor([True, True, False, True, True])
    keep = [0, 1, 3, 4]
    for hyp in (1, 5, 9):
        got = float(gdt_loss(video, audio, hyp, valid=has_audio))
        assert got == pytest.approx(float(gdt_loss(video[keep], audio[keep], hyp)), rel=1e-10)
        assert got == pytest.approx(naive_value(video, audio, hyp, keep=keep), rel=1e-10)


def test_module_and_errors():
    out = {"video@va": torch.randn(3, 4, 5), "audio@va": torch.randn(3, 4, 5)}
    terms = GDT(hypothesis=6)(out, {"has_audio": torch.ones(3, dtype=torch.bool)})
    assert set(terms) == {"gdt"} and float(terms["gdt"]) == pytest.approx(
        naive_value(out["video@va"].double(), out["audio@va"].double(), 6), rel=1e-5
    )
    with pytest.raises(ValueError, match="hypothesis must be 1-9, got 10"):
        GDT(hypothesis=10)
    with pytest.raises(ValueError, match="V>=3"):
        gdt_loss(torch.randn(3, 2, 5), torch.randn(3, 2, 5), 4)
    with pytest.raises(ValueError, match="audio@va"):
        GDT()({"video@va": torch.randn(2, 1, 4)}, {})
