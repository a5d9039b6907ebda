"""Streaming loaders: WebDataset shards -> checked samples -> views -> batches, as a visible list of stages.

`make_train_loader(cfg, rank=, world_size=, seed=, device=)` and `make_eval_loader(cfg, rank=, world_size=)`
return a `Loader`: iterable over the model's input batches on its device (DESIGN.md "Batches": the copy and the
batched augmentation step, `pipeline.augment`, run as each batch is handed out), with `num_batches`, `skipped`,
`set_epoch`, `state_dict` / `load_state_dict`. `raw=True` hands out the transport batches instead (`video_box`,
`video_uv`, `video_aug`, `audio_aug`: the loader bench and tests), which `to_device` turns into the model's input.
Two modes:
- resampled (training default): each (rank, worker) draws shards with replacement, weighted by dataset, from
  an RNG seeded by (seed, epoch, resume point, rank, worker), and yields a fixed number of full batches, so
  every rank takes the same number of steps;
- exact: the shard list is split by rank then by worker, every sample is read once, the last batch of a
  worker may be partial (embedding extraction, tests).
Only `.mp4`, `.flac`, `.wav` and `.json` members are ever read from a tar; nothing is unpickled.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
import os
from dataclasses import dataclass

import braceexpand
import numpy as np
import torch
import webdataset as wds

from pipeline import batch_memory
from pipeline.augment import augment_batch
from pipeline.batch_memory import VideoBuffers, unpack_tensors
from pipeline.data_config import DataConfig, DatasetSource, check_resolved
from pipeline.dataset import DATASET_JSON, SHARDS_DIR, iter_json_members, read_dataset_json, tokenizer_path
from pipeline.stages import (
    BatchSamples,
    CheckSample,
    EpochState,
    EpochStream,
    ExactShards,
    MakeViews,
    ResampledShards,
    ShuffleSamples,
    SkipCounter,
    SplitByRank,
    TarSamples,
    exact_shard_order,
    split_by_worker,
)

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt() parameters


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None
    dataset: int


def make_train_loader(
    data_cfg: DataConfig,
    *,
    rank: int,
    world_size: int,
    seed: int,
    device: str | torch.device = "cpu",
    raw: bool = False,
) -> Loader:
    """The training loader of this rank (mode and views from `data_cfg`) for a model on `device`.

    Its batches are the model's input on `device`: workers hand over uint8 crop boxes and the parameters they
    drew, and the loader copies each batch to `device` once and runs the batched augmentation there (or the
    workers already ran it: `augment.where`). `raw=True` yields the workers' batches as they come (see
    `Loader.to_device`).
    """
    return _make_loader(data_cfg, rank=rank, world_size=world_size, seed=seed, train=True, device=device, raw=raw)


def make_eval_loader(
    data_cfg: DataConfig, *, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu"
) -> Loader:
    """A deterministic exact-epoch loader with eval views (N windows, centre crop, all captions) on `device`.

    Its batches hold uint8 clips at the model's size (the model normalises pixels itself): the model's input as
    they leave the workers, with every caption flat (`captions`, `caption_count`) for the text tower.
    """
    cfg = dataclasses.replace(data_cfg, views="eval", mode="exact", shuffle_buffer=0, epoch_samples=None)
    return _make_loader(cfg, rank=rank, world_size=world_size, seed=0, train=False, device=device, raw=False)


def augment_in_workers(cfg: DataConfig, device: str | torch.device) -> bool:
    """Where the batched augmentation runs: `augment.where`, with `auto` = in the workers for a CPU model."""
    where = cfg.augment.where
    return where == "workers" or (where == "auto" and torch.device(device).type == "cpu")


def _make_loader(cfg: DataConfig, *, rank: int, world_size: int, seed: int, train: bool, device, raw: bool) -> Loader:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is not in [0, world_size={world_size})")
    check_resolved(cfg)
    in_workers = augment_in_workers(cfg, device)
    # Eval batches are never augmented: they get fresh buffers, since a consumer may keep them raw.
    buffers = VideoBuffers(cfg.num_workers, pooled=not in_workers) if cfg.views != "eval" else None
    shards = resolve_shards(cfg.datasets)
    labels = cfg.labels if cfg.labels is not None else scan_labels([s.url for s in shards])
    workers = max(cfg.num_workers, 1)
    if cfg.mode == "exact" and len(shards) < world_size * workers:
        raise ValueError(
            f"exact mode needs at least ranks x workers = {world_size} x {workers} shards, found {len(shards)}: "
            f"lower data.num_workers or write smaller shards"
        )
    batch_memory.check_shared_memory(cfg, augmented=in_workers and cfg.views != "eval")
    state = EpochState(seed=seed, rank=rank, world_size=world_size)
    skips = SkipCounter(cfg.max_consecutive_rejects)
    resampled = cfg.mode == "resampled"
    stages = [
        ResampledShards([s.url for s in shards], shard_weights(cfg.datasets, shards), state)
        if resampled
        else ExactShards([s.url for s in shards], state, shuffle=train),
        None if resampled else SplitByRank(state),
        None if resampled else split_by_worker,
        TarSamples(skips.handler("bad_shard")),
        ShuffleSamples(cfg.shuffle_buffer, state) if cfg.shuffle_buffer > 1 else None,
        wds.map(CheckSample(cfg, {name: i for i, name in enumerate(labels)}), handler=skips.reject),
        MakeViews(cfg, state, skips, _tokenizer_path(cfg)),
        BatchSamples(cfg.batch_size, state, skips, resampled, buffers, augment_cfg=cfg if in_workers else None),
    ]
    num_batches = _num_batches(cfg, shards, rank, world_size, seed=seed, train=train)
    if isinstance(num_batches, int):
        state.num_batches = num_batches
    log.info(
        "loader rank %d/%d: %d shards, %d labels, %s mode, %d batches/epoch of %d",
        rank,
        world_size,
        len(shards),
        len(labels),
        cfg.mode,
        num_batches if isinstance(num_batches, int) else num_batches(state.epoch),
        cfg.batch_size,
    )
    return Loader(wds.DataPipeline(*stages), cfg, state, num_batches, torch.device(device), buffers, raw)


class Loader:
    """Iterable over batches of one rank; restartable through `state_dict()` / `load_state_dict()`.

    Iterating runs the rest of the current epoch, then advances `epoch`. Skipped samples travel from the
    workers inside batches (`_skipped`, a dict of deltas, removed before the batch is yielded) and add up
    in `skipped`. Each batch is handed out as the model's input on the loader's device (`to_device`), or as the
    workers made it when the loader is `raw`.
    """

    def __init__(
        self, dataset: wds.DataPipeline, cfg: DataConfig, state: EpochState, num_batches, device, buffers, raw: bool
    ):
        self.dataset, self.cfg, self.state, self._num_batches = dataset, cfg, state, num_batches
        self.device, self.buffers, self.raw = device, buffers, raw
        self.skipped: dict[str, int] = {}
        self.samples_seen = 0
        self._stream = None

    @property
    def num_batches(self) -> int:
        """Batches of the current epoch on this rank (exact mode: an upper bound when samples get skipped)."""
        n = self._num_batches
        return n if isinstance(n, int) else n(self.state.epoch)

    def __len__(self) -> int:
        return self.num_batches

    @property
    def epoch(self) -> int:
        return self.state.epoch

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` at its beginning (a no-op when it is already the current epoch)."""
        if epoch != self.state.epoch:
            self.state.epoch, self.state.batches_seen = epoch, 0
            self.close()

    def state_dict(self) -> dict:
        s = self.state
        return {"epoch": s.epoch, "batches_seen": s.batches_seen, "samples_seen": self.samples_seen, "seed": s.seed}

    def load_state_dict(self, sd: dict) -> None:
        if sd["seed"] != self.state.seed:
            log.warning(
                "loader state was saved with seed %d, this run has %d: using %d",
                sd["seed"],
                self.state.seed,
                sd["seed"],
            )
        self.state.seed, self.state.epoch, self.state.batches_seen = sd["seed"], sd["epoch"], sd["batches_seen"]
        self.samples_seen = sd["samples_seen"]
        self.close()

    def __iter__(self):
        s = self.state
        if s.batches_seen and self.cfg.mode == "exact":
            log.warning("exact mode cannot resume inside an epoch: epoch %d restarts from its start", s.epoch)
            s.batches_seen = 0
        if self._streams():
            batches = self._from_stream()
        else:
            s.resume_at = s.batches_seen
            self._restart_buffers()
            batches = iter(self._data_loader(self.dataset, persistent=False))
        for batch in self._named_failures(batches):
            batch = unpack_tensors(batch)
            for reason, n in batch.pop("_skipped", {}).items():
                self.skipped[reason] = self.skipped.get(reason, 0) + int(n)
            if not batch:
                continue
            s.batches_seen += 1
            self.samples_seen += len(batch["idx"])
            yield batch if self.raw else self.to_device(batch)
        if self.skipped:
            log.info("epoch %d: skipped samples by reason: %s", s.epoch, self.skipped)
        s.epoch, s.batches_seen = s.epoch + 1, 0

    def _named_failures(self, batches):
        """`batches`, with a worker's running out of shared memory turned into one line that says what it needs."""
        try:
            yield from batches
        except RuntimeError as e:
            if not batch_memory.is_shared_memory_failure(e):
                raise
            self.close()
            augmented = augment_in_workers(self.cfg, self.device) and self.cfg.views != "eval"
            need = batch_memory.shared_memory_needed(self.cfg, augmented)
            free, total = batch_memory.shared_memory_state()
            raise ValueError(batch_memory.shortage_message(self.cfg, need, free, total)) from None

    def _streams(self) -> bool:
        """Resampled mode with workers keeps one worker pool across epochs (see `EpochStream`); every worker must
        have at least one batch per epoch, or the in-order DataLoader would wait on it."""
        workers = self.cfg.num_workers
        return self.cfg.mode == "resampled" and workers > 0 and self.state.num_batches >= workers

    def _from_stream(self):
        """Items of the long-lived worker stream until this epoch has its `num_batches` batches."""
        s = self.state
        if self._stream is None:
            s.resume_at = s.batches_seen
            self._restart_buffers()
            self._stream = iter(self._data_loader(EpochStream(self.dataset, s), persistent=True))
        while s.batches_seen < self.num_batches:
            try:
                batch = next(self._stream)
            except StopIteration:
                self.close()
                raise RuntimeError("the loader's worker stream ended; it should run until closed") from None
            except BaseException:
                self.close()  # a worker failed: the next iteration starts fresh workers
                raise
            yield batch  # the consumer counts it (an item with only `_skipped` is not a batch)

    def to_device(self, batch: dict) -> dict:
        """A raw batch as the model's input: its tensors copied to the loader's device once (asynchronously from
        pinned memory on an accelerator), the batched augmentation applied there unless the workers already did
        (it writes `video` from `video_box`), the worker's buffer released; `meta` stays a list. The loader calls
        it on every batch it hands out unless it is `raw`."""
        moved = {
            k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) and not k.endswith("_aug") else v
            for k, v in batch.items()
            if k != "_buffer"
        }
        out = augment_batch(moved, self.cfg)
        self.release(batch)  # the pixels are on the device (or augmented): the worker may reuse their buffer
        return out

    def release(self, batch: dict) -> None:
        """Done with this raw batch: its video buffer may be written again (`to_device` calls it; a consumer of raw
        batches that does not call `to_device` calls it)."""
        if self.buffers is not None:
            self.buffers.release(batch.get("_buffer"))

    def _restart_buffers(self) -> None:
        if self.buffers is not None:
            self.buffers.restart()

    def close(self) -> None:
        """Stop the worker processes that stream across epochs (resampled mode); iterating again restarts them."""
        self._stream = None  # the iterator's finaliser stops and joins its workers

    def _data_loader(self, dataset, *, persistent: bool) -> torch.utils.data.DataLoader:
        workers = self.cfg.num_workers
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=workers,
            multiprocessing_context=self.cfg.worker_start if workers else None,
            timeout=self.cfg.worker_timeout_s if workers else 0,
            persistent_workers=persistent,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=keep_freed_memory,
        )


def keep_freed_memory(_worker_id: int = 0) -> None:
    """Let glibc's malloc keep freed blocks of up to 32 MB in the heap instead of returning them to the kernel.

    A worker frees its decoded frames every batch and allocates as many again for the next: with the default
    thresholds they are mmapped and unmapped each time, and touching fresh pages costs kernel time comparable
    to decoding. A no-op where glibc is not the allocator.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        pass


def resolve_shards(datasets: list[DatasetSource]) -> list[Shard]:
    """Shard URLs and sample counts of every source (counts from dataset.json when there is one)."""
    if not datasets:
        raise ValueError("data.datasets is empty: name at least one dataset dir or shard spec")
    shards = []
    for i, src in enumerate(datasets):
        if src.weight is not None and src.weight <= 0:
            raise ValueError(f"data.datasets[{i}].weight={src.weight} must be > 0")
        path = os.path.expanduser(src.path)
        if os.path.isdir(path):
            meta = read_dataset_json(path)
            found = [Shard(os.path.join(path, SHARDS_DIR, s["name"]), int(s["samples"]), i) for s in meta["shards"]]
        else:
            urls = list(braceexpand.braceexpand(path))
            sizes = _sizes_near(urls[0])
            found = [Shard(u, sizes.get(os.path.basename(u)), i) for u in urls]
        if not found:
            raise ValueError(f"data.datasets[{i}].path={src.path!r} names no shards")
        shards += found
    return shards


def shard_weights(datasets: list[DatasetSource], shards: list[Shard]) -> np.ndarray:
    """Per-shard draw probabilities: a dataset's share is its weight (or its sample count), spread by shard size."""
    counts = np.array([s.samples if s.samples is not None else 1 for s in shards], dtype=np.float64)
    weights = counts.copy()
    for i, src in enumerate(datasets):
        mine = np.array([s.dataset == i for s in shards])
        if src.weight is not None:
            weights[mine] = src.weight * counts[mine] / counts[mine].sum()
    if any(src.weight is not None for src in datasets) and any(src.weight is None for src in datasets):
        raise ValueError("data.datasets: give a weight to every dataset or to none (None means by sample count)")
    return weights / weights.sum()


def scan_labels(urls: list[str]) -> list[str]:
    """Sorted label strings of all samples, reading only the json members of local shards."""
    labels: set[str] = set()
    for url in urls:
        if not os.path.isfile(url):
            log.warning("cannot scan %s for labels (not a local file): set data.labels to map labels to ints", url)
            return []
        try:
            labels.update(meta["label"] for _, meta in iter_json_members(url) if isinstance(meta.get("label"), str))
        except ValueError as e:
            log.warning("label scan: %s (its samples are counted when the loader reads them)", e)
    return sorted(labels)


def _sizes_near(url: str) -> dict[str, int]:
    """Shard sizes from the dataset.json one level above a `shards/` folder, when there is one."""
    root = os.path.dirname(os.path.dirname(url))
    if not os.path.isfile(os.path.join(root, DATASET_JSON)):
        return {}
    return {s["name"]: int(s["samples"]) for s in read_dataset_json(root)["shards"]}


def _num_batches(cfg: DataConfig, shards: list[Shard], rank: int, world_size: int, *, seed: int, train: bool):
    """Batches per epoch of this rank: a function of the epoch (exact mode) or a constant (resampled mode)."""
    workers = max(cfg.num_workers, 1)
    sizes = [s.samples for s in shards]
    if cfg.mode == "exact":
        if cfg.epoch_samples is not None:
            raise ValueError(f"data.epoch_samples={cfg.epoch_samples} does nothing in exact mode: remove it")
        if None in sizes:
            raise ValueError("exact mode needs dataset dirs (with dataset.json) so every shard's size is known")

        def count(epoch: int) -> int:
            order = exact_shard_order(len(shards), seed, epoch, shuffle=train)
            mine = [sizes[i] for i in order[rank::world_size]]  # same split as SplitByRank / split_by_worker
            return sum(math.ceil(sum(mine[w::workers]) / cfg.batch_size) for w in range(workers))

        return count
    epoch = cfg.epoch_samples if cfg.epoch_samples is not None else (sum(sizes) if None not in sizes else None)
    if epoch is None:
        raise ValueError("some shards have no sample count (no dataset.json next to them): set data.epoch_samples")
    per_rank = math.ceil(epoch / (cfg.batch_size * world_size))
    return math.ceil(per_rank / workers) * workers


def _tokenizer_path(cfg: DataConfig) -> str | None:
    if not cfg.text.enabled:
        return None
    try:
        path = str(tokenizer_path([d.path for d in cfg.datasets], cfg.text.tokenizer))
    except ValueError as e:
        raise ValueError(f"data.text.tokenizer is unset: {e}") from None
    if not os.path.isfile(path):
        raise ValueError(
            f"tokenizer {path!r} not found (build it with `vatp data tokenizer` or set data.text.tokenizer)"
        )
    return path
