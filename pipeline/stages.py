"""The loader's stages: shard sources, rank/worker split, shuffling, skip counting, views, batching.

Module-level classes so the pipeline pickles under any DataLoader worker start method; `pipeline/data.py`
assembles them into a `wds.DataPipeline`.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from pipeline.data import DataConfig
from pipeline.views import SampleRejected, sample_views

log = logging.getLogger(__name__)

MEMBERS = ("mp4", "flac", "wav", "json")


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


def _worker_info() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _rng(state: EpochState, *extra: int) -> np.random.Generator:
    worker, _ = _worker_info()
    return np.random.default_rng([state.seed, state.epoch, state.resume_at, state.rank, worker, *extra])


def wanted_member(fname: str) -> bool:
    """Tar members the loader reads: the explicit extension list; anything else (.pyd, .pth, ...) stays unread."""
    base = fname.rsplit("/", 1)[-1]
    return "." in base and base.split(".", 1)[1].lower() in MEMBERS


class ResampledShards:
    """An endless stream of shard URLs drawn with replacement (probabilities `probs`), per (rank, worker)."""

    def __init__(self, urls: list[str], probs: np.ndarray, state: EpochState):
        self.urls, self.probs, self.state = urls, probs, state

    def __call__(self):
        rng = _rng(self.state)
        while True:
            yield {"url": self.urls[rng.choice(len(self.urls), p=self.probs)]}


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
    worker, num_workers = _worker_info()
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


class MakeViews:
    """Checked sample -> tensors of one batch row, with a per-sample RNG from (seed, epoch, rank, worker, n)."""

    def __init__(self, cfg: DataConfig, state: EpochState, skips: SkipCounter, tokenizer_path: str | None):
        self.cfg, self.state, self.skips, self.tokenizer_path = cfg, state, skips, tokenizer_path

    def __call__(self, src):
        tokenizer = None
        if self.tokenizer_path is not None:
            from data_prep.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(self.tokenizer_path)
        for n, sample in enumerate(src):
            try:
                yield sample_views(sample, self.cfg, _rng(self.state, 2, n), tokenizer)
            except Exception as e:
                self.skips.reject(e)


class BatchSamples:
    """Collate rows into batches; in resampled mode stop after this worker's share of `num_batches`."""

    def __init__(self, batch_size: int, state: EpochState, skips: SkipCounter, full_batches_only: bool):
        self.batch_size, self.state, self.skips, self.full_only = batch_size, state, skips, full_batches_only

    def __call__(self, src):
        worker, num_workers = _worker_info()
        left = self.state.num_batches - self.state.resume_at
        limit = left // num_workers + (worker < left % num_workers) if self.full_only else None
        rows: list[dict] = []
        made = 0
        for row in src if limit != 0 else ():
            self.skips.accept()
            rows.append(row)
            if len(rows) == self.batch_size:
                yield collate_rows(rows, self.skips.take())
                rows, made = [], made + 1
                if made == limit:
                    break
        if rows and not self.full_only:
            yield collate_rows(rows, self.skips.take())
        pending = self.skips.take()
        if pending:
            yield {"_skipped": pending}


def collate_rows(rows: list[dict], skipped: dict[str, int]) -> dict:
    """Stack rows into a batch; caption rows (`text`, `text_mask`) are padded to the longest K in the batch."""
    batch: dict = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "meta":
            batch[key] = values
        elif key in ("text", "text_mask"):
            k = max(v.shape[0] for v in values)
            batch[key] = torch.stack([torch.cat([v, v.new_zeros(k - v.shape[0], *v.shape[1:])]) for v in values])
        else:
            batch[key] = torch.stack(values)
    if skipped:
        batch["_skipped"] = skipped
    return batch
