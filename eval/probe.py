"""Frozen-feature classifiers: a weighted kNN classifier (FAISS) and a linear probe (torch, full batch).

Both take L2-normalised embeddings with integer labels (>= 0) and return top-1 accuracy in percent.
MIL-NCE's HMDB protocol uses sklearn's LinearSVC(C=100) on backbone features; this linear probe is a
multinomial logistic regression fitted with L-BFGS (no scikit-learn at run time), see docs/evaluation.md.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from eval import faiss_index

log = logging.getLogger(__name__)


def knn_classifier(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy (%) of a kNN vote: each of the k nearest training items votes exp(sim / temperature)."""
    train_y, test_y = _check_labels(train_x, train_y, "train"), _check_labels(test_x, test_y, "test")
    k = min(k, len(train_x))
    sims, ids = faiss_index.knn(test_x, train_x, k)  # (Q, k)
    classes = int(max(train_y.max(), test_y.max())) + 1
    votes = np.zeros((len(test_x), classes))
    weights = np.exp((sims - sims[:, :1]) / temperature)  # shifted by each row's best: same vote, no overflow
    np.add.at(votes, (np.repeat(np.arange(len(test_x)), k), train_y[ids].ravel()), weights.ravel())
    return float(100.0 * np.mean(votes.argmax(1) == test_y))


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> float:
    """Top-1 accuracy (%) of a softmax linear classifier on frozen features (L-BFGS, L2 penalty)."""
    train_y, test_y = _check_labels(train_x, train_y, "train"), _check_labels(test_x, test_y, "test")
    x = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    y = torch.as_tensor(train_y)
    classes = int(max(train_y.max(), test_y.max())) + 1
    mean, std = x.mean(0), x.std(0) + 1e-6  # standardise: the penalty then treats every dimension alike
    layer = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")
    xs = (x - mean) / std

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(xs), y) + weight_decay * layer.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        pred = layer((torch.as_tensor(np.asarray(test_x, dtype=np.float32)) - mean) / std).argmax(1).numpy()
    return float(100.0 * np.mean(pred == test_y))


def split_train_test(idx: np.ndarray, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic row split (train rows, test rows) by a seeded permutation of sample idx."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    order = np.random.default_rng(seed).permutation(len(idx))
    n_test = max(1, int(round(test_fraction * len(idx))))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _check_labels(x: np.ndarray, y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y, dtype=np.int64)
    if len(y) != len(x):
        raise ValueError(f"{name}: {len(x)} embeddings but {len(y)} labels")
    if len(y) == 0:
        raise ValueError(f"{name}: no labelled samples")
    if y.min() < 0:
        raise ValueError(f"{name}: labels must be >= 0 (drop unlabelled rows first)")
    return y


def evaluate_classes(test, train=None, *, space: str = "video@vt", knn_k: int = 20, seed: int = 0) -> dict:
    """Video->video class retrieval (R@1/5/10/20/50), kNN and linear-probe accuracy from labelled embeddings.

    `test` queries a `train` gallery (both Embeddings); labels are coded over the union of both splits' class
    names, so gallery videos of classes absent from the test split stay in as distractors. Without `train`,
    the labelled rows of `test` are split 70/30 by a seeded permutation.
    """
    from eval.retrieval import class_retrieval

    names = test.labels()[1]
    if train is not None:
        names = sorted(set(names) | set(train.labels()[1]))
    y_test, _ = test.labels(names)
    x_test = test.get(space)
    if train is None:
        have = np.flatnonzero(y_test >= 0)
        tr, te = split_train_test(have, 0.3, seed)
        x_train, y_train, x_test, y_test = x_test[have[tr]], y_test[have[tr]], x_test[have[te]], y_test[have[te]]
    else:
        y_train, _ = train.labels(names)
        x_train = train.get(space)
        keep = y_train >= 0
        x_train, y_train = x_train[keep], y_train[keep]
        keep = y_test >= 0
        x_test, y_test = x_test[keep], y_test[keep]
    if len(x_test) == 0 or len(x_train) == 0:
        raise ValueError(f"{test.root}: not enough labelled videos for class evaluation")
    out = {"video->video": class_retrieval(x_test, y_test, x_train, y_train)}
    out["knn"] = {"top1": knn_classifier(x_train, y_train, x_test, y_test, k=knn_k), "k": knn_k}
    out["linear"] = {"top1": linear_probe(x_train, y_train, x_test, y_test)}
    out["classes"] = {"count": len(names), "train": int(len(x_train)), "test": int(len(x_test))}
    return out
