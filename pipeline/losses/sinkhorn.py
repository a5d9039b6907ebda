"""Sinkhorn-Knopp for self-labelling (SeLa / SeLaVi), in the numerically safe softmax(λ·scores) form.

The problem: given scores s (N, K) (log-probabilities), find the transport plan Q = diag(β) P diag(α) with
P[n, k] ∝ exp(λ s[n, k]), rows summing to 1/N and columns to the target r (K,), and label each row by its
argmax. SeLa/SeLaVi build P as p**λ (in float64): in float32 that underflows to zeros (K ≥ 1000) or to
denormals (9× slower). Subtracting each row's maximum before exp() is free, since row constants are absorbed by β,
and keeps P in [e^-60, 1] in float32 (e^-600 in float64). The floor makes every column reachable, so a collapsed
input (all rows equal) is still solvable; it matters only where λ·(s_best - s) > 60, which float32 cannot hold anyway.

Memory: P is built in place in row chunks (pass `inplace=True` to reuse the caller's scores buffer), the
iteration reads P twice (two GEMVs) and never writes it, and the argmax is taken in row chunks, so the peak is
the N x K matrix plus O(N + K + chunk) (bench/sinkhorn.py measures it).

Stopping rule (SeLaVi `optimize_L_sk_gpu`): every `check_every` iterations err = Σ_n |β_n / β_n' - 1|; stop when
err <= tol (0.1) or after `max_iters` (2000). Distributed: each rank holds its own rows; only the K-sized
column sums (and scalars) are all-reduced.

Ties: when rows are (nearly) identical every cluster ties in Q. Entries within 0.1% of a row's best count as
tied and the first in an order rotated by the row's global index wins, which gives balanced labels instead of
all rows in one cluster.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from pipeline.distributed import all_gather_no_grad, all_reduce_sum, is_distributed, rank

log = logging.getLogger(__name__)

# exp() floor per dtype: low enough to leave real plans alone, high enough that beta_n * P[n, k] (beta ~ 1/N)
# stays a normal number (float32 flushes denormals here).
EXP_FLOOR = {torch.float32: -60.0, torch.float64: -600.0}
# Plan entries this close (relative) to a row's best are ties: float32 sums over N rows are accurate to ~1e-5..1e-4,
# and SK's own stopping tolerance is far coarser.
TIE_TOL = 1e-3


@dataclass
class SinkhornResult:
    labels: torch.Tensor  # (N,) int64, this rank's rows
    alpha: torch.Tensor  # (K,) column scaling
    beta: torch.Tensor  # (N,) row scaling; plan = beta[:, None] * P * alpha[None, :]
    iterations: int
    error: float
    seconds: dict[str, float]  # wall time of "prep" (exp), "iterate", "argmax"


def sinkhorn_knopp(
    scores: torch.Tensor,
    lam: float,
    target: torch.Tensor | None = None,
    *,
    max_iters: int = 2000,
    tol: float = 0.1,
    check_every: int = 10,
    dtype: torch.dtype | None = None,
    distributed: bool = False,
    inplace: bool = False,
) -> torch.Tensor:
    """Labels (N,) of the plan ∝ exp(lam * scores) with uniform row marginals and column marginals `target`.

    SeLa: scores = log_softmax(z), lam = 25. SeLaVi: scores = 0.5 * (log p_video + log p_audio), lam = 20.
    `target` (K,) positive (normalised here; uniform when None). `inplace=True` overwrites `scores` with P.
    `distributed=True` treats each rank's `scores` as its rows of one global problem.
    """
    return sinkhorn(
        scores,
        lam,
        target,
        max_iters=max_iters,
        tol=tol,
        check_every=check_every,
        dtype=dtype,
        distributed=distributed,
        inplace=inplace,
    ).labels


def sinkhorn(
    scores: torch.Tensor,
    lam: float,
    target: torch.Tensor | None = None,
    *,
    max_iters: int = 2000,
    tol: float = 0.1,
    check_every: int = 10,
    dtype: torch.dtype | None = None,
    distributed: bool = False,
    inplace: bool = False,
) -> SinkhornResult:
    """`sinkhorn_knopp` that also returns the scalings, the iteration count and the last error."""
    dtype = dtype or scores.dtype
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be (N, K), got {tuple(scores.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Sinkhorn-Knopp runs in float32 or float64, got {dtype}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if max_iters < 1 or check_every < 1:
        raise ValueError(f"max_iters and check_every must be >= 1, got {max_iters} and {check_every}")
    n_local, k = scores.shape
    r = _column_marginals(target, k, dtype, scores.device)
    sync = distributed and is_distributed()
    counts = all_gather_no_grad(torch.tensor([n_local], device=scores.device)) if sync else None
    n = int(counts.sum()) if sync else n_local
    offset = int(counts[: rank()].sum()) if sync else 0
    if n == 0:
        raise ValueError("Sinkhorn-Knopp needs at least one row")

    clock = [_now(scores.device)]
    p = scores if inplace and scores.dtype == dtype else scores.to(dtype=dtype, copy=True)
    chunk = max(1, (2 << 20 if p.device.type == "cpu" else 1 << 28) // (k * p.element_size()))
    _exp_rows_(p, lam, chunk)
    clock.append(_now(p.device))
    flushed = torch.set_flush_denormal(True)
    try:
        alpha, beta, iterations, err = _scale(p, r, n, max_iters, tol, check_every, sync)
    finally:
        if flushed:
            torch.set_flush_denormal(False)
    clock.append(_now(p.device))
    labels = _argmax_rows(p, alpha, offset, chunk)
    clock.append(_now(p.device))
    seconds = {name: clock[i + 1] - clock[i] for i, name in enumerate(("prep", "iterate", "argmax"))}
    return SinkhornResult(labels, alpha, beta, iterations, err, seconds)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _column_marginals(target, k, dtype, device) -> torch.Tensor:
    if target is None:
        return torch.full((k,), 1.0 / k, dtype=dtype, device=device)
    target = torch.as_tensor(target, dtype=dtype, device=device)
    if target.shape != (k,) or not bool(torch.isfinite(target).all()) or bool((target <= 0).any()):
        raise ValueError(f"target must be {k} positive finite numbers, got shape {tuple(target.shape)}")
    return target / target.sum()


@torch.no_grad()
def _exp_rows_(p: torch.Tensor, lam: float, chunk: int) -> None:
    """p <- exp(max(lam * (p - rowmax), floor)) in place, chunk rows at a time (each chunk stays in cache)."""
    floor = EXP_FLOOR[p.dtype]
    bad = torch.zeros((), dtype=torch.bool, device=p.device)
    for rows in p.split(chunk):
        top = rows.amax(dim=1, keepdim=True)  # (c, 1); NaN anywhere in the row propagates here
        bad |= ~torch.isfinite(top).all()
        rows.sub_(top).mul_(lam).clamp_(min=floor).exp_()
    if bool(bad):
        raise ValueError("scores contain NaN, +inf, or a row that is entirely -inf")


@torch.no_grad()
def _scale(p, r, n, max_iters, tol, check_every, sync):
    """SeLaVi's fixed-point iteration: alpha = r / (beta^T P), beta' = c / (P alpha)."""
    c = 1.0 / n
    beta = torch.full((p.shape[0],), c, dtype=p.dtype, device=p.device)
    err = float("inf")
    it = 0
    for it in range(1, max_iters + 1):
        colsum = all_reduce_sum(beta @ p) if sync else beta @ p  # (K,)
        alpha = r / colsum
        beta_new = c / (p @ alpha)  # (N,)
        if (it - 1) % check_every == 0:
            local = (beta / beta_new - 1).abs().sum()
            err = float(all_reduce_sum(local) if sync else local)
        beta = beta_new
        if err <= tol:
            break
    if not err <= tol:
        log.info("Sinkhorn-Knopp stopped at max_iters=%d with err=%.3g (tol %.3g)", max_iters, err, tol)
    return alpha, beta, it, err


@torch.no_grad()
def _argmax_rows(p: torch.Tensor, alpha: torch.Tensor, offset: int, chunk: int) -> torch.Tensor:
    """argmax_k P[n, k] alpha[k] (beta_n does not move it); entries within TIE_TOL of the row's best are ties,
    resolved by the first column in an order rotated by the row's global index."""
    k = p.shape[1]
    labels = torch.empty(p.shape[0], dtype=torch.int64, device=p.device)
    for start in range(0, p.shape[0], chunk):
        q = p[start : start + chunk] * alpha  # (c, K)
        best, label = q.max(dim=1)
        q[torch.arange(q.shape[0], device=q.device), label] = 0  # the runner-up decides whether the row is tied
        tied = q.amax(dim=1) >= best * (1 - TIE_TOL)
        if bool(tied.any()):
            rows = tied.nonzero()[:, 0]
            q = p[start + rows] * alpha  # (t, K)
            near = q >= best[rows, None] * (1 - TIE_TOL)
            ids = (offset + start + rows).to(p.dtype)
            cols = torch.arange(k, dtype=p.dtype, device=p.device)
            order = torch.remainder(cols[None, :] - ids[:, None], k)  # (t, K): 0..K-1, rotated per row
            label[rows] = (k - order).mul_(near).argmax(dim=1)
        labels[start : start + label.shape[0]] = label
    return labels


def draw_cluster_sizes(kind: str, k: int, *, param: float | None = None, generator: torch.Generator | None = None):
    """Relative cluster sizes (K,) float64 summing to 1, sorted descending, for marginals `kind`.

    uniform: all 1/K. gaussian: N(1, param=0.1) per cluster (SeLaVi "G"), floored at 0.05 so no size is <= 0.
    zipf: ∝ 1 / rank**param (param=1), which SeLaVi accepts but never implemented.
    """
    if kind == "uniform":
        sizes = torch.ones(k, dtype=torch.float64)
    elif kind == "gaussian":
        sd = 0.1 if param is None else param
        sizes = (torch.randn(k, generator=generator, dtype=torch.float64) * sd + 1).clamp_min(0.05)
    elif kind == "zipf":
        s = 1.0 if param is None else param
        sizes = torch.arange(1, k + 1, dtype=torch.float64).pow(-s)
    else:
        raise ValueError(f"marginals must be uniform, gaussian or zipf, got {kind!r}")
    return (sizes / sizes.sum()).sort(descending=True).values


def assign_marginals(sizes: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
    """Target (K,) that gives the largest size to the cluster with the largest current `mass`, and so on.

    This is SeLaVi's intended direction; its code uses r ∝ 1/K_dist and so gives the largest target to the
    currently smallest cluster (docs/objectives.md).
    """
    target = torch.empty_like(sizes)
    target[mass.argsort()] = sizes.sort().values
    return target
