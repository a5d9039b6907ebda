"""DeepSpeed, behind a few functions. This is the only module that imports `deepspeed`.

`init_distributed` turns whatever launched us (nothing, torchrun, the deepspeed launcher, srun) into
one process group; `build_engine` wraps the model with a DeepSpeed config produced from ours by
`build_ds_config`, with every value that DeepSpeed 0.19 defaults surprisingly (gradient clipping 1.0,
logarithmic warmup) set explicitly. The training loop then only calls `engine(batch)`,
`engine.backward(loss)`, `engine.step()` and the checkpoint functions in pipeline/checkpoint.py.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from pipeline.schedules import warmup_cosine

if TYPE_CHECKING:
    from pipeline.train_config import OptimConfig, RunConfig

log = logging.getLogger(__name__)

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
    if device == "cpu":
        os.environ["DS_ACCELERATOR"] = "cpu"  # before deepspeed is imported: it picks its accelerator on import
    import deepspeed

    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device == "cuda" else "gloo",
            auto_mpi_discovery=False,
            timeout=PROCESS_GROUP_TIMEOUT,
            verbose=False,
        )
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def build_ds_config(run: RunConfig, optim: OptimConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON for this run. Our config is the single source of truth; nothing is left to defaults
    whose meaning changed between DeepSpeed versions."""
    micro = micro_batch_size(run.batch_size, world_size, run.grad_accum)
    config: dict[str, Any] = {
        "train_batch_size": run.batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": run.grad_accum,
        "gradient_clipping": float(optim.clip_grad_norm),  # 0.19 would clip at 1.0 if absent
        "zero_optimization": {"stage": run.zero_stage},
        "zero_allow_untested_optimizer": True,  # our optimizer is torch's AdamW, not DeepSpeed's fused one
        # Mixed precision as torch autocast over fp32 weights: our towers cast their inputs to float, which
        # DeepSpeed's `bf16`/`fp16` modes (weights converted to half) would break. fp16 gets a GradScaler.
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "torch_autocast": {
            "enabled": run.precision != "fp32",
            "dtype": "bfloat16" if run.precision == "bf16" else "float16",
        },
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Fail"},
    }
    return config


def micro_batch_size(batch_size: int, world_size: int, grad_accum: int) -> int:
    """Per-rank clips per micro-step; the global batch must split evenly."""
    if batch_size % (world_size * grad_accum):
        raise ValueError(
            f"run.batch_size={batch_size} is not divisible by ranks x grad_accum = {world_size} x {grad_accum}"
        )
    return batch_size // (world_size * grad_accum)


def build_engine(model: torch.nn.Module, run: RunConfig, optim: OptimConfig, dist_info: DistInfo) -> Any:
    """Wrap `model` in a DeepSpeed engine with AdamW and the warmup+cosine schedule of pipeline/schedules.py.

    Returns the `DeepSpeedEngine` (call it, `.backward(loss)`, `.step()`); the scheduler advances only
    on optimizer steps, so `run.steps` counts optimizer steps whatever `grad_accum` is.
    """
    import deepspeed

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # biases and norm scales are not decayed
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)

    def lr_lambda(step: int) -> float:
        return warmup_cosine(
            step, total_steps=run.steps, warmup_steps=optim.warmup_steps, final_ratio=optim.final_lr_ratio
        )

    engine, _, _, _ = deepspeed.initialize(
        model=model.to(dist_info.device),
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda),
        config=build_ds_config(run, optim, dist_info.world_size),
        dist_init_required=False,
    )
    engine.checkpoint_engine.load = _safe_load  # DeepSpeed itself unpickles with weights_only=False
    return engine


def resume_schedule(engine: Any, lr: float) -> None:
    """Point the learning-rate schedule at the restored step under *this* run's schedule and base `lr`.

    A checkpoint carries the optimizer's last learning rate and the scheduler's base rates; resuming with
    a longer `run.steps` (or a new `optim.lr`) must not keep training at the old schedule's final rate.
    The scheduler's lambdas are this run's (`build_engine`; loading a state dict keeps them), so the next
    step's rate is recomputed from the step alone.
    """
    scheduler = engine.lr_scheduler
    groups = scheduler.optimizer.param_groups
    scheduler.base_lrs = [lr] * len(groups)
    scheduler.last_epoch = engine.global_steps
    scheduler._last_lr = [lr * fn(engine.global_steps) for fn in scheduler.lr_lambdas]
    for group, rate in zip(groups, scheduler._last_lr):
        group["initial_lr"], group["lr"] = lr, rate


def grad_norm(engine: Any) -> float:
    """The global gradient norm of the last optimizer step (NaN when DeepSpeed did not compute one)."""
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)


def fp32_state_dict(ckpt_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """The model weights (and buffers) of a saved checkpoint, offline and without any process group.

    Weights stay fp32 under every precision we offer (mixed precision is autocast over fp32 weights), and
    ZeRO 1/2 only partition optimizer state and gradients, so the module state rank 0 saved is exact.
    """
    path = Path(ckpt_dir) / tag / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise ValueError(f"{path} not found: not a DeepSpeed checkpoint of this project")
    state = _safe_load(str(path), map_location="cpu")["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _safe_globals() -> list:
    # The only non-tensor classes DeepSpeed pickles into its checkpoints (ZeRO 0-2, bf16/fp16, 0.19.8).
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_load(path: str, map_location: Any = None) -> Any:
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
