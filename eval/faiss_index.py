"""FAISS indexes for inner-product search: exact flat (default) or IVF, on the GPU when one is usable.

Vectors are expected L2-normalised, so inner product is cosine similarity. Searches run in query chunks
so the (queries x gallery) score matrix never exists in full; only (chunk x k) results do.
"""

from __future__ import annotations

import logging
import math
import os

import faiss
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

# FAISS GPU top-k selection is limited to k <= 2048 (GPU_MAX_SELECTION_K).
GPU_MAX_K = 2048


def gpu_available() -> bool:
    """True when this FAISS build has GPU support and sees at least one device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def set_threads(n: int | None = None) -> int:
    """Set FAISS's OpenMP thread count (default: OMP_NUM_THREADS or every core) and return it.

    Set explicitly because FAISS and torch each run their own OpenMP pool; leaving both at "all cores"
    oversubscribes a shared machine.
    """
    if n is None:
        n = int(os.environ.get("OMP_NUM_THREADS", 0)) or os.cpu_count() or 1
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    faiss.omp_set_num_threads(n)
    return n


def as_float32(x: np.ndarray, name: str = "vectors") -> np.ndarray:
    """C-contiguous float32 2-D copy-if-needed of `x` (FAISS takes nothing else); NaN / inf is an error.

    Non-finite vectors (a diverged model) would otherwise rank first: every comparison with NaN is False.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, D), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x).all(axis=1) if x.size else np.ones(len(x), dtype=bool)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"{name} has {len(bad)} of {len(x)} rows with NaN or inf (first: row {int(bad[0])}); "
            "the model that produced them has probably diverged"
        )
    return x


def build_index(
    gallery: np.ndarray,
    *,
    kind: str = "flat",
    nlist: int | None = None,
    nprobe: int = 16,
    gpu: bool | None = None,
    train_points: int | None = None,
    seed: int = 0,
) -> faiss.Index:
    """An inner-product index over `gallery` (N, D).

    kind "flat" is exact; "ivf" is an inverted file with `nlist` lists (default ~4*sqrt(N)) of which
    `nprobe` are visited per query. `gpu=None` means "use a GPU when one is available".
    IVF trains its coarse quantizer on at most `train_points` vectors (default 64 per list).
    """
    gallery = as_float32(gallery, "gallery")
    n, d = gallery.shape
    if n == 0:
        raise ValueError("gallery is empty")
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = nlist or max(1, min(n // 39, int(4 * math.sqrt(n))))
        if nlist > n:
            raise ValueError(f"ivf nlist={nlist} exceeds the gallery size {n}")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        train_points = min(n, train_points or 64 * nlist)
        rng = np.random.default_rng(seed)
        sample = gallery if train_points == n else gallery[np.sort(rng.choice(n, train_points, replace=False))]
        log.info("training IVF quantizer: %d lists on %d of %d vectors", nlist, train_points, n)
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"index kind must be 'flat' or 'ivf', got {kind!r}")
    use_gpu = gpu_available() if gpu is None else gpu
    if use_gpu:
        if not gpu_available():
            raise ValueError("gpu=True but this FAISS build sees no GPU (install faiss-gpu-cuvs)")
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(gallery)
    return index


def search(
    index: faiss.Index, queries: np.ndarray, k: int, *, chunk: int = 8192, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`k` (scores, ids) for each query, best first; ids are -1 where the gallery has fewer than k items."""
    queries = as_float32(queries, "queries")
    if queries.shape[1] != index.d:
        raise ValueError(f"queries have dimension {queries.shape[1]}, the index has {index.d}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > GPU_MAX_K and _on_gpu(index):
        raise ValueError(f"k={k} exceeds the FAISS GPU limit of {GPU_MAX_K}")
    k_eff = min(k, index.ntotal)
    scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
    ids = np.full((len(queries), k), -1, dtype=np.int64)
    starts = range(0, len(queries), chunk)
    for s in tqdm(starts, desc="search", unit="chunk", disable=not progress or len(starts) < 2):
        d, i = index.search(queries[s : s + chunk], k_eff)  # (chunk, k_eff)
        scores[s : s + chunk, :k_eff] = d
        ids[s : s + chunk, :k_eff] = i
    return scores, ids


def knn(
    queries: np.ndarray, gallery: np.ndarray, k: int, *, kind: str = "flat", gpu: bool | None = None, **ivf
) -> tuple[np.ndarray, np.ndarray]:
    """One-shot top-`k` inner-product neighbours of `queries` in `gallery`: (scores, ids), each (Q, k)."""
    return search(build_index(gallery, kind=kind, gpu=gpu, **ivf), queries, k)


def _on_gpu(index: faiss.Index) -> bool:
    name = type(index).__name__
    return "Gpu" in name or "Replicas" in name
