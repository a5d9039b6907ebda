"""Process-group start-up and every collective; all of them also work on one process without a group.

`init_distributed` turns whatever launched us (nothing, torchrun, the deepspeed launcher, srun) into one
process group (gloo on CPU, NCCL on GPU); `launch_env` maps SLURM's variables.

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

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

# Collectives wait this long before failing: long enough for a rank-0 evaluation between steps.
PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: global rank, world size, rank on its node, and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; an explicit `cuda` without one is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device is 'cuda' but no CUDA device is visible (use run.device=cpu or auto)")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"run.device must be auto, cpu or cuda, got {device!r}")
    return device


def launch_env() -> dict[str, str]:
    """The RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* variables this process will use, without side effects.

    torchrun and the deepspeed launcher set all five. Under `srun` we map SLURM_PROCID/LOCALID/NTASKS
    (MASTER_ADDR/PORT come from launch/slurm/pretrain.sbatch). Nothing set means one process.
    """
    env = {k: os.environ[k] for k in _DIST_VARS if k in os.environ}
    if "RANK" not in env and "SLURM_PROCID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        env.update(
            RANK=os.environ["SLURM_PROCID"],
            LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
            WORLD_SIZE=os.environ["SLURM_NTASKS"],
        )
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise ValueError(f"running under srun without {', '.join(missing)}: launch through launch/slurm/*.sbatch")
    if "RANK" not in env:
        env = dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    missing = [k for k in _DIST_VARS if k not in env]
    if missing:
        raise ValueError(f"partial launcher environment: {', '.join(missing)} not set (RANK is {env['RANK']})")
    return env


def init_distributed(device: str = "auto") -> DistInfo:
    """Join (or create) the process group: gloo on CPU, NCCL on GPU. Safe to call twice."""
    device = resolve_device(device)
    os.environ.update(launch_env())
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():  # DeepSpeed finds this group and uses it (pipeline/engine.py)
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=PROCESS_GROUP_TIMEOUT,
        )
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


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


def any_rank(*flags: bool, device: torch.device | str = "cpu") -> tuple[bool, ...]:
    """Each flag OR-ed over ranks: one rank's NaN or stop signal counts for all (the same answer everywhere)."""
    if not is_distributed():
        return tuple(bool(f) for f in flags)
    t = torch.tensor([int(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Per-key integer counts summed over ranks (keys may differ between ranks; every rank calls this)."""
    if not is_distributed():
        return dict(counts)
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, dict(counts))
    total: dict[str, int] = {}
    for part in gathered:
        for key, n in part.items():
            total[key] = total.get(key, 0) + int(n)
    return total


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


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
