"""The loader's configuration (`data:` in a recipe): `DataConfig` and its sections, and `resolve_inputs`, which
fills the clip, audio and text settings left unset from the model's input contracts.

A module of its own so the loader's stages, views and assembly all import it without importing each other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from models.contracts import AudioInput, TextInput, VideoInput

VIEWS = ("milnce", "gdt", "selflabel", "eval")


@dataclass
class DatasetSource:
    """A dataset dir (with dataset.json) or a brace-expanded shard spec; `weight` None = by sample count."""

    path: str
    weight: float | None = None


@dataclass
class AudioConfig:
    enabled: bool = True
    sample_rate: int | None = None  # None: from the model's AudioInput
    num_mel_bins: int | None = None
    seconds: float | None = None
    win_ms: float | None = None
    hop_ms: float | None = None


@dataclass
class TextConfig:
    enabled: bool = True
    num_captions: int = 4  # K candidate captions per clip
    max_tokens: int | None = None  # None: from the model's TextInput
    tokenizer: str | None = None  # None: <first dataset>/tokenizer.model


@dataclass
class AugmentConfig:
    """Training augmentation. Workers draw each view's parameters; the batched device step applies them.

    `where`: `device` runs the step in the training process on its device right after the copy, `workers` at
    the end of each loader worker's batch (so it overlaps the model when the device is the CPU), `auto` picks
    `workers` for a CPU run and `device` otherwise.
    """

    enabled: bool = True  # False: centre crop, no flip/jitter/SpecAugment/volume (training views only)
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip: bool = True
    color_jitter: float = 0.4
    spec_augment: bool = True
    volume_jitter: float = 0.1
    where: Literal["auto", "device", "workers"] = "auto"


@dataclass
class DataConfig:
    datasets: list[DatasetSource] = field(default_factory=list)
    views: Literal["milnce", "gdt", "selflabel", "eval"] = "milnce"
    mode: Literal["resampled", "exact"] = "resampled"
    batch_size: int = 8  # per rank
    num_workers: int = 2
    epoch_samples: int | None = None  # None: the datasets' sample count (dataset.json)
    shuffle_buffer: int = 256
    decoder: Literal["auto", "decord", "pyav"] = "auto"  # auto: PyAV (YUV) for training views, decord for eval
    num_frames: int | None = None  # None: from the model's VideoInput
    size: int | None = None
    fps: float | None = None
    mean: tuple[float, float, float] | None = None  # None: from the model's VideoInput (normalisation)
    std: tuple[float, float, float] | None = None
    audio: AudioConfig = field(default_factory=AudioConfig)
    text: TextConfig = field(default_factory=TextConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    gdt_shift_seconds: float = 0.5  # minimum start gap of GDT's shifted view
    eval_windows: int = 1  # eval views: N uniformly spaced windows; 0 = num_frames over the whole clip
    eval_placement: Literal["spread", "middle", "captions"] = "spread"  # eval windows over the sample, at its
    # middle (one window: SeLaVi's clip), or over the span of its captions (a step padded with what follows it)
    eval_end_gap: float = 0.0  # eval views: the last window ends this many seconds before the span does (MIL-NCE 0.4)
    require_audio: bool = False  # drop (and count) samples without audio instead of zero-filling
    labels: list[str] | None = None  # None: scan the shards' json members for label strings
    with_meta: bool = False  # eval views: add `meta` (list of dicts: idx, id, label, captions)
    max_consecutive_rejects: int = 200  # fail loudly when a stream rejects this many samples in a row
    worker_start: Literal["fork", "forkserver", "spawn"] = "fork"
    worker_timeout_s: float = 600.0

    def __post_init__(self):
        if self.views not in VIEWS:
            raise ValueError(f"views={self.views!r} is not one of {VIEWS}")
        if self.batch_size < 1 or self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(
                f"batch_size={self.batch_size}, num_workers={self.num_workers}, shuffle_buffer="
                f"{self.shuffle_buffer}: need batch_size >= 1 and the others >= 0"
            )
        lo, hi = self.augment.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.crop_scale={self.augment.crop_scale} must satisfy 0 < lo <= hi <= 1")
        if not 0 <= self.augment.color_jitter < 1 or not 0 <= self.augment.volume_jitter < 1:
            raise ValueError(
                f"augment.color_jitter={self.augment.color_jitter}, augment.volume_jitter="
                f"{self.augment.volume_jitter}: each must be in [0, 1)"
            )
        if self.augment.where not in ("auto", "device", "workers"):
            raise ValueError(f"augment.where={self.augment.where!r} is not one of auto, device, workers")
        if self.views == "milnce" and not self.text.enabled:
            raise ValueError("views='milnce' needs text.enabled=true (MIL-NCE pairs clips with captions)")
        if self.eval_placement not in ("spread", "middle", "captions"):
            raise ValueError(f"eval_placement={self.eval_placement!r} is not one of spread, middle, captions")
        if self.eval_placement == "middle" and self.eval_windows != 1 or self.eval_end_gap < 0:
            raise ValueError(
                f"eval_placement={self.eval_placement!r} with eval_windows={self.eval_windows}, eval_end_gap="
                f"{self.eval_end_gap}: the middle takes one window, and the end gap is >= 0"
            )
        if self.eval_windows < 0 or self.text.num_captions < 1 or self.max_consecutive_rejects < 1:
            raise ValueError(
                f"eval_windows={self.eval_windows}, text.num_captions={self.text.num_captions}, "
                f"max_consecutive_rejects={self.max_consecutive_rejects} out of range"
            )


def resolve_inputs(
    data_cfg: DataConfig, *, video: VideoInput | None, audio: AudioInput | None, text: TextInput | None
) -> DataConfig:
    """Fill every None clip/audio/text setting from the model's input contracts (explicit values win)."""
    cfg = data_cfg
    if video is not None:
        cfg = dataclasses.replace(
            cfg,
            num_frames=cfg.num_frames or video.num_frames,
            size=cfg.size or video.size,
            fps=cfg.fps or video.fps,
            mean=cfg.mean or video.mean,
            std=cfg.std or video.std,
        )
    if audio is not None:
        a = cfg.audio
        cfg = dataclasses.replace(
            cfg,
            audio=dataclasses.replace(
                a,
                sample_rate=a.sample_rate or audio.sample_rate,
                num_mel_bins=a.num_mel_bins or audio.num_mel_bins,
                seconds=a.seconds or audio.seconds,
                win_ms=a.win_ms or audio.win_length_ms,
                hop_ms=a.hop_ms or audio.hop_length_ms,
            ),
        )
    if text is not None:
        cfg = dataclasses.replace(
            cfg, text=dataclasses.replace(cfg.text, max_tokens=cfg.text.max_tokens or text.max_tokens)
        )
    return cfg


def data_config_for(data: DataConfig, contracts: dict, *, captions: bool = True) -> DataConfig:
    """The data config a model reads, from its input contracts (`model.input_contracts()`): audio and text are
    loaded exactly when the model has that tower (`captions=False` leaves text to the caller, as for a model
    with its own word list), and every clip/audio/text setting comes from the contracts (`resolve_inputs`)."""
    data = dataclasses.replace(
        data,
        audio=dataclasses.replace(data.audio, enabled="audio" in contracts),
        text=dataclasses.replace(data.text, enabled="text" in contracts and captions),
    )
    return resolve_inputs(data, video=contracts.get("video"), audio=contracts.get("audio"), text=contracts.get("text"))


def check_resolved(cfg: DataConfig) -> None:
    """Raise naming every clip/audio/text setting that is still unset (call `resolve_inputs` first)."""
    unset = [n for n in ("num_frames", "size", "fps", "mean", "std") if getattr(cfg, n) is None]
    if cfg.audio.enabled:
        unset += [f"audio.{f.name}" for f in dataclasses.fields(cfg.audio) if getattr(cfg.audio, f.name) is None]
    if cfg.text.enabled and cfg.text.max_tokens is None:
        unset.append("text.max_tokens")
    if unset:
        raise ValueError(
            f"data settings {unset} are unset: give them or call resolve_inputs() with the model contracts"
        )


def mel_frames(cfg: DataConfig) -> int:
    """Spectrogram frames of one audio window of the resolved `cfg.audio` (`AudioInput.num_frames`)."""
    ac = cfg.audio
    return AudioInput(ac.sample_rate, ac.num_mel_bins, ac.seconds, ac.win_ms, ac.hop_ms).num_frames
