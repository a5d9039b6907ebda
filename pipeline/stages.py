"""The loader's stages: shard sources, rank/worker split, shuffling, sample checks, skip counting, views,
batching, and the stream that carries workers across epochs.

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
from pipeline.data_config import DataConfig
from pipeline.dataset import iter_samples, load_tokenizer
from pipeline.video import VideoWindow
from pipeline.views import SampleRejected, captions, sample_views

log = logging.getLogger(__name__)

VIDEO_KEYS = ("video", "video_uv")  # the pooled video buffer's tensors
SCALARS = {"idx": torch.int64, "label": torch.int64, "has_audio": torch.bool}  # row values collated as (B,)


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
        worker, num_workers = _worker_info()
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


def collate_rows(rows: list[dict], skipped: dict[str, int], buffers: VideoBuffers | None = None) -> dict:
    """Stack rows into a batch; caption rows (`text`, `text_mask`) are padded to the longest K in the batch, eval
    captions (`captions`, `captions_mask`) are concatenated `(sum K, L)` with `caption_count (B,)`, so one
    sample with thousands of subtitle cues does not pad every other row to as many.

    `video` windows are copied once into a uint8 `(B, V, T, H, W, 3)` buffer (each at the top-left of its slot,
    the slot as large as the batch's largest window, the rest zero) and handed over as the `(B, V, C, T, H, W)`
    view of it: channels last in memory, as decoders produce frames. YUV windows give luma `video`
    `(B, V, 1, T, H, W)` and chroma `video_uv` `(B, V, 2, T, H/2 + 1, W/2 + 1)` (the rows and columns covering
    each box) in one buffer instead. The buffer comes from `buffers` when given
    (the batch then carries its `_buffer` tag), else it is allocated, in shared memory inside a DataLoader
    worker, so passing it to the main process copies nothing.
    """
    batch: dict = {}
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "meta":
            batch[key] = values
        elif key == "video":
            batch[key], chroma, tag = _collate_windows(values, buffers)
            if chroma is not None:
                batch["video_uv"] = chroma
            if tag is not None:
                batch["_buffer"] = tag
        elif key in SCALARS:
            batch[key] = torch.tensor(values, dtype=SCALARS[key])
        elif key in ("text", "text_mask"):
            k = max(v.shape[0] for v in values)
            batch[key] = torch.stack([torch.cat([v, v.new_zeros(k - v.shape[0], *v.shape[1:])]) for v in values])
        elif key in ("captions", "captions_mask"):  # eval: every caption of every sample, one after the other
            batch[key] = torch.cat(values)
            batch["caption_count"] = torch.tensor([len(v) for v in values], dtype=torch.int64)
        else:
            batch[key] = torch.stack(values)
    if skipped:
        batch["_skipped"] = skipped
    return batch


def _collate_windows(
    rows: list[list[VideoWindow]], buffers: VideoBuffers | None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The batch's video `(B, V, C, T, H, W)` (RGB, channels last in memory; or luma with C = 1), its chroma
    `(B, V, 2, T, Hc, Wc)` for YUV windows (else None), and the pooled buffer's tag."""
    first = rows[0][0]
    frames, device, yuv = first.clip.num_frames, first.clip.frames.device, first.clip.chroma is not None
    height = max(w.height for row in rows for w in row)
    width = max(w.width for row in rows for w in row)
    b, v = len(rows), len(rows[0])
    shape = (b, v, frames, height, width) if yuv else (b, v, frames, height, width, 3)
    chroma_shape = (b, v, frames, 2, height // 2 + 1, width // 2 + 1) if yuv else ()
    numel = int(np.prod(shape))
    total = numel + (int(np.prod(chroma_shape)) if yuv else 0)
    tag = None
    if device.type != "cpu":  # frames decoded on an accelerator stay there
        flat = torch.empty(total, dtype=torch.uint8, device=device)
    elif buffers is not None:
        storage, tag = buffers.take(total)
        flat = torch.empty(0, dtype=torch.uint8).set_(storage, 0, (total,))
    elif torch.utils.data.get_worker_info() is not None:
        flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(total))
    else:
        flat = torch.empty(total, dtype=torch.uint8)
    out = flat[:numel].view(shape)
    chroma = flat[numel:total].view(chroma_shape) if yuv else None
    for i, row in enumerate(rows):
        for j, window in enumerate(row):
            window.write_into(out[i, j], chroma[i, j] if yuv else None)
    if yuv:
        return out.unsqueeze(2), chroma.transpose(2, 3), tag  # (B, V, 1, T, H, W), (B, V, 2, T, Hc, Wc)
    return out.permute(0, 1, 5, 2, 3, 4), None, tag  # (B, V, C, T, H, W)


def pack_tensors(batch: dict) -> dict:
    """Move every tensor of a worker's batch except pooled video into one shared-memory buffer (`_packed`, with
    `_layout` to cut it up again: `unpack_tensors`).

    Handing a tensor to the main process costs a worker ~0.5 ms (a file descriptor sent over a socket with an
    authentication handshake), so a batch of eight small tensors cost 4 ms, ~0.5 ms per clip at batch 8; packed,
    it costs one hand-over (two with pooled video).
    """
    pooled = VIDEO_KEYS if "_buffer" in batch else ()
    small = {k: v for k, v in batch.items() if torch.is_tensor(v) and k not in pooled}
    if not small:
        return batch
    offsets, total = {}, 0
    for key, t in small.items():
        total = -(-total // 64) * 64  # 64-byte aligned, so every view is aligned for any dtype
        offsets[key] = total
        total += t.numel() * t.element_size()
    flat = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(total, 1)))
    layout = []
    for key, t in small.items():
        view = flat[offsets[key] : offsets[key] + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        layout.append((key, offsets[key], t.dtype, tuple(t.shape)))
    out = {k: v for k, v in batch.items() if k not in small}
    out["_packed"], out["_layout"] = flat, layout
    return out


def unpack_tensors(batch: dict) -> dict:
    """Inverse of `pack_tensors`: the batch's tensors as views of the one buffer (a no-op on other batches)."""
    if "_packed" not in batch:
        return batch
    flat, layout = batch.pop("_packed"), batch.pop("_layout")
    for key, offset, dtype, shape in layout:
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        batch[key] = flat[offset : offset + nbytes].view(dtype).view(shape)
    return batch


class VideoBuffers:
    """Reused uint8 buffers for collated video, so their pages are faulted in once per run, not once per batch:
    a fresh 60 MB buffer costs as much kernel time as a third of decoding its clips on the test VM.

    `pooled` (the batch leaves the collating process raw): each worker keeps `SLOTS` shared-memory buffers and
    a flag per (worker, slot) in a shared tensor says the consumer still holds that batch; `Loader.to_device`
    clears it (`release`) once the batch is on the device and augmented. A worker whose slots are all busy (a
    consumer that keeps raw batches) writes into a one-off buffer instead, so nothing is ever overwritten.
    Not pooled (the batch is augmented right after collation, in the same process): one buffer, reused at once.
    """

    SLOTS = 3  # the DataLoader's two prefetched batches per worker and the one being consumed

    def __init__(self, workers: int, pooled: bool):
        self.pooled = pooled
        self.busy = torch.zeros(max(workers, 1), self.SLOTS, dtype=torch.int32).share_memory_()
        self.generation = 0
        self._storages: dict[int, torch.UntypedStorage] = {}

    def restart(self) -> None:
        """New workers are about to start: every slot is free, and the tags of older batches no longer count."""
        self.busy.zero_()
        self.generation += 1

    def take(self, nbytes: int) -> tuple[torch.UntypedStorage, torch.Tensor | None]:
        """A storage of at least `nbytes` and the tag that releases it (None: nothing to release)."""
        if not self.pooled:
            return self._slot(0, nbytes, shared=False), None
        worker, _ = _worker_info()
        for slot in range(self.SLOTS):
            if self.busy[worker, slot] == 0:
                self.busy[worker, slot] = 1
                return self._slot(slot, nbytes, shared=True), torch.tensor([worker, slot, self.generation])
        return torch.UntypedStorage._new_shared(nbytes), None

    def release(self, tag: torch.Tensor | None) -> None:
        if tag is not None and int(tag[2]) == self.generation:
            self.busy[int(tag[0]), int(tag[1])] = 0

    def _slot(self, slot: int, nbytes: int, shared: bool) -> torch.UntypedStorage:
        storage = self._storages.get(slot)
        if storage is None or storage.nbytes() < nbytes:
            size = nbytes + nbytes // 4  # headroom: the batch's largest crop box varies
            storage = torch.UntypedStorage._new_shared(size) if shared else torch.UntypedStorage(size)
            self._storages[slot] = storage
        return storage


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
