"""kNN classifier and linear probe on frozen features: separable data is learned, shuffled labels are not."""

from __future__ import annotations

import numpy as np
import pytest

from eval.probe import knn_classifier, linear_probe, split_train_test


def blobs(n_per=40, k=4, d=12, seed=0, noise=0.3):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d))
    y = np.repeat(np.arange(k), n_per)
    x = (centres[y] + noise * rng.standard_normal((len(y), d))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, y


@pytest.mark.parametrize("classifier", [knn_classifier, linear_probe])
def test_separable_classes_are_learned(classifier):
    x, y = blobs()
    train, test = split_train_test(np.arange(len(y)), 0.3, seed=0)
    assert classifier(x[train], y[train], x[test], y[test]) >= 95.0


@pytest.mark.parametrize("classifier", [knn_classifier, linear_probe])
def test_shuffled_labels_score_near_chance(classifier):
    x, y = blobs(n_per=60, seed=1)
    rng = np.random.default_rng(0)
    y = rng.permutation(y)
    train, test = split_train_test(np.arange(len(y)), 0.5, seed=0)
    assert classifier(x[train], y[train], x[test], y[test]) < 50.0  # chance is 25%


def test_linear_probe_beats_knn_on_a_linear_boundary_knn_struggles_with():
    # two classes split by the sign of one coordinate, buried among noisy dimensions
    rng = np.random.default_rng(3)
    x = rng.standard_normal((400, 20)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    x[:, 0] *= 0.3
    train, test = split_train_test(np.arange(400), 0.5, seed=1)
    lin = linear_probe(x[train], y[train], x[test], y[test])
    knn = knn_classifier(x[train], y[train], x[test], y[test], k=5)
    assert lin >= 90.0 and lin > knn


def test_split_is_deterministic_and_disjoint():
    a_train, a_test = split_train_test(np.arange(10), 0.3, seed=4)
    b_train, b_test = split_train_test(np.arange(10), 0.3, seed=4)
    np.testing.assert_array_equal(a_test, b_test)
    assert len(a_test) == 3 and set(a_train).isdisjoint(a_test) and len(a_train) + len(a_test) == 10


def test_unlabelled_rows_are_rejected():
    x, y = blobs(n_per=5)
    y[0] = -1
    with pytest.raises(ValueError, match=">= 0"):
        knn_classifier(x, y, x, np.abs(y))


def test_gallery_keeps_distractor_classes_absent_from_the_test_split():
    """A gallery-only class must stay in the gallery: its videos can steal a query's nearest neighbour."""
    from pathlib import Path

    from eval.embed import Embeddings
    from eval.probe import evaluate_classes

    def emb(x, names):
        meta = [{"row": i, "idx": i, "id": f"v{i}", "label": n} for i, n in enumerate(names)]
        return Embeddings(Path("mem"), meta, {"video@vt": x}, np.zeros(0, dtype=np.int64))

    e = np.eye(4, dtype=np.float32)
    # Test queries are class "a" and sit right next to the gallery's "z" videos (a class the test split lacks).
    test = emb(np.stack([e[0] + 0.1 * e[1], e[0] + 0.1 * e[2]]), ["a", "a"])
    near = np.stack([e[0], e[0]])  # "z": identical to the queries' main direction
    far = np.stack([0.6 * e[0] + 0.8 * e[1], 0.6 * e[0] + 0.8 * e[2]])  # "a": further away
    train = emb(np.concatenate([near, far]), ["z", "z", "a", "a"])
    out = evaluate_classes(test, train, knn_k=1)
    assert out["classes"] == {"count": 2, "train": 4, "test": 2}
    assert out["video->video"]["R@1"] == 0.0 and out["video->video"]["R@5"] == 100.0
    assert out["knn"]["top1"] == 0.0
