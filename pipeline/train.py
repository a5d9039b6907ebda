"""The training loop: `train(cfg)` reads top to bottom (setup, data, model, engine, resume, loop), `train_step`
does one micro-batch.

Counting: `step` is the optimizer step (DeepSpeed's `global_steps`); with `run.grad_accum = G` one step is G
micro-batches. A micro-batch whose loss is not finite on any rank is skipped on every rank (no backward, no
step) and counted; `run.max_nonfinite` of them in a row stop the run with `TrainingDiverged`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from models.towers import build_model
from pipeline.checkpoint import (
    StopRequest,
    check_same_model,
    latest_tag,
    load_checkpoint,
    prepare_run_dir,
    record_launch,
    save_checkpoint,
)
from pipeline.config import dump_yaml, to_dict
from pipeline.data import make_train_loader, resolve_shards
from pipeline.data_config import DataConfig, DatasetSource, data_config_for
from pipeline.dataset import load_tokenizer, tokenizer_path
from pipeline.distributed import any_rank, barrier, init_distributed, launch_env
from pipeline.engine import build_engine, grad_norm, micro_batch_size, resume_schedule
from pipeline.losses import Objective, build_objective
from pipeline.train_config import TrainConfig

log = logging.getLogger(__name__)

Evaluate = Callable[[Any, int], dict[str, float]]  # (model, step) -> metrics to log

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal after checkpointing; the SLURM script requeues on it


class TrainingDiverged(RuntimeError):
    """The loss stayed non-finite for `run.max_nonfinite` micro-batches in a row."""


def train(cfg: TrainConfig, *, resume: bool = False, evaluate: Evaluate | None = None) -> dict:
    """Train `cfg` in `<runs_dir>/<name>` (resuming from `latest` with `resume`); return the run's summary.

    With `eval.every`, `evaluate(model, step) -> dict` runs on every rank at those steps and what it returns is
    logged with the step's metrics (launch/ passes `eval.periodic.held_out_retrieval(cfg)`).
    """
    if cfg.eval.every and evaluate is None:
        raise ValueError("eval.every is set but no evaluate callback was given (launch/ passes one; see train())")
    # ---- setup: everything that can be checked is checked before any work starts
    world_size = int(launch_env()["WORLD_SIZE"])
    num_samples = check_config(cfg, world_size)
    dist_info = init_distributed(cfg.run.device)
    rank, device = dist_info.rank, dist_info.device
    threads = cfg.run.threads or default_threads(cfg.data.num_workers)
    torch.set_num_threads(threads)
    log.info("rank %d: %d torch threads", rank, threads)
    run_dir = prepare_run_dir(cfg.run.runs_dir, cfg.run.name, resume=resume)
    if resume:
        check_same_model(run_dir, recipe_dict(cfg)["model"])
    barrier()  # every rank has looked at the run dir before rank 0 writes into it
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(recipe_dict(cfg), run_dir / "config.yaml")
    torch.manual_seed(cfg.run.seed)  # same initial weights everywhere (DeepSpeed also broadcasts rank 0's)

    # ---- model and data
    model = build_model(cfg.model)
    contracts = model.input_contracts()
    micro = micro_batch_size(cfg.run.batch_size, world_size, cfg.run.grad_accum)
    data_cfg = dataclasses.replace(data_config_for(cfg.data, contracts), batch_size=micro)
    loader = make_train_loader(data_cfg, rank=rank, world_size=world_size, seed=cfg.run.seed, device=device)
    objective = build_objective(cfg.loss, num_samples=num_samples).to(device)
    assert not list(objective.parameters()), "objectives hold buffers only; parameters belong to the model"

    # ---- engine and resume
    engine = build_engine(model, cfg.run, cfg.optim, dist_info)
    counters = {"samples_seen": 0, "nonfinite_total": 0}
    resumed_from = None
    if resume:
        resumed_from, client, rank_state = load_checkpoint(engine, run_dir, rank=rank, world_size=world_size)
        objective.load_state_dict(client["objective"])
        counters.update(client["counters"])
        resume_schedule(engine, cfg.optim.lr)
        loader.load_state_dict(rank_state["loader"])
        torch.set_rng_state(rank_state["torch_rng"])
        log.info("resumed from %s at step %d", resumed_from, engine.global_steps)
    if rank == 0:
        record_launch(run_dir, world_size=world_size, resumed_from=resumed_from)

    # ---- loop
    step, total = engine.global_steps, cfg.run.steps
    metrics_out = MetricsWriter(run_dir, enabled=rank == 0, tensorboard=cfg.run.tensorboard)
    trace = open_trace(run_dir, rank) if cfg.run.trace_samples else None
    if trace is not None:
        trace.write(json.dumps({"start_step": step, "param_checksum": param_checksum(engine.module)}) + "\n")
    stop = StopRequest()
    window = Window()
    nonfinite_run = 0
    batches = endless(loader)
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=rank != 0, dynamic_ncols=True)
    engine.train()
    try:
        if objective.selflabel is not None and int(objective.selflabel.runs_done) == 0:
            warmup_batchnorm(engine.module, batches, objective.selflabel.cfg.bn_warmup_batches)
        while step < total:
            if objective.selflabel is not None and objective.selflabel.should_relabel(step, total):
                stats = relabel_pass(engine, objective, data_cfg, rank=rank, world_size=world_size, seed=cfg.run.seed)
                metrics_out.write(step, {f"selflabel/{k}": v for k, v in stats.items()})
            t0 = time.perf_counter()
            batch = next(batches)  # the model's input on the device: the copy and the augmentation count as data time
            t_data = time.perf_counter() - t0
            if trace is not None:
                trace.write(json.dumps({"step": step, "idx": batch["idx"].tolist()}) + "\n")
            metrics = train_step(engine, objective, batch, device)
            nonfinite, signalled = any_rank(
                not math.isfinite(metrics["loss"]), stop.signal_name is not None, device=device
            )
            counters["samples_seen"] += len(batch["idx"]) * world_size
            if nonfinite:
                counters["nonfinite_total"] += 1
                nonfinite_run += 1
                log.warning("non-finite loss at step %d (%d in a row): micro-batch skipped", step, nonfinite_run)
                if nonfinite_run >= cfg.run.max_nonfinite:
                    tag = latest_tag(run_dir)
                    last = f"last good checkpoint: {run_dir}/checkpoints/{tag}" if tag else "no checkpoint yet"
                    raise TrainingDiverged(
                        f"loss was non-finite for {nonfinite_run} micro-batches in a row at step {step} ({last}); "
                        f"lower optim.lr, set optim.clip_grad_norm, or check the data"
                    )
            else:
                nonfinite_run = 0
            window.add(metrics, t_data, time.perf_counter() - t0, len(batch["idx"]) * world_size)
            if engine.global_steps == step and not signalled:
                continue  # inside a gradient-accumulation cycle (or a skipped micro-batch)
            step = engine.global_steps
            bar.update(step - bar.n)
            if step % cfg.run.log_every == 0 or step == total:
                logged = window.flush(engine, counters, loader.skipped)
                metrics_out.write(step, logged)
                bar.set_postfix(
                    loss=f"{logged['loss']:.4f}", lr=f"{logged['lr']:.2e}", clips_s=f"{logged['clips_per_s']:.1f}"
                )
            if step % cfg.run.ckpt_every == 0 or step == total or signalled:
                _save(engine, objective, loader, counters, run_dir, step, cfg, rank, world_size)
            if cfg.eval.every and (step % cfg.eval.every == 0 or step == total):
                metrics_out.write(step, evaluate(engine, step))
            if signalled:
                log.warning("received %s: saved step %d, stopping (resume with --resume)", stop.signal_name, step)
                break
    finally:
        loader.close()  # stops its streaming workers now rather than at garbage collection
        stop.restore()
        bar.close()
        metrics_out.close()
        if trace is not None:
            trace.write(json.dumps({"final_step": step, "param_checksum": param_checksum(engine.module)}) + "\n")
            trace.close()
    summary = {
        "run_dir": str(run_dir),
        "step": step,
        "steps": total,
        "stopped_by": stop.signal_name,
        "samples_seen": counters["samples_seen"],
        "nonfinite_total": counters["nonfinite_total"],
        "skipped_samples": dict(loader.skipped),
        "last": window.last,
    }
    barrier()
    return summary


def train_step(engine: Any, objective: Objective, batch: dict, device: torch.device) -> dict[str, float]:
    """One micro-batch: forward, objective, and (when the loss is finite on this rank) backward and step.

    Returns `loss`, the unweighted `loss/<term>` values, and on optimizer steps `lr` and `grad_norm`. `batch` is the
    model's input on `device`, as the loader hands it out.
    """
    out = engine({k: v for k, v in batch.items() if torch.is_tensor(v)})
    out = {k: v.float() for k, v in out.items()}  # losses in fp32 whatever the autocast dtype
    loss, terms = objective(out, batch)
    metrics = {"loss": float(loss.detach())}
    metrics.update({f"loss/{k}": float(v.detach()) for k, v in terms.items()})
    finite = all(math.isfinite(v) for v in metrics.values())
    if any_rank(not finite, device=device)[0]:
        return {**metrics, "loss": float("nan")}  # the loop counts it; every rank skips backward and step
    boundary = engine.is_gradient_accumulation_boundary()
    lr = float(engine.get_lr()[0])  # the rate this optimizer step uses
    engine.backward(loss)
    own_norm = _module_grad_norm(engine.module) if boundary else None
    engine.step()
    if boundary:
        norm = grad_norm(engine)
        metrics["grad_norm"] = own_norm if math.isnan(norm) and own_norm is not None else norm
        metrics["lr"] = lr
    return metrics


def check_config(cfg: TrainConfig, world_size: int) -> int:
    """Fail before any work on what can be known from the config alone; return the dataset's sample count."""
    micro_batch_size(cfg.run.batch_size, world_size, cfg.run.grad_accum)
    if cfg.data.mode != "resampled" and world_size > 1:
        raise ValueError(f"data.mode={cfg.data.mode!r}: multi-rank training needs 'resampled' (equal steps per rank)")
    if cfg.optim.warmup_steps > cfg.run.steps:
        raise ValueError(f"optim.warmup_steps={cfg.optim.warmup_steps} exceeds run.steps={cfg.run.steps}")
    sources = list(cfg.data.datasets) + ([DatasetSource(cfg.eval.dataset)] if cfg.eval.every else [])
    for src in sources:
        _check_dataset_path(src.path)
    shards = resolve_shards(cfg.data.datasets)
    sl = cfg.loss.selflabel
    if sl is not None:
        if any(s.samples is None for s in shards):
            raise ValueError("self-labelling needs dataset dirs with dataset.json (sample counts size the label table)")
    if cfg.model.text is not None and cfg.data.text.enabled:
        _check_tokenizer(cfg)
    return sum(s.samples or 0 for s in shards)


def default_threads(loader_workers: int) -> int:
    """Torch threads for one rank: the cores this process may use, shared among the ranks of this node, minus
    the rank's loader workers (each keeps a core busy decoding), at least 1. More OpenMP threads than free cores
    spin against each other and the workers: a step then takes several times longer."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(local_ranks, 1) - loader_workers)


def recipe_dict(cfg: TrainConfig) -> dict:
    """`cfg` as a recipe mapping that loads back (`vatp train <run_dir>`): the derived data.batch_size left out."""
    data = to_dict(cfg)
    data["data"].pop("batch_size")
    return data


def endless(loader: Any) -> Iterator[dict]:
    """Epoch after epoch of `loader` (it advances its own epoch counter)."""
    while True:
        yield from loader


@torch.no_grad()
def warmup_batchnorm(model: torch.nn.Module, batches: Iterator[dict], n: int) -> None:
    """SeLaVi's BatchNorm warm-up before the first labelling: `n` training batches through the model in train
    mode, without gradients or a step, so the first labels (and the one-time audio/video cluster alignment) are
    not computed on the initial statistics (mean 0, variance 1)."""
    model.train()
    for _ in range(n):
        batch = next(batches)
        model({k: v for k, v in batch.items() if torch.is_tensor(v)})


@torch.no_grad()
def relabel_pass(
    engine: Any, objective: Objective, data_cfg: DataConfig, *, rank: int, world_size: int, seed: int
) -> dict[str, float]:
    """One self-labelling run: an augmented pass over the whole dataset per head group, then Sinkhorn-Knopp."""
    sl = objective.selflabel
    engine.eval()
    stats: dict[str, float] = {}
    for g, heads in enumerate(sl.head_groups()):
        pass_cfg = dataclasses.replace(data_cfg, mode="exact", shuffle_buffer=0)
        pass_seed = seed + 7919 * (1 + g)
        loader = make_train_loader(pass_cfg, rank=rank, world_size=world_size, seed=pass_seed, device=engine.device)
        video, audio, idx, has = [], [], [], []
        for batch in tqdm(loader, desc=f"relabel {g}", unit="batch", disable=rank != 0, leave=False):
            batch = {k: v for k, v in batch.items() if torch.is_tensor(v)}
            v, a = sl.relabel_inputs(engine(batch))  # (B, H, K) log-probs each
            video.append(v[:, heads])
            audio.append(a[:, heads] if a is not None else None)
            idx.append(batch["idx"])
            has.append(batch.get("has_audio", torch.ones_like(batch["idx"], dtype=torch.bool)))
        audio_all = None if not audio or audio[0] is None else torch.cat(audio)
        stats = sl.relabel(
            torch.cat(video),
            audio_all,
            torch.cat(idx),
            heads=heads,
            has_audio=torch.cat(has) if audio_all is not None else None,
        )
        if "audio_perm" in stats:  # first labelling: the model reorders its audio heads from now on
            engine.module.set_audio_permutation(stats.pop("audio_perm"))
    engine.train()
    return stats


def open_trace(run_dir: Path, rank: int):
    """`<run>/trace/rank<r>.jsonl`: weights checksum at start and end, sample idx of every micro-batch."""
    (run_dir / "trace").mkdir(parents=True, exist_ok=True)
    return open(run_dir / "trace" / f"rank{rank}.jsonl", "a", encoding="utf-8")


def param_checksum(module: torch.nn.Module) -> str:
    """A hash of every parameter's bytes: ranks holding identical weights give identical hashes.

    Buffers are left out: BatchNorm running statistics are per rank (DeepSpeed does not broadcast buffers, and
    each rank sees different clips); checkpoints and exports carry rank 0's.
    """
    return tensors_checksum(dict(module.named_parameters()))


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, bytes) of `tensors` in name order."""
    h = hashlib.sha256()
    for name, t in sorted(tensors.items()):
        h.update(name.encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Window:
    """Running sums between two log lines: losses, data-wait vs step time, clips processed."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.data_s = self.step_s = 0.0
        self.clips = 0
        self.last: dict[str, float] = {}

    def add(self, metrics: dict[str, float], data_s: float, step_s: float, clips: int) -> None:
        for k, v in metrics.items():
            if math.isfinite(v):
                self.sums[k] = self.sums.get(k, 0.0) + v
                self.counts[k] = self.counts.get(k, 0) + 1
        self.data_s, self.step_s, self.clips = self.data_s + data_s, self.step_s + step_s, self.clips + clips

    def flush(self, engine: Any, counters: dict, skipped: dict[str, int]) -> dict[str, float]:
        out = {k: self.sums[k] / self.counts[k] for k in self.sums}
        out.setdefault("loss", float("nan"))
        out.setdefault("lr", float(engine.get_lr()[0]))
        out["clips_per_s"] = self.clips / max(self.step_s, 1e-9)
        out["data_wait_frac"] = self.data_s / max(self.step_s, 1e-9)
        out["step_s"] = self.step_s / max(1, self.counts.get("loss", 1))
        out["samples_seen"] = counters["samples_seen"]
        out["nonfinite_total"] = counters["nonfinite_total"]
        out.update({f"skipped/{k}": v for k, v in skipped.items()})
        self.__init__()
        self.last = out
        return out


class MetricsWriter:
    """metrics.jsonl (one object per logged step) and TensorBoard scalars, on rank 0 only."""

    def __init__(self, run_dir: Path, *, enabled: bool, tensorboard: bool):
        self.file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"))

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.file is None or not values:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _save(engine, objective, loader, counters, run_dir, step, cfg, rank, world_size) -> None:
    client = {"step": step, "counters": dict(counters), "objective": objective.state_dict(), "config": to_dict(cfg)}
    rank_state = {"loader": loader.state_dict(), "torch_rng": torch.get_rng_state()}
    tag = save_checkpoint(
        engine,
        run_dir,
        step=step,
        client_state=client,
        rank_state=rank_state,
        keep=cfg.run.keep_ckpts,
        rank=rank,
        world_size=world_size,
    )
    log.info("saved checkpoint %s", tag)


def _check_dataset_path(path: str) -> None:
    import braceexpand

    local = os.path.expanduser(path)
    if "://" in local or local.startswith("pipe:") or os.path.isdir(local):
        return
    if not os.path.isfile(next(iter(braceexpand.braceexpand(local)))):
        raise ValueError(f"dataset {path!r} not found: not a dataset directory and not existing shard files")


def _check_tokenizer(cfg: TrainConfig) -> None:
    path = tokenizer_path([d.path for d in cfg.data.datasets], cfg.data.text.tokenizer)
    if not path.is_file():
        raise ValueError(f"tokenizer {path} not found: build it with `vatp data tokenizer` or set data.text.tokenizer")
    pieces = load_tokenizer(path).get_piece_size()
    vocab = cfg.model.vocab_size
    if vocab is not None and pieces > vocab:
        raise ValueError(f"tokenizer {path} has {pieces} pieces but model.vocab_size={vocab}: raise model.vocab_size")


def _module_grad_norm(module: torch.nn.Module) -> float | None:
    grads = [p.grad.detach().float() for p in module.parameters() if p.grad is not None]
    if not grads:
        return None  # ZeRO 1/2 keep gradients in their own buffers; DeepSpeed reports the norm then
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
