"""Retrieval metrics: R@K (percent), MedR and MnR (1-based ranks), with several correct items per query.

The rank of a query is 1 + the number of *incorrect* gallery items that score at least as high as its best
correct item. Counting ties against the query is the pessimistic convention: a collapsed model (every
score equal) ranks every query last and scores near chance, never perfectly. CLIP4Clip instead returns every
tied position, and MIL-NCE reports fractions; see docs/evaluation.md.

Two ways to rank embeddings:
- "exact" (default): every query's score row is computed in chunks (torch matmul, on the GPU when available)
  and counted, so MedR/MnR are exact and the (Q x G) matrix never exists in full.
- "flat" / "ivf": FAISS top-k search; a query whose best correct item is not provably inside the top k is
  censored at rank k+1 (pessimistic). R@K is exact for K <= k with "flat"; MnR is then not reported.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from tqdm import tqdm

from eval import faiss_index

log = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
# Embedding scores within TIE of each other are ties: float32 kernels can round the dot products of identical
# vectors differently (vectorised body vs tail columns), which would otherwise let a collapsed model win ties.
TIE = 1e-5
CLASS_RECALL_KS = (1, 5, 10, 20, 50)


def retrieval_metrics(sim: np.ndarray, gt: Sequence[np.ndarray] | None = None) -> dict:
    """Metrics of a full similarity matrix `sim` (Q, G); gt[i] lists query i's correct gallery items.

    gt=None means query i's answer is gallery item i; a 1-D integer array gives one answer per query.
    Returns R@1, R@5, R@10 (percent), MedR, MnR (1-based).
    """
    sim = np.asarray(sim)
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (queries, gallery), got shape {sim.shape}")
    if not np.isfinite(sim).all():
        raise ValueError("sim contains NaN or inf scores (a diverged model?)")
    ptr, idx = gt_to_csr(gt, *sim.shape)
    return metrics_from_ranks(_count_ranks(torch.from_numpy(sim.astype(np.float64)), ptr, idx, 0).numpy())


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = RECALL_KS, censored_at: int | None = None) -> dict:
    """R@K (percent), MedR and MnR from 1-based ranks; with `censored_at`, ranks above it are unknown."""
    ranks = np.asarray(ranks, dtype=np.float64)
    if ranks.size == 0:
        raise ValueError("no queries to score")
    out = {f"R@{k}": float(100.0 * np.mean(ranks <= k)) for k in ks}
    if censored_at is not None:  # a censored rank (k+1) says nothing about R@K for K > k
        out.update({f"R@{k}": None for k in ks if k > censored_at})
    out["MedR"] = float(np.median(ranks))
    out["MnR"] = float(np.mean(ranks))
    out["queries"] = int(ranks.size)
    if censored_at is not None:
        censored = int((ranks > censored_at).sum())
        out["censored"] = censored
        # Censored ranks are stand-ins (k+1); a median that lands on one, and any mean, would be invented.
        if out["MedR"] > censored_at:
            out["MedR"] = None
        if censored:
            out["MnR"] = None
    return out


def gt_to_csr(gt: Sequence[np.ndarray] | None, num_queries: int, num_gallery: int) -> tuple[np.ndarray, np.ndarray]:
    """(ptr, idx): query i's correct items are idx[ptr[i]:ptr[i+1]]; validated against the gallery size."""
    if gt is None:
        if num_queries > num_gallery:
            raise ValueError(f"gt=None needs queries <= gallery items, got {num_queries} > {num_gallery}")
        return np.arange(num_queries + 1, dtype=np.int64), np.arange(num_queries, dtype=np.int64)
    if len(gt) != num_queries:
        raise ValueError(f"gt has {len(gt)} entries for {num_queries} queries")
    if isinstance(gt, np.ndarray) and gt.ndim == 1 and np.issubdtype(gt.dtype, np.integer):
        counts, idx = np.ones(num_queries, dtype=np.int64), gt.astype(np.int64)  # one answer per query
    else:
        # A repeated answer would count twice as "correct" and push the rank below 1.
        lists = [np.unique(np.asarray(g, dtype=np.int64)) for g in gt]
        counts = np.array([len(g) for g in lists], dtype=np.int64)
        if (counts == 0).any():
            raise ValueError(f"query {int(np.argmin(counts))} has no correct gallery item")
        idx = np.concatenate(lists) if lists else np.zeros(0, dtype=np.int64)
    if idx.size == 0:
        return np.zeros(1, dtype=np.int64), idx
    if idx.min() < 0 or idx.max() >= num_gallery:
        raise ValueError(f"gt index out of range [0, {num_gallery}): {int(idx.min())}..{int(idx.max())}")
    return np.concatenate([[0], np.cumsum(counts)]), idx


def retrieval_ranks(
    queries: np.ndarray,
    gallery: np.ndarray,
    gt: Sequence[np.ndarray] | None = None,
    *,
    method: str = "exact",
    k: int = 100,
    device: str | None = None,
    memory_mb: int = 512,
    progress: bool = True,
    **ivf,
) -> np.ndarray:
    """1-based pessimistic ranks of each query's best correct gallery item, from embeddings (Q, D), (G, D).

    "exact" counts over full score rows in chunks sized to `memory_mb`; "flat"/"ivf" use FAISS top-`k` and
    censor at k+1 (see the module docstring).
    """
    queries = faiss_index.as_float32(queries, "queries")
    gallery = faiss_index.as_float32(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(f"query dim {queries.shape[1]} != gallery dim {gallery.shape[1]}")
    ptr, idx = gt_to_csr(gt, len(queries), len(gallery))
    if method == "exact":
        return _exact_ranks(queries, gallery, ptr, idx, device, memory_mb, progress)
    if method in ("flat", "ivf"):
        return _topk_ranks(queries, gallery, ptr, idx, method, k, **ivf)
    raise ValueError(f"retrieval method must be 'exact', 'flat' or 'ivf', got {method!r}")


def _count_ranks(sim: torch.Tensor, ptr: np.ndarray, idx: np.ndarray, row0: int, tie: float = 0.0) -> torch.Tensor:
    """Ranks for the score rows `sim` (C, G) of queries row0..row0+C; scores within `tie` of the best correct
    one count against the query."""
    c = sim.shape[0]
    lo, hi = ptr[row0], ptr[row0 + c]
    rows = torch.from_numpy(np.repeat(np.arange(c), np.diff(ptr[row0 : row0 + c + 1]))).to(sim.device)
    cols = torch.from_numpy(idx[lo:hi]).to(sim.device)
    # Correct scores are read from the same matrix, so a tie with an incorrect item is bit-exact.
    vals = sim[rows, cols]  # (nnz,)
    best = torch.full((c,), -torch.inf, dtype=sim.dtype, device=sim.device).scatter_reduce(0, rows, vals, "amax")
    at_least = (sim >= best[:, None] - tie).sum(dim=1)  # (C,) items scoring >= the best correct one
    hits = (vals >= best[rows] - tie).long()
    correct = torch.zeros(c, dtype=at_least.dtype, device=sim.device).index_add_(0, rows, hits)
    return (1 + at_least - correct).cpu()


def _exact_ranks(queries, gallery, ptr, idx, device, memory_mb, progress) -> np.ndarray:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.from_numpy(gallery).to(device)
    # Each chunk holds a float score row and a bool comparison row per query: ~5 bytes per item, ~2x headroom.
    chunk = max(1, min(len(queries), memory_mb * 2**20 // (10 * len(gallery))))
    ranks = np.empty(len(queries), dtype=np.int64)
    starts = range(0, len(queries), chunk)
    for s in tqdm(starts, desc="rank", unit="chunk", disable=not progress or len(starts) < 2):
        q = torch.from_numpy(queries[s : s + chunk]).to(device)
        ranks[s : s + chunk] = _count_ranks(q @ g.T, ptr, idx, s, TIE).numpy()  # (chunk, G) scores
    return ranks


def _topk_ranks(queries, gallery, ptr, idx, method, k, **ivf) -> np.ndarray:
    k = min(k, len(gallery))
    index = faiss_index.build_index(gallery, kind=method, **ivf)
    scores, ids = faiss_index.search(index, queries, k, progress=True)  # (Q, k) each
    ranks = np.empty(len(queries), dtype=np.int64)
    for i in range(len(queries)):
        correct = idx[ptr[i] : ptr[i + 1]]
        listed = np.isin(ids[i], correct)
        # A listed correct item's score comes from the same kernel as its neighbours', so ties stay exact.
        best = float(scores[i][listed].max()) if listed.any() else float((gallery[correct] @ queries[i]).max())
        wrong = ~listed & (ids[i] >= 0)
        listed_all = scores[i, -1] < best - TIE or ids[i, -1] < 0 or len(gallery) == k
        ranks[i] = 1 + int((scores[i][wrong] >= best - TIE).sum()) if listed_all else k + 1
    return ranks


def class_retrieval(
    queries: np.ndarray,
    query_labels: np.ndarray,
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int] = CLASS_RECALL_KS,
    *,
    exclude_self: bool = False,
) -> dict:
    """Video->video class retrieval (GDT/SeLaVi protocol): R@k = % of queries with a same-class video among
    their k nearest gallery videos. With `exclude_self` (queries == gallery) each query's own row is skipped.
    """
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    if len(query_labels) != len(queries) or len(gallery_labels) != len(gallery):
        raise ValueError("labels must have one entry per query and per gallery item")
    kmax = min(max(ks) + int(exclude_self), len(gallery))
    _, ids = faiss_index.knn(queries, gallery, kmax)  # (Q, kmax)
    if exclude_self:
        keep = ids != np.arange(len(queries))[:, None]
        ids = np.stack([row[m][: kmax - 1] for row, m in zip(ids, keep)])
    hit = gallery_labels[ids] == query_labels[:, None]  # (Q, k)
    first = np.where(hit.any(1), hit.argmax(1) + 1, np.iinfo(np.int64).max)
    return {f"R@{k}": float(100.0 * np.mean(first <= k)) for k in ks}


CURVE_KS = (1, 2, 5, 10, 20, 50, 100)


def retrieval_tasks(emb) -> list[tuple[str, np.ndarray, np.ndarray, Sequence[np.ndarray] | None]]:
    """(name, queries, gallery, gt) for every direction the embedding directory supports.

    text<->video in each space holding both (captions are the text items, several per video); audio<->video
    in each space holding both, over the videos that have audio.
    """
    tasks = []
    spaces = sorted({n.split("@", 1)[1] for n in emb.arrays if "@" in n and not n.endswith(".windows")})
    for s in spaces:
        names = {m for m in ("video", "audio", "text") if f"{m}@{s}" in emb.arrays}
        if {"video", "text"} <= names and len(emb.caption_video):
            video, text = emb.get(f"video@{s}"), emb.get(f"text@{s}")
            # caption rows are grouped by video row, so each video owns one contiguous run of them
            order = np.argsort(emb.caption_video, kind="stable")
            counts = np.bincount(emb.caption_video, minlength=len(video))
            owned = np.split(order, np.cumsum(counts)[:-1])
            has_text = counts > 0
            tasks.append((f"text->video@{s}", text, video, np.asarray(emb.caption_video, dtype=np.int64)))
            tasks.append((f"video->text@{s}", video[has_text], text, [o for o in owned if len(o)]))
        if {"video", "audio"} <= names:
            keep = emb.has_audio
            video, audio = emb.get(f"video@{s}")[keep], emb.get(f"audio@{s}")[keep]
            tasks.append((f"audio->video@{s}", audio, video, None))
            tasks.append((f"video->audio@{s}", video, audio, None))
    return tasks


def evaluate_retrieval(emb, *, method: str = "exact", k: int = 100, directions: list[str] | None = None, **kw) -> dict:
    """Metrics (and a recall@K curve) for every retrieval direction of an embedding directory.

    Items are ranked by the inner product of the stored arrays: a space the model declares `normalize: false`
    was stored un-normalised, so it ranks by the dot product (the MIL-NCE release), every other by cosine.
    """
    results = {}
    tasks = retrieval_tasks(emb)
    if directions:
        unknown = set(directions) - {t[0] for t in tasks}
        if unknown:
            raise ValueError(f"unknown retrieval direction(s) {sorted(unknown)}; have {[t[0] for t in tasks]}")
        tasks = [t for t in tasks if t[0] in directions]
    if not tasks:  # a model without shared spaces (self-labelling): class protocols may still apply
        log.info("%s: no pair of modalities shares a space, no cross-modal retrieval", emb.root)
    dot = set(emb.info.get("dot_product_spaces") or ())
    for name, queries, gallery, gt in tasks:
        if len(queries) == 0:
            log.warning("%s: no queries (no captions or no audio), skipped", name)
            continue
        ranks = retrieval_ranks(queries, gallery, gt, method=method, k=k, **kw)
        censored_at = None if method == "exact" or k >= len(gallery) else k
        m = metrics_from_ranks(ranks, censored_at=censored_at)
        m["gallery"] = int(len(gallery))
        m["similarity"] = "dot" if name.split("@", 1)[1] in dot else "cosine"  # how `vatp embed` stored the space
        top = min(len(gallery), censored_at or len(gallery))
        m["curve"] = {str(c): float(100.0 * np.mean(ranks <= c)) for c in CURVE_KS if c <= top}
        results[name] = m
        log.info("%s: R@1 %s R@5 %s R@10 %s MedR %s", name, m["R@1"], m["R@5"], m["R@10"], m["MedR"])
    return results
