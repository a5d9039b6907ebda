"""Evaluation benchmark: FAISS exact search, the exact ranking pass, k-means and IVF, as ratios measured in one run.

    .venv/bin/python bench/eval.py [--threads 2] [--gallery 100000] [--kmeans-points 200000]

Ceiling: a torch fp32 GEMM of the same inner dimension measured in this run. Ratios:
- faiss IndexFlatIP time vs torch matmul+topk on the same data (>1 means FAISS is faster), and its GFLOP/s / GEMM;
- the exact ranking pass of eval.retrieval (matmul + pessimistic counting) GFLOP/s / GEMM;
- FAISS k-means (k=1000, every point used) GFLOP/s / GEMM, and seconds extrapolated to 1M x 512, 25 iterations;
- IVF speed-up over flat at the smallest nprobe with recall@10 >= 0.95 (clustered data; IVF training apart).
Sizes default to what finishes in a few minutes on a shared 2-core machine; pass bigger ones on a quiet box.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from eval import faiss_index  # noqa: E402
from eval.clustering import kmeans  # noqa: E402
from eval.retrieval import retrieval_ranks  # noqa: E402

THREADS = 2


def timed(fn, repeat: int = 1):
    """(result, seconds, wall seconds) of the fastest of `repeat` runs.

    `seconds` is process CPU time / threads: on a shared, time-sliced machine it tracks the work done
    much better than wall time (reference/performance.md §0), as long as every thread is kept busy.
    """
    best = (None, float("inf"), 0.0)
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = time.perf_counter() - w, (time.process_time() - c) / THREADS
        if cpu < best[1]:
            best = (out, cpu, wall)
    return best


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def gemm_gflops(d: int, threads: int) -> float:
    a, b = torch.randn(2048, d), torch.randn(d, 16384)
    torch.mm(a, b)
    _, wall, _ = timed(lambda: torch.mm(a, b), repeat=5)
    return 2 * 2048 * 16384 * d / wall / 1e9


def bench_search(nb: int, nq: int, d: int, k: int, ceiling: float) -> dict:
    rng = np.random.default_rng(0)
    gallery, queries = unit(rng.standard_normal((nb, d))), unit(rng.standard_normal((nq, d)))
    flops = 2 * nb * nq * d
    index = faiss_index.build_index(gallery, gpu=False)
    (f_scores, f_ids), t_faiss, _ = timed(lambda: faiss_index.search(index, queries, k), repeat=3)
    g, q = torch.from_numpy(gallery), torch.from_numpy(queries)

    def torch_topk():
        out = [torch.topk(q[s : s + 1024] @ g.T, k, dim=1) for s in range(0, nq, 1024)]
        return torch.cat([o.indices for o in out])

    t_ids, t_torch, _ = timed(torch_topk, repeat=3)
    agree = float(np.mean(f_ids[:, 0] == t_ids[:, 0].numpy()))
    _, t_rank, _ = timed(lambda: retrieval_ranks(queries, gallery, method="exact", progress=False), repeat=2)
    return {
        "faiss_s": t_faiss,
        "torch_s": t_torch,
        "faiss_vs_torch": t_torch / t_faiss,
        "faiss_gflops": flops / t_faiss / 1e9,
        "faiss_of_gemm": flops / t_faiss / 1e9 / ceiling,
        "rank_pass_s": t_rank,
        "rank_pass_of_gemm": flops / t_rank / 1e9 / ceiling,
        "top1_agreement": agree,
    }


def bench_kmeans(n: int, d: int, k: int, niter: int, ceiling: float) -> dict:
    rng = np.random.default_rng(1)
    x = unit(rng.standard_normal((n, d)))
    res, seconds, _ = timed(lambda: kmeans(x, k, niter=niter, spherical=True, gpu=False))
    flops = 2 * n * k * d * niter  # the assignment GEMM dominates each iteration
    gflops = flops / seconds / 1e9
    full = 2 * 1_000_000 * 1000 * 512 * 25 / (gflops * 1e9)
    return {
        "seconds": seconds,
        "points_used": res.points_used,
        "gflops": gflops,
        "of_gemm": gflops / ceiling,
        "extrapolated_1M_512_k1000_25it_s": full,
    }


def bench_ivf(nb: int, nq: int, d: int, k: int) -> dict:
    rng = np.random.default_rng(2)
    centres = rng.standard_normal((2000, d))
    gallery = unit(centres[rng.integers(0, 2000, nb)] + 0.7 * rng.standard_normal((nb, d)))
    queries = unit(gallery[rng.choice(nb, nq, replace=False)] + 0.3 * rng.standard_normal((nq, d)))
    flat = faiss_index.build_index(gallery, gpu=False)
    (_, exact), t_flat, _ = timed(lambda: faiss_index.search(flat, queries, k), repeat=2)
    ivf, t_train, _ = timed(lambda: faiss_index.build_index(gallery, kind="ivf", gpu=False))
    rows = []
    for nprobe in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        ivf.nprobe = nprobe
        (_, ids), t, _ = timed(lambda: faiss_index.search(ivf, queries, k), repeat=2)
        recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(ids, exact)]))
        rows.append({"nprobe": nprobe, "recall@10": recall, "seconds": t, "speedup": t_flat / t})
        if recall >= 0.95:
            break
    return {"flat_s": t_flat, "train_s": t_train, "nlist": ivf.nlist, "sweep": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--gallery", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=2_000)
    p.add_argument("--kmeans-points", type=int, default=200_000)
    p.add_argument("--kmeans-k", type=int, default=1000)
    p.add_argument("--kmeans-iter", type=int, default=5)
    p.add_argument("--ivf-gallery", type=int, default=200_000)
    p.add_argument("--ivf-dim", type=int, default=128)
    args = p.parse_args()
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    faiss_index.set_threads(args.threads)
    print(f"threads {args.threads}, faiss {faiss.__version__}, torch {torch.__version__}, load {os.getloadavg()}")
    ceiling = gemm_gflops(args.dim, args.threads)
    print("times are process CPU seconds / threads (robust to a shared machine)")
    print(f"ceiling: torch fp32 GEMM (2048x{args.dim} @ {args.dim}x16384) {ceiling:.0f} GFLOP/s")

    s = bench_search(args.gallery, args.queries, args.dim, 10, ceiling)
    print(f"\nexact search {args.queries} x {args.gallery} x {args.dim}, k=10")
    print(f"  faiss flat {s['faiss_s']:.2f} s ({s['faiss_gflops']:.0f} GFLOP/s = {s['faiss_of_gemm']:.2f} of GEMM)")
    print(
        f"  torch matmul+topk {s['torch_s']:.2f} s -> faiss is {s['faiss_vs_torch']:.2f}x  (top-1 agree "
        f"{s['top1_agreement']:.3f})"
    )
    print(f"  exact ranking pass {s['rank_pass_s']:.2f} s = {s['rank_pass_of_gemm']:.2f} of GEMM")

    km = bench_kmeans(args.kmeans_points, args.dim, args.kmeans_k, args.kmeans_iter, ceiling)
    print(
        f"\nk-means {args.kmeans_points} x {args.dim}, k={args.kmeans_k}, {args.kmeans_iter} iterations, "
        f"{km['points_used']} points used"
    )
    print(
        f"  {km['seconds']:.2f} s, {km['gflops']:.0f} GFLOP/s = {km['of_gemm']:.2f} of GEMM; 1M x 512, k=1000, "
        f"25 iterations extrapolated: {km['extrapolated_1M_512_k1000_25it_s']:.0f} s"
    )

    iv = bench_ivf(args.ivf_gallery, args.queries, args.ivf_dim, 10)
    print(
        f"\nIVF vs flat, {args.ivf_gallery} x {args.ivf_dim} clustered, nlist {iv['nlist']} (train "
        f"{iv['train_s']:.1f} s), flat {iv['flat_s']:.2f} s"
    )
    for r in iv["sweep"]:
        print(f"  nprobe {r['nprobe']:>3}: recall@10 {r['recall@10']:.3f}  {r['seconds']:.3f} s  {r['speedup']:.1f}x")


if __name__ == "__main__":
    main()
