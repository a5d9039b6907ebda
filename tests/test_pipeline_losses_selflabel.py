"""Sinkhorn-Knopp (against a naive SeLaVi loop, marginals, dtypes, collapse) and the self-labelling objective."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, from_dict
from pipeline.losses import LossConfig, SelfLabelConfig, build_objective
from pipeline.losses.selflabel import SelfLabelling
from pipeline.losses.sinkhorn import assign_marginals, draw_cluster_sizes, sinkhorn, sinkhorn_knopp


def naive_selavi_sk(log_p: np.ndarray, lam: float, target=None, tol=0.1, max_iters=2000) -> np.ndarray:
    """SeLaVi `optimize_L_sk_gpu` written plainly in float64: PS = p**lam, counter starts at 0, err every 10."""
    n, k = log_p.shape
    ps = np.exp(lam * log_p)
    r = np.full(k, 1.0 / k) if target is None else target / target.sum()
    beta, c, err, counter = np.full(n, 1.0 / n), 1.0 / n, 1e6, 0
    while err > tol and counter < max_iters:
        alpha = r / (beta @ ps)
        beta_new = c / (ps @ alpha)
        if counter % 10 == 0:
            err = np.abs(beta / beta_new - 1).sum()
        beta = beta_new
        counter += 1
    return (ps * alpha).argmax(1)


def sharp_scores(n, k, scale=3.0, dtype=torch.float64):
    return torch.log_softmax(torch.randn(n, k, dtype=dtype) * scale, dim=1)


@pytest.mark.parametrize("lam", [20.0, 25.0])
def test_matches_naive_selavi_loop_on_every_label(lam):
    scores = sharp_scores(300, 7, scale=0.3)  # mild scores so p**lam stays representable for the naive loop
    want = naive_selavi_sk(scores.numpy(), lam)
    assert torch.equal(sinkhorn_knopp(scores, lam, dtype=torch.float64), torch.from_numpy(want))


def test_selavi_audio_visual_product_and_gaussian_target():
    log_pv, log_pa = sharp_scores(400, 6, 0.4), sharp_scores(400, 6, 0.4)
    target = torch.tensor([0.25, 0.2, 0.2, 0.15, 0.1, 0.1], dtype=torch.float64)
    want = naive_selavi_sk((0.5 * (log_pv + log_pa)).numpy(), 20.0, target.numpy())
    got = sinkhorn_knopp(0.5 * (log_pv + log_pa), 20.0, target, dtype=torch.float64)
    assert torch.equal(got, torch.from_numpy(want))


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "zipf"])
def test_plan_and_label_marginals_match_target(kind):
    k, n = 8, 4000
    sizes = draw_cluster_sizes(kind, k, param=0.3 if kind == "gaussian" else None, generator=torch.Generator())
    target = sizes[torch.randperm(k)]
    scores = sharp_scores(n, k, 4.0)
    p = scores.clone()
    res = sinkhorn(p, 25.0, target, tol=1e-6, inplace=True)  # p now holds P
    plan = res.beta[:, None] * p * res.alpha[None, :]
    torch.testing.assert_close(plan.sum(1), torch.full((n,), 1 / n, dtype=torch.float64), rtol=1e-4, atol=0)
    torch.testing.assert_close(plan.sum(0), target / target.sum(), rtol=1e-4, atol=0)
    hist = torch.bincount(res.labels, minlength=k).double() / n
    assert (hist - target).abs().max() < 0.02


def test_float32_labels_agree_with_float64():
    scores = sharp_scores(3000, 50, 2.0)
    lab64 = sinkhorn_knopp(scores, 25.0, dtype=torch.float64)
    lab32 = sinkhorn_knopp(scores.float(), 25.0)
    assert (lab64 == lab32).double().mean() >= 0.99
    assert torch.bincount(lab32, minlength=50).min() > 0


def test_float32_stopping_rule_fires_at_large_n_like_float64():
    """SeLaVi's err sums N relative changes; in float32 at N = 200k it stalls above tol = 0.1 unless the column
    sums are accumulated in float64 and tol is floored at the rounding level."""
    scores = torch.randn(200_000, 50, generator=torch.Generator().manual_seed(0)).log_softmax(1)
    res32 = sinkhorn(scores, 20.0, max_iters=300)
    res64 = sinkhorn(scores, 20.0, max_iters=300, dtype=torch.float64)
    assert res64.iterations < 150 and res32.iterations < 150
    assert (res32.labels == res64.labels).double().mean() >= 0.9999
    assert sinkhorn(scores[:1000], 20.0, max_iters=37, tol=0.0).iterations == 37  # tol 0: a fixed count


def test_p_pow_lambda_in_float32_underflows_where_the_softmax_form_does_not():
    scores = sharp_scores(500, 1000, 0.5, torch.float32)  # an untrained model: p ~ 1/K
    assert (scores.exp() ** 25).sum(1).eq(0).all()  # the SeLa/SeLaVi form loses every row in float32
    labels = sinkhorn_knopp(scores, 25.0)
    assert torch.bincount(labels, minlength=1000).max() <= 3  # ~balanced: 500 rows over 1000 clusters


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_collapsed_input_still_gives_balanced_labels(dtype):
    row = torch.log_softmax(torch.randn(1, 10, dtype=dtype) * 5, dim=1)
    labels = sinkhorn_knopp(row.repeat(1000, 1), 25.0)
    assert torch.bincount(labels, minlength=10).tolist() == [100] * 10


def test_inplace_reuses_the_buffer_and_bad_scores_are_rejected():
    scores = sharp_scores(50, 4).float()
    keep = scores.clone()
    sinkhorn_knopp(scores, 20.0)
    assert torch.equal(scores, keep)
    sinkhorn_knopp(scores, 20.0, inplace=True)
    assert scores.max() == 1.0  # now holds P, each row's best entry exp(0)
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn_knopp(torch.full((3, 4), float("nan")), 20.0)
    with pytest.raises(ValueError, match="target must be 4 positive"):
        sinkhorn_knopp(keep, 20.0, torch.tensor([1.0, 0.0, 1.0, 1.0]))


def test_marginal_sizes_go_to_clusters_by_current_mass():
    sizes = draw_cluster_sizes("zipf", 4)
    torch.testing.assert_close(sizes, torch.tensor([12, 6, 4, 3], dtype=torch.float64) / 25)
    target = assign_marginals(sizes, torch.tensor([5.0, 50.0, 1.0, 20.0]))
    torch.testing.assert_close(target, torch.tensor([4, 12, 3, 6], dtype=torch.float64) / 25)


def make_selflabel(**kw) -> SelfLabelling:
    cfg = SelfLabelConfig(**{"heads": 2, "clusters": 4, "relabels": 3, **kw})
    return SelfLabelling(cfg, num_samples=40)


def test_loss_is_mean_over_heads_of_cross_entropy_with_aligned_audio():
    sl = make_selflabel()
    sl.audio_perm[1] = torch.tensor([2, 0, 3, 1])
    idx = torch.tensor([3, 17, 5])
    out = {"video/logits": torch.randn(2, 3, 4), "audio/logits": torch.randn(2, 3, 4)}
    has_audio = torch.tensor([True, False, True])
    terms = sl(out, {"idx": idx, "has_audio": has_audio})
    y = sl.labels[idx]
    video = np.mean([-torch.log_softmax(out["video/logits"][h, b], 0)[y[b, h]] for h in range(2) for b in range(3)])
    audio = np.mean([-torch.log_softmax(out["audio/logits"][h, b], 0)[y[b, h]] for h in range(2) for b in (0, 2)])
    assert float(terms["selflabel/video"]) == pytest.approx(float(video), rel=1e-5)
    assert float(terms["selflabel/audio"]) == pytest.approx(float(audio), rel=1e-5)
    with pytest.raises(ValueError, match="batch idx out of range"):
        sl(out, {"idx": torch.tensor([40])})


def test_relabel_writes_the_table_runs_the_schedule_and_checkpoints():
    sl = make_selflabel(head_groups=2, marginals="gaussian")
    assert sl.schedule(100) == [0, 19, 54]  # all R = 3 runs before the last step
    assert sl.should_relabel(0, 100) and not sl.should_relabel(-1, 100)
    groups = sl.head_groups()
    assert sorted(h for g in groups for h in g) == [0, 1] and len(groups) == 2
    clusters = torch.randint(0, 4, (40,))
    video = torch.log_softmax(torch.nn.functional.one_hot(clusters, 4).double() * 6 + torch.randn(40, 4), 1)
    perm = torch.tensor([1, 3, 0, 2])
    audio = video[:, torch.argsort(perm)]  # audio column perm[k] holds video cluster k
    idx = torch.randperm(40)
    for heads in groups:
        stats = sl.relabel(
            video[:, None].expand(40, len(heads), 4), audio[:, None].expand(40, len(heads), 4), idx, heads=heads
        )
        assert stats["coverage"] == 1.0 and stats["clusters_used_min"] == 4
    assert int(sl.runs_done) == 1 and not sl.should_relabel(18, 100) and sl.should_relabel(19, 100)
    assert torch.equal(sl.audio_perm, perm.repeat(2, 1))  # modality alignment recovered the permutation
    labels = sl.labels[idx]  # (40, 2): the clusters of the data, up to renaming
    for h in range(2):
        assert len(set(zip(labels[:, h].tolist(), clusters.tolist()))) <= 5
    restored = make_selflabel(head_groups=2, marginals="gaussian", seed=1)
    restored.load_state_dict(sl.state_dict())
    assert torch.equal(restored.labels, sl.labels) and int(restored.runs_done) == 1
    with pytest.raises(ValueError, match="idx out of range"):
        sl.relabel(video[:, None], None, idx + 1, heads=[0])


def test_relabel_passes_the_configured_relaxation_to_sinkhorn():
    video = sharp_scores(400, 8, 2.0, torch.float32)[:, None]  # (N, 1 head, K): slow enough for relaxation
    runs = {}
    for relax in (None, 1.0):
        sl = SelfLabelling(SelfLabelConfig(clusters=8, sk_relax=relax, sk_tol=1e-3), num_samples=400)
        runs[relax] = (sl.relabel(video, None, torch.arange(400)), sl.labels.clone())
    assert runs[None][0]["sk_relax"] > 1 and runs[1.0][0]["sk_relax"] == 1.0
    assert runs[None][0]["sk_iterations"] < runs[1.0][0]["sk_iterations"]
    assert torch.equal(runs[None][1], runs[1.0][1])


def test_build_objective_from_yaml_dict_sums_weighted_terms():
    cfg = from_dict(
        LossConfig,
        {"milnce": {"weight": 0.5}, "gdt": {"weight": 2.0, "hypothesis": 3}, "selflabel": {"heads": 2, "clusters": 4}},
    )
    obj = build_objective(cfg, num_samples=10)
    out = {
        "video@vt": torch.randn(3, 1, 6),
        "text@vt": torch.randn(3, 2, 6),
        "video@va": torch.randn(3, 4, 6),
        "audio@va": torch.randn(3, 4, 6),
        "video/logits": torch.randn(2, 3, 4),
        "audio/logits": torch.randn(2, 3, 4),
    }
    total, terms = obj(out, {"idx": torch.tensor([0, 4, 9])})
    assert set(terms) == {"milnce", "gdt", "selflabel/video", "selflabel/audio"}
    expected = 0.5 * terms["milnce"] + 2.0 * terms["gdt"] + 0.5 * (terms["selflabel/video"] + terms["selflabel/audio"])
    torch.testing.assert_close(total, expected)
    assert "losses.selflabel.labels" in obj.state_dict()
    with pytest.raises(ConfigError, match="marginal_param"):
        from_dict(LossConfig, {"selflabel": {"marginal_param": 0.2}})
    with pytest.raises(ConfigError, match="sk_relax must be in"):
        from_dict(LossConfig, {"selflabel": {"sk_relax": 2.5}})
    assert from_dict(LossConfig, {"selflabel": {"sk_relax": 1}}).selflabel.sk_relax == 1
    with pytest.raises(ConfigError, match="hypothesis"):
        from_dict(LossConfig, {"gdt": {"hypothesis": 0}})
    with pytest.raises(ValueError, match="names no objective"):
        build_objective(LossConfig(), num_samples=10)


def two_gemv_sk(scores: torch.Tensor, lam: float, tol=0.1, max_iters=2000) -> tuple[torch.Tensor, int]:
    """The previous float32 implementation written plainly: P built whole, two full-matrix GEMVs per iteration."""
    p = (lam * (scores - scores.amax(1, keepdim=True))).clamp(min=-60.0).exp()
    n, k = p.shape
    r, beta, err, counter = torch.full((k,), 1.0 / k), torch.full((n,), 1.0 / n), 1e6, 0
    while err > tol and counter < max_iters:
        alpha = r / (beta @ p)
        beta_new = (1.0 / n) / (p @ alpha)
        if counter % 10 == 0:
            err = float((beta / beta_new - 1).abs().sum())
        beta = beta_new
        counter += 1
    return (p * alpha).argmax(1), counter


def test_fused_threaded_iteration_gives_the_two_gemv_labels_and_iterations(two_torch_threads):
    scores = sharp_scores(10_000, 30, 2.0, torch.float32)
    want, want_iters = two_gemv_sk(scores, 25.0)
    res = sinkhorn(scores, 25.0, relax=1.0)  # SeLaVi's plain iterates
    assert torch.equal(res.labels, want)
    assert res.iterations == want_iters
    assert torch.get_num_threads() == 2  # the workers' single-thread setting does not leak out


def column_marginal_error(scores: torch.Tensor, lam: float, alpha: torch.Tensor, target: torch.Tensor) -> float:
    """L1 distance of the plan's column sums to the target once every row is scaled to sum to 1/N (float64)."""
    plan = (lam * (scores - scores.amax(1, keepdim=True))).clamp(min=-60.0).exp().double() * alpha.double()
    plan = plan / plan.sum(1, keepdim=True) / scores.shape[0]
    return float((plan.sum(0) - target / target.sum()).abs().sum())


@pytest.mark.parametrize("target", [None, "zipf"])
def test_over_relaxation_reaches_the_plain_plan_in_fewer_iterations(target):
    scores = sharp_scores(20_000, 50, 3.0, torch.float32)
    r = 1 / torch.arange(1, 51.0) if target else torch.ones(50)
    plain = sinkhorn(scores, 20.0, r, relax=1.0)
    fast = sinkhorn(scores, 20.0, r)  # relax=None: the factor comes from the first iterations' rate
    assert 1 < fast.relax <= 1.8 and plain.relax == 1.0
    assert fast.iterations * 2 <= plain.iterations
    assert fast.error <= 0.1
    assert (fast.labels == plain.labels).double().mean() >= 0.9999
    assert column_marginal_error(scores, 20.0, fast.alpha, r) <= column_marginal_error(scores, 20.0, plain.alpha, r)


def test_diverging_over_relaxation_falls_back_to_the_plain_iterates(caplog):
    """relax=1.95 makes err grow on this problem; the iteration restores the last check's state and goes on plain."""
    scores = sharp_scores(10_000, 30, 2.0, torch.float32)
    target = 1 / torch.arange(1, 31.0)
    plain = sinkhorn(scores, 25.0, target, relax=1.0)
    with caplog.at_level(logging.DEBUG, logger="pipeline.losses.sinkhorn"):
        res = sinkhorn(scores, 25.0, target, relax=1.95)
    assert "relaxation off" in caplog.text
    assert res.relax == 1.0 and res.error <= 0.1 and bool(torch.isfinite(res.beta).all())
    assert torch.equal(res.labels, plain.labels)
    with pytest.raises(ValueError, match="relax must be in"):
        sinkhorn(scores, 25.0, relax=2.0)


def test_threaded_ties_use_global_row_indices_and_bad_rows_are_found_in_any_block(two_torch_threads):
    row = torch.log_softmax(torch.randn(1, 10) * 5, dim=1)
    labels = sinkhorn_knopp(row.repeat(10_003, 1), 25.0)  # blocks [0, 5001) and [5001, 10003): 5001 % 10 != 0
    assert torch.equal(labels, torch.arange(10_003) % 10)  # rotation by global row index, across both blocks
    scores = sharp_scores(10_000, 5, 1.0, torch.float32)
    scores[9_000, 2] = float("nan")  # in the second thread's block
    with pytest.raises(ValueError, match="NaN"):
        sinkhorn_knopp(scores, 20.0)
