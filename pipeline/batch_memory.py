"""How much shared memory the loader's workers need, checked before they start.

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

from pipeline.data_config import mel_frames
from pipeline.dataset import DATASET_JSON, read_dataset_json

if TYPE_CHECKING:
    from pipeline.data_config import DataConfig

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
BATCHES_PER_WORKER = 3  # VideoBuffers.SLOTS: two prefetched batches and the one being consumed
WIDE_ASPECT = 16 / 9  # stored frames are sized by their short side; most footage is at most this wide
VIEWS = {"milnce": 1, "selflabel": 1, "gdt": 4}


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
