"""Clustering: FAISS k-means or self-label heads, clustering metrics, and naming clusters from few labels.

Metrics follow SeLaVi's `clustering_metrics.py` (arithmetic NMI/aNMI, ARI, unweighted purity and entropy,
Hungarian accuracy) but are computed here from the contingency table with numpy/scipy. Entropy uses the
natural log. Hungarian accuracy allows #clusters != #classes (unmatched samples count as wrong).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import faiss
import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.special import gammaln

from eval import faiss_index

log = logging.getLogger(__name__)


def contingency(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Counts (clusters, classes) over the distinct values of `pred` and `true` (any integer labels)."""
    pred, true = np.asarray(pred).ravel(), np.asarray(true).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"pred and true differ in length: {pred.size} vs {true.size}")
    if pred.size == 0:
        raise ValueError("no samples to score")
    _, p = np.unique(pred, return_inverse=True)
    _, t = np.unique(true, return_inverse=True)
    table = np.zeros((p.max() + 1, t.max() + 1), dtype=np.int64)
    np.add.at(table, (p, t), 1)
    return table


def cluster_metrics(pred: np.ndarray, true: np.ndarray) -> dict:
    """nmi, anmi, ari, purity (sample-weighted), purity_avg / entropy_avg (unweighted over clusters), acc (%)."""
    table = contingency(pred, true)
    n = table.sum()
    a, b = table.sum(1), table.sum(0)  # cluster sizes, class sizes
    h_pred, h_true = _entropy(a), _entropy(b)
    mi = _mutual_info(table)
    mean_h = (h_pred + h_true) / 2
    eps = np.finfo(np.float64).eps
    if table.shape == (1, 1):  # one cluster, one class: the labelings agree trivially (sklearn's convention)
        nmi = anmi = 1.0
    else:
        nmi = mi / max(mean_h, eps)
        emi = expected_mutual_info(a, b)
        denom = mean_h - emi
        anmi = (mi - emi) / (min(denom, -eps) if denom < 0 else max(denom, eps))
    rows, cols = linear_sum_assignment(-table)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = table / a[:, None]
        ent = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return {
        "nmi": float(max(nmi, 0.0)),
        "anmi": float(anmi),
        "ari": _ari(table),
        "purity": float(table.max(1).sum() / n),
        "purity_avg": float((table.max(1) / a).mean()),
        "entropy_avg": float(ent.mean()),
        "acc": float(100.0 * table[rows, cols].sum() / n),
        "clusters": int(table.shape[0]),
        "classes": int(table.shape[1]),
    }


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _mutual_info(table: np.ndarray) -> float:
    n = table.sum()
    a, b = table.sum(1), table.sum(0)
    i, j = np.nonzero(table)
    nij = table[i, j].astype(np.float64)
    return float(max((nij / n * (np.log(nij * n) - np.log(a[i] * b[j].astype(np.float64)))).sum(), 0.0))


def _ari(table: np.ndarray) -> float:
    def pairs(x):
        x = x.astype(np.float64)
        return (x * (x - 1) / 2).sum()

    n = table.sum()
    s_ij, s_a, s_b = pairs(table), pairs(table.sum(1)), pairs(table.sum(0))
    expected = s_a * s_b / pairs(np.array([n]))
    top = (s_a + s_b) / 2
    return 1.0 if top == expected else float((s_ij - expected) / (top - expected))


def expected_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """E[MI] of two labelings with cluster sizes `a` and `b` under the hypergeometric (permutation) model."""
    a, b = np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)
    n = int(a.sum())
    lg_n = gammaln(n + 1)
    lg_a, lg_na = gammaln(a + 1), gammaln(n - a + 1)
    lg_b, lg_nb = gammaln(b + 1), gammaln(n - b + 1)
    emi = 0.0
    for i in range(len(a)):
        lo = np.maximum(1, a[i] + b - n)  # (J,) smallest possible overlap with each class
        hi = np.minimum(a[i], b)
        counts = np.maximum(hi - lo + 1, 0)
        if counts.sum() == 0:
            continue
        j = np.repeat(np.arange(len(b)), counts)
        nij = (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + np.repeat(lo, counts)).astype(
            np.float64
        )
        log_p = (
            lg_a[i]
            + lg_b[j]
            + lg_na[i]
            + lg_nb[j]
            - lg_n
            - gammaln(nij + 1)
            - gammaln(a[i] - nij + 1)
            - gammaln(b[j] - nij + 1)
            - gammaln(n - a[i] - b[j] + nij + 1)
        )
        term = nij / n * (np.log(n * nij) - np.log(a[i] * b[j].astype(np.float64)))
        emi += float((term * np.exp(log_p)).sum())
    return emi


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (k, D)
    assign: np.ndarray  # (N,) cluster of each point
    score: np.ndarray  # (N,) similarity (spherical) or squared distance to the assigned centroid
    objective: float
    points_used: int
    seconds: float


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    spherical: bool = True,
    niter: int = 25,
    nredo: int = 1,
    seed: int = 1234,
    max_points_per_centroid: int | None = None,
    gpu: bool | None = None,
    verbose: bool = False,
) -> KMeansResult:
    """FAISS k-means of `x` (N, D) into `k` clusters; the best of `nredo` restarts is kept.

    FAISS trains on at most k * max_points_per_centroid points (its default, 256, silently subsamples big
    corpora); here the default is ceil(N / k) so every point is used, and the number actually used is logged.
    """
    x = faiss_index.as_float32(x, "embeddings")
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}] for {n} points, got {k}")
    mppc = max_points_per_centroid or math.ceil(n / k)
    used = min(n, k * mppc)
    use_gpu = faiss_index.gpu_available() if gpu is None else gpu
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        nredo=nredo,
        seed=seed,
        spherical=spherical,
        max_points_per_centroid=mppc,
        min_points_per_centroid=1,
        gpu=bool(use_gpu),
        verbose=verbose,
    )
    log.info("k-means: %d points (%d used for training), k=%d, %d iterations x %d restarts", n, used, k, niter, nredo)
    t0 = time.time()
    objective = km.train(x)
    score, assign = km.index.search(x, 1)
    seconds = time.time() - t0
    return KMeansResult(km.centroids, assign[:, 0].astype(np.int64), score[:, 0], float(objective), used, seconds)


def heads_argmax(video_logits: np.ndarray, audio_logits: np.ndarray | None = None) -> np.ndarray:
    """Self-label clusters per head (H, N): argmax of softmax(video) * softmax(audio) as in SeLaVi."""

    def log_softmax(z):
        z = np.asarray(z, dtype=np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    score = log_softmax(video_logits)  # (H, N, K)
    if audio_logits is not None:
        score = score + log_softmax(audio_logits)
    return score.argmax(-1)


def name_clusters(assign: np.ndarray, labels: np.ndarray, method: str = "majority") -> np.ndarray:
    """A class for each cluster from the samples with a known label (labels >= 0); -1 where none is known.

    "majority": the most frequent known label in the cluster. "hungarian": a one-to-one cluster-class
    matching that maximises matched known samples (clusters left unmatched get -1).
    """
    assign, labels = np.asarray(assign), np.asarray(labels)
    k = int(assign.max()) + 1
    known = labels >= 0
    if not known.any():
        raise ValueError("no sample has a known label: cannot name clusters")
    c = int(labels.max()) + 1
    table = np.zeros((k, c), dtype=np.int64)
    np.add.at(table, (assign[known], labels[known]), 1)
    names = np.full(k, -1, dtype=np.int64)
    if method == "majority":
        seen = table.sum(1) > 0
        names[seen] = table[seen].argmax(1)
    elif method == "hungarian":
        rows, cols = linear_sum_assignment(-table)
        hit = table[rows, cols] > 0
        names[rows[hit]] = cols[hit]
    else:
        raise ValueError(f"naming method must be 'majority' or 'hungarian', got {method!r}")
    return names


def prototype_names(
    centroids: np.ndarray, x: np.ndarray, labels: np.ndarray, shots: int, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """k-shot naming: each class's prototype is the mean of `shots` random labelled embeddings; each cluster
    takes the class of the prototype nearest its centroid. Returns (names per cluster, the shot row indices).
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels[labels >= 0])
    if classes.size == 0:
        raise ValueError("no sample has a known label: cannot build prototypes")
    picked = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in classes]
    protos = np.stack([x[p].astype(np.float32).mean(0) for p in picked])  # (C, D)
    protos /= np.linalg.norm(protos, axis=1, keepdims=True) + 1e-12
    cent = centroids / (np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12)
    return classes[(cent @ protos.T).argmax(1)], np.concatenate(picked)


def naming_accuracy(
    assign: np.ndarray, names: np.ndarray, labels: np.ndarray, exclude: np.ndarray | None = None
) -> float:
    """Percent of labelled samples (outside `exclude` rows) whose cluster's name is their label."""
    labels = np.asarray(labels)
    mask = labels >= 0
    if exclude is not None:
        mask[exclude] = False
    if not mask.any():
        raise ValueError("no labelled samples left to score the naming")
    return float(100.0 * np.mean(names[np.asarray(assign)[mask]] == labels[mask]))


def cluster_sizes(assign: np.ndarray, k: int | None = None) -> dict:
    """Cluster-size distribution: min, median, max, empty clusters, and the size of every cluster."""
    sizes = np.bincount(np.asarray(assign), minlength=k or 0)
    return {
        "min": int(sizes.min()),
        "median": float(np.median(sizes)),
        "max": int(sizes.max()),
        "empty": int((sizes == 0).sum()),
        "sizes": sizes.tolist(),
    }


def cluster_embeddings(
    emb,
    *,
    space: str = "auto",
    k: int = 10,
    method: str = "kmeans",
    shots: tuple[int, ...] = (1, 10),
    seed: int = 1234,
    **kmeans_kw,
) -> tuple[dict, np.ndarray]:
    """Cluster an embedding directory's `space` (k-means) or read its self-label heads; score against labels.

    Returns (summary, assignment per row). The summary has the metrics (when labels are known), the cluster
    sizes, and naming accuracy of majority / Hungarian / k-shot prototype naming for each of `shots`. `space`
    "auto" is `eval.probe.default_video_array` (a space, else the backbone features); rows are unit vectors.
    """
    from eval.probe import default_video_array, row_array

    space = default_video_array(emb) if space == "auto" else space
    x = row_array(emb, space)
    summary: dict = {"method": method, "space": space, "rows": int(len(x))}
    if method == "kmeans":
        res = kmeans(x, k, seed=seed, **kmeans_kw)
        assign, centroids = res.assign, res.centroids
        summary.update(k=k, points_used=res.points_used, objective=res.objective, seconds=res.seconds)
    elif method == "heads":
        v = emb.arrays.get("video_logits")
        a = emb.arrays.get("audio_logits")
        if v is None and a is None:
            raise ValueError(f"{emb.root}: no video_logits.npy / audio_logits.npy (model without self-label heads)")
        logits = v if v is not None else a
        per_head = heads_argmax(logits, a if v is not None else None)  # (H, N)
        assign, centroids = per_head[0], None
        summary.update(k=int(logits.shape[-1]), heads=int(per_head.shape[0]), head=0)
    else:
        raise ValueError(f"cluster method must be 'kmeans' or 'heads', got {method!r}")
    labels, names = emb.labels()
    known = labels >= 0
    if method == "heads" and known.any():
        # SeLaVi reports the head with the best NMI against the labels; all heads are listed.
        nmis = [cluster_metrics(h[known], labels[known])["nmi"] for h in per_head]
        best = int(np.argmax(nmis))
        assign, summary["head"], summary["head_nmi"] = per_head[best], best, nmis
    summary["sizes"] = cluster_sizes(assign, summary["k"])  # of the head reported
    if known.any():
        summary["metrics"] = cluster_metrics(assign[known], labels[known])
        summary["naming"], skipped = _naming(assign, labels, x, centroids, shots, seed)
        if skipped:
            summary["naming_skipped"] = skipped
        summary["labelled"] = int(known.sum())
    summary["label_names"] = names
    return summary, assign


def _naming(assign, labels, x, centroids, shots, seed) -> tuple[dict, dict[str, str]]:
    """Naming accuracy with every label ("all", an upper bound) and with `s` labelled shots per class; and the
    k-shot namings skipped, with why."""
    out = {"all": {m: naming_accuracy(assign, name_clusters(assign, labels, m), labels) for m in NAMINGS}}
    skipped: dict[str, str] = {}
    if centroids is None:  # self-label heads: use the mean of each cluster's members
        k = int(assign.max()) + 1
        empty = np.zeros(x.shape[1], dtype=np.float32)
        centroids = np.stack([x[assign == c].mean(0) if (assign == c).any() else empty for c in range(k)])
    for s in shots:
        names, used = prototype_names(centroids, x, labels, s, seed=seed)
        left = np.ones(len(labels), dtype=bool)
        left[used] = False
        if not (left & (labels >= 0)).any():
            why = f"every labelled video is one of the {s} shots of its class: none left to score on"
            log.warning("%d-shot naming skipped: %s", s, why)
            skipped[f"{s}-shot"] = why
            continue
        few = np.full_like(labels, -1)
        few[used] = labels[used]
        got = {m: naming_accuracy(assign, name_clusters(assign, few, m), labels, exclude=used) for m in NAMINGS}
        got["prototype"] = naming_accuracy(assign, names, labels, exclude=used)
        out[f"{s}-shot"] = got
    return out, skipped


NAMINGS = ("majority", "hungarian")


def write_assignments(emb, assign: np.ndarray, path, names: dict[int, str] | None = None) -> None:
    """One JSON line per video: row, idx, id, label, cluster (and the cluster's name when given)."""
    import json

    with open(path, "w", encoding="utf-8") as f:
        for m, c in zip(emb.meta, assign.tolist()):
            row = {"row": m.get("row"), "idx": m["idx"], "id": m.get("id"), "label": m.get("label"), "cluster": c}
            if names is not None:
                row["name"] = names.get(c)
            f.write(json.dumps(row) + "\n")
