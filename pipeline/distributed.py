"""Rank utilities and collectives that also work when torch.distributed is not initialised (one process).

Every loss gathers through `all_gather_with_grad`, so the gradient rule lives in one place:

* the backward of the gather SUMS the gradients that every rank sends back for a slice, so when each rank
  computes its share of a global loss (its own queries against the global batch) and the engine AVERAGES
  parameter gradients over ranks (DDP / DeepSpeed), the averaged gradient equals the single-process gradient of
  the same loss on the concatenated batch;
* `global_mean` turns a rank's local (sum, count) into a value equal to the global mean on every rank, with the
  gradient of `world_size * local_sum / global_count` (the share that the engine's average expects).

The official MIL-NCE `AllGather` returns only the local slice in backward; that is exact only when every rank
computes the full loss, and then each rank does W times the work. See docs/objectives.md.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 on one process)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and on a single process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank; a no-op on one process."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over ranks in place and return it (no autograd; for statistics and K-sized vectors)."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Average `x` over ranks in place and return it (no autograd)."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise maximum over ranks in place (no autograd)."""
    if is_distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from all ranks along dim 0, rank-major, keeping gradients.

    Backward sums the gradients of every rank for this rank's slice (see the module docstring).
    """
    if not is_distributed():
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from all ranks along dim 0, without gradients."""
    if not is_distributed():
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 when ranks hold different numbers of rows (no gradients)."""
    if not is_distributed():
        return x.detach()
    n = torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device)
    sizes = all_gather_no_grad(n).tolist()
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = all_gather_no_grad(padded).split(max(sizes))
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], dim=0)


def global_mean(local_sum: torch.Tensor, local_count: torch.Tensor | int | float) -> torch.Tensor:
    """Σ_ranks local_sum / Σ_ranks local_count as a value, with the per-rank gradient that DDP averaging expects.

    The returned tensor's value is the global mean on every rank; its gradient is that of
    `world_size * local_sum / global_count`, so averaging parameter gradients over ranks gives the gradient of
    the global mean. On one process this is simply `local_sum / local_count`.
    """
    count = torch.as_tensor(local_count, dtype=local_sum.dtype, device=local_sum.device).detach().clone()
    if not is_distributed():
        return local_sum / count.clamp_min(1)
    total = all_reduce_sum(count).clamp_min(1)
    share = local_sum * (world_size() / total)
    value = all_reduce_sum(local_sum.detach().clone()) / total
    return share + (value - share).detach()
