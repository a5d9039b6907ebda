"""Frozen-feature classifiers: a weighted kNN classifier (FAISS) and a linear probe (torch, full batch).

Both take L2-normalised embeddings with integer labels (>= 0) and return top-1 accuracy in percent.
MIL-NCE's HMDB protocol's linear SVM is scikit-learn's LinearSVC(C=100) on backbone features (`linear_svm`, the
same solver); the linear probe is a multinomial logistic regression fitted with L-BFGS, see docs/evaluation.md.
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
    exclude_self: bool = False,
) -> float:
    """Top-1 accuracy (%) of a kNN vote: each of the k nearest training items votes exp(sim / temperature).

    `exclude_self` (test == train, leave-one-out): each query's own row does not vote.
    """
    train_y, test_y = _check_labels(train_x, train_y, "train"), _check_labels(test_x, test_y, "test")
    k = min(k, len(train_x) - int(exclude_self))
    if k < 1:
        raise ValueError("kNN needs at least one other labelled item")
    sims, ids = faiss_index.knn(test_x, train_x, k + int(exclude_self))  # (Q, k or k + 1)
    if exclude_self:
        keep = ids != np.arange(len(test_x))[:, None]
        keep[keep.all(1), -1] = False  # a query not found among its own neighbours (ties): drop the farthest
        sims, ids = sims[keep].reshape(len(test_x), k), ids[keep].reshape(len(test_x), k)
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


def linear_svm(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    C: float = 100.0,
    max_iter: int = 1000,
    seed: int = 0,
) -> tuple[np.ndarray, dict]:
    """Decision values `(N_test, classes)` of the one-vs-rest linear SVM of MIL-NCE's HMDB protocol, and how its
    fit went (`solver`, `C`, `iterations`, `converged`, `objective`).

    The official configuration: scikit-learn's `LinearSVC(C=100)` with liblinear's dual coordinate descent for
    at most 1,000 iterations (the solver `eval_hmdb.py` ran; `dual` is pinned since scikit-learn's default
    changed to the primal for N > D), squared hinge loss, L2 penalty on the weights and on the intercept (a
    feature of value 1). Its coordinate order is seeded (`seed`) where the official script's was not. Even when
    liblinear stops before its tolerance its decisions are those of the optimum (measured: 100 % of test videos
    against a 50,000-iteration fit; an L-BFGS primal fit stopped at 500 iterations agreed on 77 %), so
    `converged` False is reported, not fatal. `objective` is the primal 0.5 |[W, b]|^2 + C sum(hinge^2).

    Features are used as given (MIL-NCE feeds raw mixed_5c features); `test_x` may hold several windows of a
    video, whose decision values the caller sums.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    y = _check_labels(train_x, train_y, "train")
    if len(np.unique(y)) < 2:
        raise ValueError(f"the linear SVM needs at least two classes in the training split, got {np.unique(y)}")
    svm = LinearSVC(C=C, loss="squared_hinge", dual=True, max_iter=max_iter, random_state=seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        svm.fit(np.asarray(train_x, dtype=np.float64), y)
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    w = np.atleast_2d(svm.coef_)  # (classes, D); one row for two classes (the second against the first)
    b = np.atleast_1d(svm.intercept_)
    if len(svm.classes_) == 2:
        w, b = np.concatenate([-w, w]), np.concatenate([-b, b])
    scores = np.full((len(test_x), int(y.max()) + 1), -np.inf)
    scores[:, svm.classes_] = np.asarray(test_x, dtype=np.float64) @ w.T + b  # (N_test, classes)
    info = {"solver": "liblinear dual coordinate descent (LinearSVC)", "C": C, "max_iter": max_iter}
    info.update(iterations=int(np.max(svm.n_iter_)), converged=converged, objective=_svm_objective(train_x, y, svm, C))
    if not converged:
        log.info(
            "linear SVM: liblinear stopped at %d iterations before its tolerance (as the official script's)", max_iter
        )
    return scores, info


def _svm_objective(x: np.ndarray, y: np.ndarray, svm, C: float) -> float:
    """The primal objective summed over the one-vs-rest problems (`LinearSVC` with intercept_scaling 1)."""
    x = np.asarray(x, dtype=np.float64)
    total = 0.0
    pairs = [(svm.classes_[1], svm.coef_[0], svm.intercept_[0])] if len(svm.classes_) == 2 else []
    pairs = pairs or list(zip(svm.classes_, svm.coef_, svm.intercept_))
    for c, w, b in pairs:
        target = np.where(y == c, 1.0, -1.0)
        hinge = np.maximum(0.0, 1.0 - target * (x @ w + b))
        total += 0.5 * (w @ w + b * b) + C * float(hinge @ hinge)
    return float(total)


def linear_svm_scores(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, *, C: float = 100.0, max_iter: int = 1000
) -> np.ndarray:
    """The decision values of `linear_svm` alone."""
    return linear_svm(train_x, train_y, test_x, C=C, max_iter=max_iter)[0]


def cross_validated_probe(x: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0) -> float:
    """Top-1 accuracy (%) of `linear_probe` over `folds` folds of a seeded permutation: every labelled item is
    predicted once by a probe fitted on the other folds (for a test split without a training gallery)."""
    y = _check_labels(x, y, "cross-validation")
    folds = min(folds, len(y))
    if folds < 2:
        raise ValueError("cross-validation needs at least two labelled items")
    parts = np.array_split(np.random.default_rng(seed).permutation(len(y)), folds)
    correct = 0.0
    for part in parts:
        rest = np.setdiff1d(np.arange(len(y)), part)
        correct += linear_probe(x[rest], y[rest], x[part], y[part]) * len(part) / 100.0
    return float(100.0 * correct / len(y))


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero): embeddings are stored normalised, backbone features not."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def default_video_array(emb) -> str:
    """The array class protocols and k-means use unless told: `video@vt`, else the first `video@<space>`, else the
    backbone features `video_feat` (then `audio_feat`), so every objective's embedding has one."""
    spaces = sorted(n for n in emb.arrays if n.startswith("video@") and not n.endswith(".windows"))
    for name in ["video@vt", *spaces, "video_feat", "audio_feat"]:
        if name in emb.arrays:
            return name
    raise ValueError(f"{emb.root}: no video or audio array to use (have: {', '.join(sorted(emb.arrays)) or 'none'})")


def row_array(emb, name: str) -> np.ndarray:
    """`name` as unit rows, one per video row; a clear error for arrays that are not (captions, head logits)."""
    if name == "auto":
        name = default_video_array(emb)
    x = emb.get(name)
    if x.ndim != 2:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, not one vector per video"
            + (": these are self-label head logits, cluster them with method=heads" if name.endswith("_logits") else "")
        )
    if len(x) != len(emb.meta):
        raise ValueError(
            f"{name} has {len(x)} rows but the embedding has {len(emb.meta)} videos (labels are per video): "
            "use a video or audio array (video@<space>, audio@<space>, video_feat, audio_feat)"
        )
    return unit_rows(x)


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


def evaluate_classes(test, train=None, *, space: str = "auto", knn_k: int = 20, seed: int = 0) -> dict:
    """Video->video class retrieval (R@1/5/10/20/50), kNN and linear-probe accuracy from labelled embeddings.

    `test` queries a `train` gallery (both Embeddings); labels are coded over the union of both splits' class
    names, so gallery videos of classes absent from the test split stay in as distractors. Without `train`,
    every labelled video of `test` is used: class retrieval and kNN leave each query out of its own gallery,
    the linear probe is 5-fold cross-validated (a 60-video split then still gives a number worth reading).
    `space` "auto" is `default_video_array`; rows are compared as unit vectors.
    """
    from eval.retrieval import class_retrieval

    space = default_video_array(test) if space == "auto" else space
    names = test.labels()[1]
    if train is not None:
        names = sorted(set(names) | set(train.labels()[1]))
    y_test, _ = test.labels(names)
    x_test = row_array(test, space)
    keep = y_test >= 0
    x_test, y_test = x_test[keep], y_test[keep]
    if train is None:
        if len(y_test) < 2:
            raise ValueError(f"{test.root}: class evaluation needs at least two labelled videos, has {len(y_test)}")
        out = {"video->video": class_retrieval(x_test, y_test, x_test, y_test, exclude_self=True)}
        top1 = knn_classifier(x_test, y_test, x_test, y_test, k=knn_k, exclude_self=True)
        out["knn"] = {"top1": top1, "k": min(knn_k, len(y_test) - 1)}
        out["linear"] = {"top1": cross_validated_probe(x_test, y_test, seed=seed), "folds": min(5, len(y_test))}
        out["classes"] = {"count": len(names), "videos": int(len(y_test)), "protocol": "leave-one-out", "space": space}
        return out
    y_train, _ = train.labels(names)
    x_train = row_array(train, space)
    keep = y_train >= 0
    x_train, y_train = x_train[keep], y_train[keep]
    if len(x_test) == 0 or len(x_train) == 0:
        raise ValueError(f"{test.root}: not enough labelled videos for class evaluation")
    out = {"video->video": class_retrieval(x_test, y_test, x_train, y_train)}
    out["knn"] = {"top1": knn_classifier(x_train, y_train, x_test, y_test, k=knn_k), "k": knn_k}
    out["linear"] = {"top1": linear_probe(x_train, y_train, x_test, y_test)}
    out["classes"] = {
        "count": len(names),
        "train": int(len(x_train)),
        "test": int(len(x_test)),
        "protocol": "gallery",
        "space": space,
    }
    return out
