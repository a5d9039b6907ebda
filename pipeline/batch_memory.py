"""The batch's memory: collating rows into one buffer, pooled shared-memory video buffers, one hand-over for a
batch's small tensors, and how much shared memory the loader's workers need (checked before they start).

Workers hand their batches to the training process through shared memory (`/dev/shm` on Linux): each keeps
`VideoBuffers.SLOTS` batches of video there (the DataLoader's two prefetched batches and the one being consumed)
plus their small tensors. A container started with docker's default 64 MB `/dev/shm` cannot hold one batch of
32 x 224 clips, and torch then fails deep inside a worker ("unable to allocate shared memory(shm)", or a bus
error). `check_shared_memory` says so before the first batch, in one line, with the number to ask for.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data_config import mel_frames
from pipeline.dataset import DATASET_JSON, read_dataset_json
from pipeline.video import VideoWindow, chroma_slot

if TYPE_CHECKING:
    from pipeline.data_config import DataConfig

log = logging.getLogger(__name__)

VIDEO_KEYS = ("video_box", "video_uv")  # the pooled video buffer's tensors (raw training batches)
SCALARS = {"idx": torch.int64, "label": torch.int64, "has_audio": torch.bool}  # row values collated as (B,)


def worker_info() -> tuple[int, int]:
    """(id, count) of the DataLoader worker this runs in; (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


SHM_DIR = "/dev/shm"
BATCHES_PER_WORKER = 3  # VideoBuffers.SLOTS: two prefetched batches and the one being consumed
WIDE_ASPECT = 16 / 9  # stored frames are sized by their short side; most footage is at most this wide
VIEWS = {"milnce": 1, "selflabel": 1, "gdt": 4}


# ---- collation: rows -> one batch, its video in one (pooled) buffer


def collate_rows(rows: list[dict], skipped: dict[str, int], buffers: VideoBuffers | None = None) -> dict:
    """Stack rows into a batch; caption rows (`text`, `text_mask`) are padded to the longest K in the batch, eval
    captions (`captions`, `captions_mask`) are concatenated `(sum K, L)` with `caption_count (B,)`, so one
    sample with thousands of subtitle cues does not pad every other row to as many.

    Video windows are copied once into a uint8 `(B, V, T, H, W, 3)` buffer (each at the top-left of its slot,
    the slot as large as the batch's largest window, the rest zero) and handed over as the `(B, V, C, T, H, W)`
    view of it: channels last in memory, as decoders produce frames. Training rows (with `video_aug`) give the
    raw `video_box` the device step turns into `video`; eval rows, already at the model's size, give `video`.
    YUV windows give luma `video_box` `(B, V, 1, T, H, W)` and chroma `video_uv` `(B, V, 2, T, Hc, Wc)` (the
    rows and columns covering each box, `pipeline.video.chroma_slot`) in one buffer instead. The buffer comes
    from `buffers` when given (the batch then carries its `_buffer` tag), else it is allocated, in shared memory
    inside a DataLoader worker, so passing it to the main process copies nothing.
    """
    batch: dict = {}
    raw = "video_aug" in rows[0]  # training views: boxes the device step still crops, resizes and converts
    for key in rows[0]:
        values = [r[key] for r in rows]
        if key == "meta":
            batch[key] = values
        elif key == "video":
            pixels, chroma, tag = _collate_windows(values, buffers)
            batch["video_box" if raw else "video"] = pixels
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
    chroma_shape = (b, v, frames, 2, *chroma_slot(height, width)) if yuv else ()
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
    (which the loader runs on every batch unless it is raw) clears it (`release`) once the batch is on the device
    and augmented. A worker whose slots are all busy (a
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
        worker, _ = worker_info()
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


# ---- how much shared memory the workers need


def batch_bytes(cfg: DataConfig, augmented: bool) -> int | None:
    """About how many bytes one batch of `cfg` occupies in shared memory as it leaves a worker (None: the stored
    frame size is unknown, as for a bare shard spec). Raw training views are whole crop boxes of the stored frames
    (at most the whole frame; YUV 4:2:0 is 1.5 bytes a pixel, RGB 3); `augmented` ones (the step ran in the
    worker) float32 clips at the model's size; eval views `eval_windows` uint8 clips at the model's size."""
    views = max(cfg.eval_windows, 1) if cfg.views == "eval" else VIEWS[cfg.views]
    if cfg.views == "eval":
        pixels = cfg.size * cfg.size * 3
    elif augmented:
        pixels = cfg.size * cfg.size * 3 * 4
    else:
        short = _stored_short_side(cfg)
        if short is None:
            return None
        pixels = int(short * short * WIDE_ASPECT * (3 if cfg.decoder == "decord" else 1.5))
    sample = views * cfg.num_frames * pixels
    if cfg.audio.enabled:
        sample += views * cfg.audio.num_mel_bins * mel_frames(cfg) * 4
    return cfg.batch_size * sample


def check_shared_memory(cfg: DataConfig, augmented: bool, path: str = SHM_DIR) -> None:
    """Refuse to start `cfg.num_workers` workers when `path` cannot hold even one batch per worker (ValueError
    naming the need, what is free, and the ways out); warn when it cannot hold what they usually keep
    (`BATCHES_PER_WORKER` each). A no-op without workers, without `path`, or when the size is unknown."""
    need = shared_memory_needed(cfg, augmented)
    if need is None or not os.path.isdir(path):
        return
    free, total = shared_memory_state(path)
    if need[0] > free:
        raise ValueError(shortage_message(cfg, need, free, total, path))
    if need[1] > free:
        log.warning("%s", shortage_message(cfg, need, free, total, path, may=True))


def shared_memory_needed(cfg: DataConfig, augmented: bool) -> tuple[int, int] | None:
    """(at least, usually) bytes of shared memory the workers of `cfg` hold: one batch each while the consumer
    keeps up, `BATCHES_PER_WORKER` each when it does not (None: no workers, or the size is unknown)."""
    per_batch = batch_bytes(cfg, augmented)
    if cfg.num_workers == 0 or per_batch is None:
        return None
    return cfg.num_workers * per_batch, cfg.num_workers * BATCHES_PER_WORKER * per_batch


def shortage_message(
    cfg: DataConfig, need: tuple[int, int] | None, free: int, total: int, path: str = SHM_DIR, may: bool = False
) -> str:
    """The one line that says the workers' batches do not (or `may` not) fit in `path`, and what to do."""
    mb = 2**20
    state = "may not fit" if may else "do not fit" if need is not None and need[0] > free else "ran out of room"
    amount = f"need at least {need[0] / mb:.0f} MB, usually {need[1] / mb:.0f} MB" if need else "need more"
    return (
        f"the loader's batches {state} in shared memory: {cfg.num_workers} worker(s) with batches of "
        f"{cfg.batch_size} {amount}, and {path} has {free / mb:.0f} MB free of {total / mb:.0f} MB; give the "
        f"container more (e.g. `docker run --shm-size=8g`, or a larger {path} mount) or lower data.num_workers or "
        f"the batch size"
    )


def is_shared_memory_failure(error: BaseException) -> bool:
    """Whether a worker's error means shared memory ran out (torch re-raises it in the main process)."""
    text = str(error)
    return "unable to allocate shared memory" in text or ("No space left on device" in text and "torch_" in text)


def shared_memory_state(path: str = SHM_DIR) -> tuple[int, int]:
    """(free, total) bytes of `path`, (0, 0) when it cannot be read."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return 0, 0
    return stat.f_bavail * stat.f_frsize, stat.f_blocks * stat.f_frsize


def _stored_short_side(cfg: DataConfig) -> int | None:
    sides = []
    for src in cfg.datasets:
        path = os.path.expanduser(src.path)
        if not os.path.isfile(os.path.join(path, DATASET_JSON)):
            return None
        side = (read_dataset_json(path).get("video") or {}).get("short_side")
        if not isinstance(side, int):
            return None
        sides.append(side)
    return max(sides) if sides else None
