"""The loader's stages: shard sources, rank/worker split, shuffling, sample checks, skip counting, views,
batching, and the stream that carries workers across epochs (the batch's memory, collation included, is
`pipeline/batch_memory.py`).

Module-level classes so the pipeline pickles under any DataLoader worker start method; `pipeline/data.py`
assembles them into a `wds.DataPipeline`.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from pipeline.augment import augment_batch
from pipeline.batch_memory import VideoBuffers, collate_rows, pack_tensors, worker_info
from pipeline.data_config import DataConfig
from pipeline.dataset import iter_samples, load_tokenizer
from pipeline.views import SampleRejected, captions, sample_views

log = logging.getLogger(__name__)


@dataclass
class EpochState:
    """What the stages need to seed themselves; copied into the workers each time the loader is iterated."""

    seed: int
    rank: int
    world_size: int
    epoch: int = 0
    batches_seen: int = 0  # batches of this epoch handed to the consumer
    resume_at: int = 0  # batches_seen when the current iteration started (seeds a resumed stream)
    num_batches: int = 0


def _rng(state: EpochState, *extra: int) -> np.random.Generator:
    worker, _ = worker_info()
    return np.random.default_rng([state.seed, state.epoch, state.resume_at, state.rank, worker, *extra])


class TarSamples:
    """Shard URLs -> raw samples `{"__key__", "__url__", ext: bytes}` (`pipeline.dataset.iter_samples`: only the
    format's member extensions are read).

    A shard that cannot be opened or read is handed to `handler` (which counts it and returns True to go on with
    the next shard); the sample being assembled when it broke is dropped, the ones before it were yielded.
    """

    def __init__(self, handler):
        self.handler = handler

    def __call__(self, src):
        import webdataset as wds

        for shard in src:
            url = shard["url"]
            try:
                with wds.gopen(url, "rb") as stream:
                    for key, files in iter_samples(stream):
                        yield {"__key__": key, "__url__": url, **files}
            except Exception as e:  # noqa: BLE001 - any failure of one shard is counted, the stream goes on
                if self.handler(e):
                    continue
                raise


class ResampledShards:
    """An endless stream of shard URLs drawn with replacement (probabilities `probs`), per (rank, worker)."""

    def __init__(self, urls: list[str], probs: np.ndarray, state: EpochState):
        self.urls, self.probs, self.state = urls, probs, state

    def __call__(self):
        rng = _rng(self.state)
        cdf = np.cumsum(self.probs)
        while True:  # inverse-CDF draws: Generator.choice(p=...) re-validates p on every call (~0.1 ms)
            yield {"url": self.urls[min(int(np.searchsorted(cdf, rng.random(), side="right")), len(cdf) - 1)]}


class ExactShards:
    """Every shard once; the order is shuffled per epoch identically on all ranks (before the split)."""

    def __init__(self, urls: list[str], state: EpochState, shuffle: bool):
        self.urls, self.state, self.shuffle = urls, state, shuffle

    def __call__(self):
        for i in exact_shard_order(len(self.urls), self.state.seed, self.state.epoch, self.shuffle):
            yield {"url": self.urls[i]}


def exact_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The shard order of one exact epoch, identical on every rank (the rank and worker split comes after)."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


class SplitByRank:
    """Keep every world_size-th shard starting at this rank (explicit rank, not env or torch.distributed)."""

    def __init__(self, state: EpochState):
        self.state = state

    def __call__(self, src):
        yield from islice(src, self.state.rank, None, self.state.world_size)


def split_by_worker(src):
    """Keep every num_workers-th shard starting at this DataLoader worker."""
    worker, num_workers = worker_info()
    yield from islice(src, worker, None, num_workers)


class ShuffleSamples:
    """A seeded reservoir shuffle of `bufsize` samples (webdataset's default RNG is seeded from the pid)."""

    def __init__(self, bufsize: int, state: EpochState):
        self.bufsize, self.state = bufsize, state

    def __call__(self, src):
        rng = _rng(self.state, 1)
        buf = []
        for sample in src:
            if len(buf) < self.bufsize:
                buf.append(sample)
                continue
            i = int(rng.integers(len(buf)))
            buf[i], sample = sample, buf[i]
            yield sample
        for i in rng.permutation(len(buf)):
            yield buf[i]


class SkipCounter:
    """Counts rejected samples by reason (never sleeps) and fails after too many rejects in a row.

    Counts since the last batch are handed to `BatchSamples` (`take()`) and travel with the batch.
    """

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.pending: dict[str, int] = {}
        self.total: dict[str, int] = {}
        self.consecutive = 0

    def handler(self, reason: str):
        return functools.partial(self.count, reason)

    def reject(self, exn: Exception) -> bool:
        reason = exn.reason if isinstance(exn, SampleRejected) else f"error:{type(exn).__name__}"
        return self.count(reason, exn)

    def count(self, reason: str, exn: Exception) -> bool:
        self.pending[reason] = self.pending.get(reason, 0) + 1
        self.total[reason] = self.total.get(reason, 0) + 1
        self.consecutive += 1
        if self.total[reason] == 1 or self.total[reason] % 1000 == 0:
            log.warning("skipped a sample (%s, %d so far): %s", reason, self.total[reason], exn)
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"{self.consecutive} samples in a row were rejected (last: {reason}: {exn}); skipped so far: "
                f"{self.total}. Check the shards and the data settings (require_audio, views, decoder)."
            )
        return True

    def accept(self) -> None:
        self.consecutive = 0

    def take(self) -> dict[str, int]:
        out, self.pending = self.pending, {}
        return out


class CheckSample:
    """Raw tar sample -> checked sample (parsed json, idx, label id, has_audio), or `SampleRejected`.

    Cheap checks run here, before anything is decoded: missing members, bad json, missing audio when
    required, no captions when the views need them.
    """

    def __init__(self, cfg: DataConfig, label_index: dict[str, int]):
        self.cfg, self.label_index = cfg, label_index

    def __call__(self, raw: dict) -> dict:
        key = raw.get("__key__", "?")
        if "json" not in raw:
            raise SampleRejected("missing_json", key)
        try:
            meta = json.loads(raw["json"])
        except (ValueError, UnicodeDecodeError) as e:
            raise SampleRejected("bad_json", f"{key}: {e}") from e
        if not isinstance(meta, dict) or not isinstance(meta.get("idx"), int):
            raise SampleRejected("bad_json", f"{key}: no integer idx")
        if "mp4" not in raw:
            raise SampleRejected("missing_video", key)
        audio = raw.get("flac", raw.get("wav"))
        if audio is None and self.cfg.audio.enabled and self.cfg.require_audio:
            raise SampleRejected("missing_audio", key)
        if self.cfg.views == "milnce":
            captions({"meta": meta})
        return {
            "key": key,
            "video": raw["mp4"],
            "audio": audio if self.cfg.audio.enabled else None,
            "meta": meta,
            "idx": meta["idx"],
            "label": self.label_index.get(meta.get("label"), -1),
            "has_audio": audio is not None,
        }


class MakeViews:
    """Checked sample -> one batch row, with a per-sample RNG.

    Exact mode seeds it from (seed, epoch, rank, sample idx): each sample appears once per epoch, and its views
    do not depend on which worker decodes it, so batches are the same for any worker count when shards hold
    whole batches. Resampled mode may draw a sample twice in an epoch and seeds from (seed, epoch, resume point,
    rank, worker, n) so repeats get fresh views.
    """

    def __init__(self, cfg: DataConfig, state: EpochState, skips: SkipCounter, tokenizer_path: str | None):
        self.cfg, self.state, self.skips, self.tokenizer_path = cfg, state, skips, tokenizer_path

    def __call__(self, src):
        tokenizer = None
        if self.tokenizer_path is not None:
            tokenizer = load_tokenizer(self.tokenizer_path)
        s = self.state
        for n, sample in enumerate(src):
            if self.cfg.mode == "exact":
                rng = np.random.default_rng([s.seed, s.epoch, s.rank, 2, sample["idx"]])
            else:
                rng = _rng(s, 2, n)
            try:
                yield sample_views(sample, self.cfg, rng, tokenizer)
            except Exception as e:
                self.skips.reject(e)


class BatchSamples:
    """Collate rows into batches; in resampled mode stop after this worker's share of `num_batches`.

    With `augment_cfg` (augmentation placed in the workers) each batch also goes through the batched
    augmentation step before it leaves the worker.
    """

    def __init__(
        self,
        batch_size: int,
        state: EpochState,
        skips: SkipCounter,
        full_batches_only: bool,
        buffers: VideoBuffers | None = None,
        augment_cfg: DataConfig | None = None,
    ):
        self.batch_size, self.state, self.skips, self.full_only = batch_size, state, skips, full_batches_only
        self.buffers, self.augment_cfg = buffers, augment_cfg

    def _collate(self, rows: list[dict]) -> dict:
        batch = collate_rows(rows, self.skips.take(), self.buffers)
        if self.augment_cfg is not None:
            batch = augment_batch(batch, self.augment_cfg)
        return pack_tensors(batch) if torch.utils.data.get_worker_info() is not None else batch

    def __call__(self, src):
        worker, num_workers = worker_info()
        left = self.state.num_batches - self.state.resume_at
        limit = left // num_workers + (worker < left % num_workers) if self.full_only else None
        rows: list[dict] = []
        made = 0
        for row in src if limit != 0 else ():
            self.skips.accept()
            rows.append(row)
            if len(rows) == self.batch_size:
                yield self._collate(rows)
                rows, made = [], made + 1
                if made == limit:
                    break
        if rows and not self.full_only:
            yield self._collate(rows)
        pending = self.skips.take()
        if pending:
            yield {"_skipped": pending}


class EpochStream(torch.utils.data.IterableDataset):
    """Epoch after epoch of a resampled pipeline in one worker iteration, so workers start once per run.

    A resampled epoch is a fixed number of batches per worker, so the stream needs no end: each worker
    runs its share of epoch e, then advances its own copy of the state to epoch e + 1 (seeding the next
    epoch exactly as a fresh iteration would) and goes on, prefetching across the boundary. Restarting
    workers every epoch costs about a batch of decoding per epoch, which matters when epochs are short.
    """

    def __init__(self, pipeline, state: EpochState):
        self.pipeline, self.state = pipeline, state

    def __iter__(self):
        if torch.utils.data.get_worker_info() is None:
            raise RuntimeError("EpochStream runs inside DataLoader workers (it advances their copy of the state)")
        while True:
            yield from self.pipeline
            self.state.epoch, self.state.resume_at = self.state.epoch + 1, 0
