"""DeepSpeed, behind a few functions. This is the only module that imports `deepspeed`.

`build_engine` wraps the model (on the process group of `pipeline.distributed.init_distributed`, which
DeepSpeed finds and uses) with a DeepSpeed config produced from ours by `build_ds_config`, with every value
that DeepSpeed 0.19 defaults surprisingly (gradient clipping 1.0, logarithmic warmup) set explicitly. The
training loop then only calls `engine(batch)`, `engine.backward(loss)`, `engine.step()` and the checkpoint
functions in pipeline/checkpoint.py.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.schedules import warmup_cosine

if TYPE_CHECKING:
    from pipeline.distributed import DistInfo
    from pipeline.train_config import OptimConfig, RunConfig

log = logging.getLogger(__name__)


def _deepspeed():
    """The `deepspeed` module, imported with its accelerator chosen first: it picks one on import and would take
    CUDA's on a CPU-only machine with a CUDA build of torch."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


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
    """Wrap `model` in a DeepSpeed engine with `optim.name`'s optimiser and the warmup+cosine schedule of
    pipeline/schedules.py.

    Returns the `DeepSpeedEngine` (call it, `.backward(loss)`, `.step()`); the scheduler advances only
    on optimizer steps, so `run.steps` counts optimizer steps whatever `grad_accum` is.
    """
    deepspeed = _deepspeed()
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)  # biases and norm scales are not decayed
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    optimizer = make_optimizer(groups, optim)

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


def make_optimizer(groups: list[dict], optim: OptimConfig) -> torch.optim.Optimizer:
    """`optim.name` over parameter `groups` (each with its own weight decay). Adam's decay is L2 in the
    gradient (torch.optim.Adam); AdamW's is decoupled."""
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


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
    _deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _safe_load(path: str, map_location: Any = None) -> Any:
    with torch.serialization.safe_globals(_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)
