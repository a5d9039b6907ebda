"""Sinkhorn-Knopp for self-labelling (SeLa / SeLaVi), in the numerically safe softmax(λ·scores) form.

The problem: given scores s (N, K) (log-probabilities), find the transport plan Q = diag(β) P diag(α) with
P[n, k] ∝ exp(λ s[n, k]), rows summing to 1/N and columns to the target r (K,), and label each row by its
argmax. SeLa/SeLaVi build P as p**λ (in float64): in float32 that underflows to zeros (K ≥ 1000) or to
denormals (9× slower). Subtracting each row's maximum before exp() is free, since row constants are absorbed by β,
and keeps P in [e^-60, 1] in float32 (e^-600 in float64). The floor makes every column reachable, so a collapsed
input (all rows equal) is still solvable; it matters only where λ·(s_best - s) > 60, which float32 cannot hold anyway.

Memory: P is built in place in row chunks (pass `inplace=True` to reuse the caller's scores buffer), the
iteration never writes it, and the argmax is taken in row chunks, so the peak is the N x K matrix plus
O(N + K + threads x chunk) (bench/sinkhorn.py measures it).

Speed (CPU): the iteration is memory-bound, so it reads P once per iteration, not twice: each ~2 MiB row chunk
gives its rows' new β and, while still in cache, its part of the next βᵀP (_scale). Each torch thread owns a
block of rows and runs single-threaded (_in_threads). The final argmax avoids `max(dim=1)` with indices.

Stopping rule (SeLaVi `optimize_L_sk_gpu`): every `check_every` iterations err = Σ_n |β_n / β_n' - 1|; stop when
err <= tol (0.1) or after `max_iters` (2000). SeLaVi runs it in float64. In float32 each β_n carries a relative
rounding error of several eps and err sums N of them, so the rule could stall above tol for good (at 1M x 1000
every head ran all 2000 iterations). Two changes: the K column sums add up chunk by chunk in float64 (summed in
float32 their error grew with N, and every β's with it), and tol is raised to the rounding floor N x 32 x eps
when that is larger (3.8 at N = 1M in float32, unchanged up to N = 26k; SeLaVi's rule in float64). tol = 0 runs
exactly `max_iters`. Distributed: each rank holds its own rows; only the K-sized column sums (and scalars) are
all-reduced, so every rank takes the same decisions below.

Over-relaxation (a deviation; `relax=1` gives SeLaVi's iterates): each half-step moves w times as far in log space,
alpha <- alpha (r / (beta^T P) / alpha)^w and beta <- beta (c / (P alpha) / beta)^w, w in [1, 2). The fixed point,
and so the plan and the labels, is unchanged; on slowly converging problems the count of passes over P falls
2-6x. Iterations run plain up to the third check (iteration 2 x check_every + 1); from there on, with
`relax=None` (the default), w is the SOR optimum 2 / (1 + sqrt(1 - theta)) for the per-iteration rate theta that
err showed between the second and third checks, capped at 1.8. w > 1 is not globally convergent (far from the
solution a large step can overshoot and diverge), so whenever err fails to fall from one check to the next, or is
not finite, the state of the previous check is restored and the rest runs plain: the worst case is SeLaVi's
iterates after `check_every` wasted iterations.

Ties: when rows are (nearly) identical every cluster ties in Q. Entries within 0.1% of a row's best count as
tied and the first in an order rotated by the row's global index wins, which gives balanced labels instead of
all rows in one cluster.
"""

from __future__ import annotations

import logging
import math
import threading
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
# The stopping rule's err sums N relative changes of β, each with a rounding error of a few eps: below
# N x STOP_FLOOR_EPS x eps it measures rounding, not convergence.
STOP_FLOOR_EPS = 32
# Over-relaxation factors near 2 amplify float32 rounding in err and diverge more easily far from the solution.
RELAX_MAX = 1.8


@dataclass
class SinkhornResult:
    labels: torch.Tensor  # (N,) int64, this rank's rows
    alpha: torch.Tensor  # (K,) column scaling
    beta: torch.Tensor  # (N,) row scaling; plan = beta[:, None] * P * alpha[None, :]
    iterations: int
    error: float
    relax: float  # over-relaxation factor of the last iteration (1.0: SeLaVi's plain step)
    seconds: dict[str, float]  # wall time of "prep" (exp), "iterate", "argmax"


def sinkhorn_knopp(scores: torch.Tensor, lam: float, target: torch.Tensor | None = None, **options) -> torch.Tensor:
    """Labels (N,) of the plan ∝ exp(lam * scores); `sinkhorn(...).labels`, with the same arguments."""
    return sinkhorn(scores, lam, target, **options).labels


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
    relax: float | None = None,
) -> SinkhornResult:
    """Sinkhorn-Knopp on the plan ∝ exp(lam * scores) with uniform row marginals and column marginals `target`.

    SeLa: scores = log_softmax(z), lam = 25. SeLaVi: scores = 0.5 * (log p_video + log p_audio), lam = 20.
    `target` (K,) positive (normalised here; uniform when None). `inplace=True` overwrites `scores` with P.
    `distributed=True` treats each rank's `scores` as its rows of one global problem. `relax`: the over-relaxation
    factor w in [1, 2); 1 runs SeLaVi's iterates, None picks w from the first iterations' convergence rate. Returns
    the labels, the scalings, the iteration count, the last error and the time spent per phase.
    """
    dtype = dtype or scores.dtype
    if scores.dim() != 2 or scores.shape[1] < 1:
        raise ValueError(f"scores must be (N, K), got {tuple(scores.shape)}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"Sinkhorn-Knopp runs in float32 or float64, got {dtype}")
    if not lam > 0:
        raise ValueError(f"lam must be > 0, got {lam}")
    if max_iters < 1 or check_every < 1:
        raise ValueError(f"max_iters and check_every must be >= 1, got {max_iters} and {check_every}")
    if relax is not None and not 1 <= relax < 2:
        raise ValueError(f"relax must be in [1, 2) or None, got {relax}")
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
    cpu = p.device.type == "cpu"
    chunk = max(1, (2 << 20 if cpu else 1 << 28) // (k * p.element_size()))
    threads = torch.get_num_threads()
    # CPU: each of the torch threads owns a contiguous block of rows (see _in_threads). GPU: one block.
    parts = _row_parts(n_local, threads if cpu else 1)
    try:
        colsum = _exp_rows_(p, lam, chunk, parts)
        clock.append(_now(p.device))
        flushed = torch.set_flush_denormal(True)
        try:
            # CPU: a ~2 MiB chunk read from memory by the iteration's first GEMV is still in cache for its second.
            # GPU: one chunk (the whole block): its cache is small next to the matrix and launches cost more.
            pass_rows = chunk if cpu else max(1, n_local)
            alpha, beta, iterations, err, w = _scale(
                p,
                colsum,
                r,
                n,
                sync,
                pass_rows,
                parts,
                max_iters=max_iters,
                tol=tol,
                check_every=check_every,
                relax=relax,
            )
        finally:
            if flushed:
                torch.set_flush_denormal(False)
        clock.append(_now(p.device))
        labels = _argmax_rows(p, alpha, offset, chunk, parts)
        clock.append(_now(p.device))
    finally:
        torch.set_num_threads(threads)  # the workers set torch's process-wide default to 1; give it back
    seconds = {name: clock[i + 1] - clock[i] for i, name in enumerate(("prep", "iterate", "argmax"))}
    return SinkhornResult(labels, alpha, beta, iterations, err, w, seconds)


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


def _row_parts(n_rows: int, threads: int) -> list[slice]:
    """Contiguous row blocks, one per thread (fewer when there are few rows)."""
    threads = max(1, min(threads, n_rows // 4096))
    bounds = [n_rows * i // threads for i in range(threads + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(threads)]


def _in_threads(fn, parts: list[slice]) -> list:
    """[fn(part) for part in parts], one Python thread per part, each running torch single-threaded.

    The work is a long series of small in-cache ops per row chunk. Splitting each op over torch's threads costs a
    fork/join per op, and on a shared machine a descheduled thread stalls every one of them; a thread per block
    of rows synchronises once per pass instead. torch releases the GIL inside its ops.
    """
    if len(parts) == 1:
        return [fn(parts[0])]
    results: list = [None] * len(parts)
    errors: list[BaseException] = []

    def work(i: int) -> None:
        torch.set_num_threads(1)
        torch.set_flush_denormal(True)  # this thread's own flag; it dies with the thread
        try:
            results[i] = fn(parts[i])
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    workers = [threading.Thread(target=work, args=(i,), name=f"sinkhorn-{i}") for i in range(len(parts))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return results


@torch.no_grad()
def _exp_rows_(p: torch.Tensor, lam: float, chunk: int, parts: list[slice]) -> torch.Tensor:
    """p <- exp(max(lam * (p - rowmax), floor)) in place, chunk rows at a time; returns P's column sums (K,),
    taken while each chunk is still in cache (they are the first iteration's beta^T P, up to beta = 1/N)."""
    floor = EXP_FLOOR[p.dtype]

    def block(part: slice) -> tuple[torch.Tensor, torch.Tensor]:
        bad = torch.zeros((), dtype=torch.bool, device=p.device)
        colsum = torch.zeros(p.shape[1], dtype=torch.float64, device=p.device)
        for rows in p[part].split(chunk):
            top = rows.amax(dim=1, keepdim=True)  # (c, 1); NaN anywhere in the row propagates here
            bad |= ~torch.isfinite(top).all()
            rows.sub_(top).mul_(lam).clamp_(min=floor).exp_()
            colsum.add_(rows.sum(dim=0))  # per-chunk float32 sums, added up in float64
        return colsum, bad

    sums, bads = zip(*_in_threads(block, parts))
    if bool(sum(bads)):
        raise ValueError("scores contain NaN, +inf, or a row that is entirely -inf")
    return sum(sums)


@torch.no_grad()
def _scale(p, colsum, r, n, sync, chunk, parts, *, max_iters, tol, check_every, relax):
    """SeLaVi's fixed-point iteration, over-relaxed: alpha = r / (beta^T P), beta' = c / (P alpha), c = 1/N, each
    step taken w times in log space (w = 1: SeLaVi's iterates). `colsum` (K,) holds P's column sums (beta = c).

    Relaxation (see the module docstring): plain up to the third check; with relax=None, w comes from the
    convergence rate between the second and third checks. Whenever err fails to fall from one check to the next
    (or is not finite), the state of the last check is restored and the rest runs plain."""
    floor = n * STOP_FLOOR_EPS * torch.finfo(p.dtype).eps
    if 0 < tol < floor:  # tol=0 still means "run max_iters"
        log.debug("Sinkhorn-Knopp tol %.3g raised to the rounding floor %.3g (N=%d, %s)", tol, floor, n, p.dtype)
        tol = floor
    c = 1.0 / n
    colsum = colsum.mul_(c)
    beta = torch.full((p.shape[0],), c, dtype=p.dtype, device=p.device)
    beta_new = torch.empty_like(beta)
    w, alpha64, errs, saved = 1.0, None, [], None
    err = float("inf")
    it = 0
    for it in range(1, max_iters + 1):
        colsum = all_reduce_sum(colsum) if sync else colsum
        step = r / colsum  # (K,) float64
        alpha64 = step if w == 1 else alpha64 * (step / alpha64) ** w
        alpha = alpha64.to(p.dtype)
        colsum = _pass(p, alpha * n, beta, beta_new, w, chunk, parts)
        if (it - 1) % check_every == 0:
            local = (beta / beta_new - 1).abs().sum()
            err = float(all_reduce_sum(local) if sync else local)
            if w != 1 and not err < errs[-1]:  # relaxation stopped helping (or diverged): back to the last check
                log.debug("Sinkhorn-Knopp: err %.3g after %.3g at iteration %d; relaxation off", err, errs[-1], it)
                colsum, saved_beta, alpha = saved
                beta.copy_(saved_beta)
                w, err = 1.0, errs[-1]
                continue
            errs.append(err)
            if len(errs) == 3 and relax != 1 and err > tol:
                w = relax or _relaxation(errs[-1] / errs[-2], check_every)
            if w != 1:  # the state the next iteration starts from (colsum is all-reduced in place there)
                saved = (colsum.clone(), beta_new.clone(), alpha)
        beta, beta_new = beta_new, beta
        if err <= tol:
            break
    if not err <= tol:
        log.info("Sinkhorn-Knopp stopped at max_iters=%d with err=%.3g (tol %.3g)", max_iters, err, tol)
    return alpha, beta, it, err, w


def _relaxation(ratio: float, iterations: int) -> float:
    """Over-relaxation factor for plain Sinkhorn-Knopp that shrank err by `ratio` over `iterations` iterations:
    the SOR optimum 2 / (1 + sqrt(1 - theta)) for the per-iteration rate theta, capped at RELAX_MAX."""
    theta = min(max(ratio, 0.0), 1.0) ** (1.0 / iterations)
    return min(2.0 / (1.0 + math.sqrt(1.0 - theta)), RELAX_MAX)


def _pass(p, alpha_n, beta, beta_new, w, chunk, parts) -> torch.Tensor:
    """One read of P: beta_new = beta * (c / (beta * P alpha))^w, and the column sums beta_new^T P (K,) in float64.

    Chunk by chunk: beta_new for the chunk's rows, then, while the chunk is still in cache, its part of
    beta_new^T P. `alpha_n` = alpha * N, so c / (P alpha) = 1 / (P alpha_n)."""

    def block(part: slice) -> torch.Tensor:
        partial = torch.zeros(alpha_n.shape, dtype=torch.float64, device=alpha_n.device)
        chunk_sum = torch.empty_like(alpha_n)
        for rows, b_old, b in zip(p[part].split(chunk), beta[part].split(chunk), beta_new[part].split(chunk)):
            torch.mv(rows, alpha_n, out=b)  # (c,)
            if w == 1:
                b.reciprocal_()
            else:  # in ratio form: near the fixed point beta * P alpha_n is ~1, whatever the scale of beta
                b.mul_(b_old).pow_(-w).mul_(b_old)
            torch.mv(rows.t(), b, out=chunk_sum)  # (K,): rows are still in cache
            partial.add_(chunk_sum)  # chunk sums add up in float64 (see the stopping rule above)
        return partial

    return sum(_in_threads(block, parts))


@torch.no_grad()
def _argmax_rows(p: torch.Tensor, alpha: torch.Tensor, offset: int, chunk: int, parts: list[slice]) -> torch.Tensor:
    """argmax_k P[n, k] alpha[k] (beta_n does not move it); entries within TIE_TOL of the row's best are ties,
    resolved by the first column in an order rotated by the row's global index.

    Counted, not searched: `max(dim=1)` with indices is several times slower than `amax`, so a row's entries at or
    above (1 - TIE_TOL) x its best are marked 1.0, and a row sum and a GEMV give their count and the sum of their
    columns. A count of 1 makes that sum the argmax; a count above 1 is a tie."""
    k = p.shape[1]
    labels = torch.empty(p.shape[0], dtype=torch.int64, device=p.device)
    cols = torch.arange(k, dtype=p.dtype, device=p.device)
    # Allocated here, not in the workers: each new thread would otherwise leave its own freed copy in its malloc arena.
    buffers = torch.empty(len(parts), min(chunk, p.shape[0]), k, dtype=p.dtype, device=p.device)

    def block(part: slice) -> None:
        q = buffers[parts.index(part)]
        for start in range(part.start, part.stop, chunk):
            rows = p[start : min(start + chunk, part.stop)]
            near = torch.mul(rows, alpha, out=q[: rows.shape[0]])  # (c, K) plan entries up to beta_n
            threshold = near.amax(dim=1, keepdim=True).mul_(1 - TIE_TOL)  # (c, 1)
            torch.ge(near, threshold, out=near)  # 1.0 where near the row's best
            count = near.sum(dim=1)  # (c,)
            label = torch.mv(near, cols).long()  # (c,); exact while K < 2**24 (a single nonzero term)
            tied = count > 1.5
            if bool(tied.any()):
                tie_rows = tied.nonzero()[:, 0]
                plan = p[start + tie_rows] * alpha  # (t, K)
                tie_near = plan >= plan.amax(dim=1, keepdim=True) * (1 - TIE_TOL)
                ids = (offset + start + tie_rows).to(p.dtype)
                order = torch.remainder(cols[None, :] - ids[:, None], k)  # (t, K): 0..K-1, rotated per row
                label[tie_rows] = (k - order).mul_(tie_near).argmax(dim=1)
            labels[start : start + label.shape[0]] = label

    _in_threads(block, parts)
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
