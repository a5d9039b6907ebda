"""Clustering metrics against scikit-learn, k-means on planted clusters, and cluster naming from few labels."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from eval.clustering import (
    cluster_metrics,
    cluster_sizes,
    heads_argmax,
    kmeans,
    name_clusters,
    naming_accuracy,
    prototype_names,
)


@pytest.mark.parametrize("n, k_pred, k_true, seed", [(50, 3, 3, 0), (200, 7, 4, 1), (500, 12, 12, 2), (30, 1, 5, 3)])
def test_metrics_match_sklearn_on_random_labelings(n, k_pred, k_true, seed):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k_true, n)
    # half the samples copy their class (so scores are not all near zero), the rest are random
    pred = np.where(rng.random(n) < 0.5, true % k_pred, rng.integers(0, k_pred, n)) + 10
    got = cluster_metrics(pred, true)
    assert got["nmi"] == pytest.approx(skm.normalized_mutual_info_score(true, pred), abs=1e-10)
    assert got["anmi"] == pytest.approx(skm.adjusted_mutual_info_score(true, pred), abs=1e-8)
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(true, pred), abs=1e-10)
    table = skm.cluster.contingency_matrix(pred, true)
    assert got["purity"] == pytest.approx(table.max(1).sum() / n)


def test_purity_entropy_and_hungarian_by_hand():
    # cluster 0: classes [a, a, b] ; cluster 1: [b, b, b, b] ; cluster 2: [c]
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 2])
    true = np.array([0, 0, 1, 1, 1, 1, 1, 2])
    got = cluster_metrics(pred, true)
    assert got["purity"] == pytest.approx(7 / 8)
    assert got["purity_avg"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    h0 = -(2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert got["entropy_avg"] == pytest.approx(h0 / 3)
    assert got["acc"] == pytest.approx(100 * 7 / 8)


def test_hungarian_is_one_to_one_not_majority():
    # both clusters are mostly class 0; a one-to-one map must send one of them to class 1
    pred = np.array([0, 0, 0, 1, 1, 1])
    true = np.array([0, 0, 1, 0, 0, 1])
    got = cluster_metrics(pred, true)
    assert got["acc"] == pytest.approx(100 * 3 / 6)
    assert got["purity"] == pytest.approx(4 / 6)


def test_perfect_and_permuted_labelings_score_one():
    true = np.repeat(np.arange(5), 10)
    got = cluster_metrics((true * 3 + 1) % 5, true)
    for key in ("nmi", "anmi", "ari", "purity", "purity_avg"):
        assert got[key] == pytest.approx(1.0)
    assert got["acc"] == pytest.approx(100.0)
    assert got["entropy_avg"] == pytest.approx(0.0)


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="differ in length"):
        cluster_metrics(np.zeros(3), np.zeros(4))


def planted(n_per=60, k=6, d=16, seed=0, noise=0.15):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(k), n_per)
    x = centres[labels] + noise * rng.standard_normal((len(labels), d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_recovers_planted_clusters_and_uses_every_point(spherical):
    x, labels = planted()
    res = kmeans(x, 6, spherical=spherical, nredo=3, seed=1, gpu=False)
    assert res.points_used == len(x)
    assert cluster_metrics(res.assign, labels)["acc"] == pytest.approx(100.0)
    assert res.centroids.shape == (6, 16)
    assert cluster_sizes(res.assign, 6)["min"] == 60


def test_kmeans_subsampling_is_reported():
    x, _ = planted()
    res = kmeans(x, 6, max_points_per_centroid=20, gpu=False)
    assert res.points_used == 120


def test_kmeans_same_seed_same_result():
    x, _ = planted(seed=3)
    a = kmeans(x, 6, seed=7, gpu=False)
    b = kmeans(x, 6, seed=7, gpu=False)
    np.testing.assert_array_equal(a.assign, b.assign)


def test_kmeans_rejects_k_larger_than_points():
    with pytest.raises(ValueError, match="k must be"):
        kmeans(np.zeros((3, 4), dtype=np.float32), 5)


def test_heads_argmax_combines_modalities():
    v = np.log(np.array([[[0.6, 0.4], [0.5, 0.5]]]))  # (H=1, N=2, K=2)
    a = np.log(np.array([[[0.1, 0.9], [0.2, 0.8]]]))
    np.testing.assert_array_equal(heads_argmax(v), [[0, 0]])
    np.testing.assert_array_equal(heads_argmax(v, a), [[1, 1]])


def test_naming_from_few_labels():
    x, labels = planted(n_per=40, k=4, seed=5)
    res = kmeans(x, 4, nredo=2, gpu=False)
    few = np.full_like(labels, -1)
    rng = np.random.default_rng(0)
    for c in range(4):  # 2 labelled samples per class
        few[rng.choice(np.flatnonzero(labels == c), 2, replace=False)] = c
    for method in ("majority", "hungarian"):
        names = name_clusters(res.assign, few, method)
        assert naming_accuracy(res.assign, names, labels) == pytest.approx(100.0)
    names, shots = prototype_names(res.centroids, x, labels, shots=1, seed=0)
    assert len(shots) == 4
    assert naming_accuracy(res.assign, names, labels, exclude=shots) == pytest.approx(100.0)


def test_majority_naming_can_repeat_a_class_hungarian_cannot():
    assign = np.array([0, 0, 1, 1])
    labels = np.array([0, 0, 0, 1])
    assert name_clusters(assign, labels, "majority").tolist() == [0, 0]
    assert sorted(name_clusters(assign, labels, "hungarian").tolist()) == [0, 1]


def in_memory_embeddings(x, labels, **arrays):
    from pathlib import Path

    from eval.embed import Embeddings

    meta = [{"row": i, "idx": i, "id": f"v{i}", "label": f"c{y}"} for i, y in enumerate(labels)]
    return Embeddings(Path("mem"), meta, {"video@vt": x, **arrays}, np.zeros(0, dtype=np.int64))


def test_cluster_embeddings_heads_picks_the_head_that_matches_the_labels():
    from eval.clustering import cluster_embeddings

    x, labels = planted(n_per=20, k=3)
    rng = np.random.default_rng(0)
    random_head = rng.standard_normal((len(labels), 3))
    good_head = 5.0 * np.eye(3)[(labels + 1) % 3]  # a permutation of the classes
    logits = np.stack([random_head, good_head])  # (H=2, N, K)
    summary, assign = cluster_embeddings(in_memory_embeddings(x, labels, video_logits=logits), method="heads")
    assert summary["head"] == 1 and summary["heads"] == 2
    assert summary["metrics"]["acc"] == pytest.approx(100.0)
    np.testing.assert_array_equal(assign, (labels + 1) % 3)


def test_cluster_embeddings_kmeans_reports_points_and_few_shot_naming():
    from eval.clustering import cluster_embeddings

    x, labels = planted(n_per=30, k=4, seed=2)
    summary, assign = cluster_embeddings(in_memory_embeddings(x, labels), k=4, nredo=2, shots=(1, 10), gpu=False)
    assert summary["points_used"] == len(x) and summary["sizes"]["min"] == 30
    for shots in ("1-shot", "10-shot"):
        assert set(summary["naming"][shots]) == {"majority", "hungarian", "prototype"}
        assert summary["naming"][shots]["prototype"] == pytest.approx(100.0)
    assert summary["naming"]["all"]["hungarian"] == pytest.approx(100.0)


def test_cluster_embeddings_heads_sizes_and_k_describe_the_reported_head():
    from eval.clustering import cluster_embeddings

    x, labels = planted(n_per=20, k=3)
    lopsided = 5.0 * np.eye(5)[np.zeros(len(labels), dtype=int)]  # head 0: everything in cluster 0 of K=5
    good = 5.0 * np.eye(5)[labels]  # head 1: the classes, in clusters 0..2 of K=5
    summary, _ = cluster_embeddings(
        in_memory_embeddings(x, labels, video_logits=np.stack([lopsided, good])), method="heads"
    )
    assert summary["head"] == 1
    assert summary["k"] == 5  # from the logits, not from the largest cluster used
    assert summary["sizes"]["sizes"] == [20, 20, 20, 0, 0] and summary["sizes"]["empty"] == 2


def test_k_shot_naming_skipped_for_small_classes_is_logged_and_reported(caplog):
    from eval.clustering import cluster_embeddings

    x, labels = planted(n_per=5, k=3, seed=3)
    with caplog.at_level("WARNING", logger="eval.clustering"):
        summary, _ = cluster_embeddings(in_memory_embeddings(x, labels), k=3, shots=(1, 10), gpu=False)
    assert "1-shot" in summary["naming"] and "10-shot" not in summary["naming"]
    assert "10-shot" in summary["naming_skipped"] and "none left to score" in summary["naming_skipped"]["10-shot"]
    assert any("10-shot naming skipped" in r.getMessage() for r in caplog.records)
