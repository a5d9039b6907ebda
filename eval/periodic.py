"""The held-out evaluation a training run makes every `eval.every` steps.

`pipeline.train.train(cfg, evaluate=...)` calls `evaluate(model, step) -> dict` on every rank and logs what rank 0
returns; `launch/` builds that callback here, so the training loop needs nothing from `eval/`. The default is
`held_out_retrieval`: embed the first `eval.max_samples` videos of `eval.dataset` (one window each) with the
current weights and score text->video retrieval in every space holding video and text, audio->video in every
space holding video and audio.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from eval.embed import extract_embeddings, read_embeddings
from eval.retrieval import evaluate_retrieval
from pipeline.data import make_eval_loader, resolve_shards
from pipeline.data_config import DatasetSource, data_config_for
from pipeline.dataset import tokenizer_path
from pipeline.distributed import rank, world_size
from pipeline.train_config import TrainConfig

log = logging.getLogger(__name__)

Evaluate = Callable[[Any, int], dict[str, float]]


def held_out_retrieval(cfg: TrainConfig) -> Evaluate:
    """The callback for `cfg`: every rank embeds its share of the held-out videos, rank 0 scores them."""
    run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    sources = held_out_sources(cfg.eval.dataset, cfg.eval.max_samples)
    tokenizer = None
    if cfg.model.text is not None:
        tokenizer = str(tokenizer_path([d.path for d in cfg.data.datasets], cfg.data.text.tokenizer))
    text_spaces = [s.name for s in cfg.model.spaces if {"video", "text"} <= set(s.modalities)]
    audio_spaces = [s.name for s in cfg.model.spaces if {"video", "audio"} <= set(s.modalities)]
    if not text_spaces and not audio_spaces:
        raise ValueError("eval.every is set but the model has no space holding video with text or audio to score")

    def evaluate(model: Any, step: int) -> dict[str, float]:
        module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
        data = dataclasses.replace(
            cfg.data,
            datasets=sources,
            with_meta=True,
            eval_windows=1,
            num_workers=min(cfg.data.num_workers, 1),
            batch_size=_batch(cfg),
            text=dataclasses.replace(cfg.data.text, tokenizer=tokenizer),  # the vocabulary the model trains with
        )
        data = data_config_for(data, module.input_contracts())
        out = run_dir / "eval" / f"step_{step:08d}"
        device = next(module.parameters()).device
        model.eval()
        loader = make_eval_loader(data, rank=rank(), world_size=world_size())
        extract_embeddings(
            model,
            loader,
            out,
            rank=rank(),
            world_size=world_size(),
            device=device,
            dot_product_spaces=module.dot_product_spaces,
        )
        model.train()
        if rank() != 0:
            return {}
        emb, results = read_embeddings(out), {}
        directions = {f"text->video@{s}": f"eval/{s}/t2v" for s in text_spaces}
        directions |= {f"audio->video@{s}": f"eval/{s}/a2v" for s in audio_spaces}  # over the videos with audio
        for direction, m in evaluate_retrieval(emb, directions=list(directions)).items():
            results.update({f"{directions[direction]}_R@{k}": m[f"R@{k}"] for k in (1, 5, 10)})
        log.info("eval at step %d: %s", step, {k: round(v, 2) for k, v in results.items()})
        return results

    return evaluate


def held_out_sources(dataset: str, max_samples: int) -> list[DatasetSource]:
    """The shards of `dataset` that hold its first `max_samples` samples (whole shards; 0 = all of them)."""
    shards = resolve_shards([DatasetSource(dataset)])
    if max_samples <= 0 or any(s.samples is None for s in shards):
        return [DatasetSource(dataset)]
    picked, total = [], 0
    for shard in shards:
        if total >= max_samples:
            break
        picked.append(DatasetSource(shard.url))
        total += shard.samples
    return picked


def _batch(cfg: TrainConfig) -> int:
    return max(1, cfg.run.batch_size // max(world_size(), 1) // cfg.run.grad_accum)
