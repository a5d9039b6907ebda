"""Views: turn one checked sample into the tensors of one batch row, one sampler per objective.

A checked sample is `{"key", "video": mp4 bytes, "audio": flac/wav bytes | None, "meta": json dict, "idx",
"label", "has_audio"}`. Each sampler returns `video (V, C, T, H, W)` uint8 and, when enabled,
`audio (V, 1, F, Ta)`, `text (K, L)` + `text_mask`, plus `idx`, `label`, `has_audio` — the batch contract
of DESIGN.md without the batch axis. All randomness comes from the `rng` argument.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from data_prep.tokenizer import PAD_ID
from pipeline import audio as A
from pipeline import video as Vd

if TYPE_CHECKING:
    from pipeline.data import DataConfig

VIEWS = ("milnce", "gdt", "selflabel", "eval")


class SampleRejected(Exception):
    """A sample the loader skips; `reason` is the key it is counted under in `Loader.skipped`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


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
            _captions({"meta": meta})
        return {
            "key": key,
            "video": raw["mp4"],
            "audio": audio if self.cfg.audio.enabled else None,
            "meta": meta,
            "idx": meta["idx"],
            "label": self.label_index.get(meta.get("label"), -1),
            "has_audio": audio is not None,
        }


def sample_views(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """Dispatch to the sampler named by `cfg.views`."""
    sampler = {"milnce": sample_milnce, "gdt": sample_gdt, "selflabel": sample_selflabel, "eval": sample_eval}
    return sampler[cfg.views](sample, cfg, rng, tokenizer)


def sample_milnce(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """One clip around a random anchor caption plus the K captions nearest to it (HowTo100M loader)."""
    video, duration = _open(sample, cfg)
    caps = _captions(sample)
    anchor = int(rng.integers(len(caps)))
    lo, hi = _padded_span(caps[anchor], _clip_seconds(cfg))
    start = float(rng.uniform(lo, max(lo, hi - _clip_seconds(cfg))))
    start = _clamp_start(start, duration, cfg)
    out = _common(sample)
    out["video"] = _video_view(video, start, cfg, rng, train=True).unsqueeze(0)
    if cfg.audio.enabled:
        out["audio"] = _audio_view(sample, start, cfg, rng, train=True).unsqueeze(0)
    out.update(
        _tokenize([caps[i]["text"] for i in nearest_captions(caps, anchor, cfg.text.num_captions)], cfg, tokenizer)
    )
    return out


def sample_gdt(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """Four views in the order base, reversed, shifted, shifted+reversed, each with its aligned audio.

    Audio augmentation runs once per start time, before reversal, so a reversed spectrogram is exactly the
    time-flip of its forward one; video augmentation is drawn independently for each view (as GDT).
    """
    video, duration = _open(sample, cfg)
    t_base, t_shift = gdt_starts(duration, _clip_seconds(cfg), cfg.gdt_shift_seconds, rng)
    waves = _audio_windows(sample, [t_base, t_shift], cfg) if cfg.audio.enabled else [None, None]
    frames, specs = [], []
    for start, wav in zip((t_base, t_shift), waves):
        clip = Vd.decode_clip(video, start, cfg.num_frames, cfg.fps)
        forward = _augment(clip, cfg, rng, train=True)
        backward = _augment(clip, cfg, rng, train=True).flip(1)  # time axis of (C, T, H, W)
        frames += [forward, backward]
        if cfg.audio.enabled:
            spec = _audio_spec(wav, cfg, rng, train=True)
            specs += [spec, spec.flip(-1)]
    out = _common(sample)
    out["video"] = torch.stack(frames)  # (4, C, T, H, W)
    if cfg.audio.enabled:
        out["audio"] = torch.stack(specs)  # (4, 1, F, Ta)
    if cfg.text.enabled:
        out.update(_captions_near_clip(sample, t_base, cfg, tokenizer))
    return out


def sample_selflabel(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """One random clip, its aligned audio and the sample's idx (the self-label row it trains)."""
    video, duration = _open(sample, cfg)
    start = float(rng.uniform(0, max(duration - _clip_seconds(cfg), 0)))
    out = _common(sample)
    out["video"] = _video_view(video, start, cfg, rng, train=True).unsqueeze(0)
    if cfg.audio.enabled:
        out["audio"] = _audio_view(sample, start, cfg, rng, train=True).unsqueeze(0)
    if cfg.text.enabled:
        out.update(_captions_near_clip(sample, start, cfg, tokenizer))
    return out


def eval_window_starts(duration: float, clip_seconds: float, windows: int) -> list[float]:
    """Window starts (seconds into the sample) of the eval view: `windows` evenly spaced clips, the first at 0
    and the last ending at the sample's end (all at 0 when the sample is shorter than a clip), or, with
    `windows` 0, one clip at 0 whose frames spread over the whole sample."""
    if windows == 0:
        return [0.0]
    return np.linspace(0, max(duration - clip_seconds, 0), windows).tolist()


def sample_eval(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """N uniformly spaced windows (or, with N=0, num_frames spread over the whole clip), centre crop.

    Deterministic: `rng` is not used. Text is every caption of the sample (Kmax rows, padded per batch).
    """
    video, duration = _open(sample, cfg)
    starts = eval_window_starts(duration, _clip_seconds(cfg), cfg.eval_windows)
    fps = cfg.num_frames / max(duration, 1e-6) if cfg.eval_windows == 0 else cfg.fps
    windows = [Vd.decode_clip(video, s, cfg.num_frames, fps) for s in starts]
    out = _common(sample)
    out["video"] = torch.stack([Vd.center_crop(w, cfg.size) for w in windows])  # (N, C, T, H, W)
    if cfg.audio.enabled:
        out["audio"] = _audio_eval(sample, starts, cfg)  # (N, 1, F, Ta)
    caps = [c["text"] for c in sample["meta"].get("captions") or [] if c.get("text", "").strip()]
    if cfg.text.enabled:
        out.update(_tokenize(caps, cfg, tokenizer, rows=max(len(caps), 1)))
    if cfg.with_meta:
        meta = sample["meta"]
        out["meta"] = {"idx": sample["idx"], "id": meta.get("id"), "label": meta.get("label"), "captions": caps}
    return out


def gdt_starts(duration: float, clip_s: float, min_gap: float, rng: np.random.Generator) -> tuple[float, float]:
    """Start times of the base and shifted clips, at least `min_gap` apart when the video is long enough.

    Shorter videos get the largest gap they allow (first and last possible start, in random order).
    """
    last = max(duration - clip_s, 0.0)
    if last < min_gap:
        pair = (0.0, last)
        return pair if rng.random() < 0.5 else pair[::-1]
    for _ in range(100):
        a, b = rng.uniform(0, last, size=2)
        if abs(a - b) >= min_gap:
            return float(a), float(b)
    a = float(rng.uniform(0, last - min_gap))
    return a, a + min_gap


def nearest_captions(captions: list[dict], anchor: int, k: int) -> list[int]:
    """K consecutive caption indices containing `anchor`, grown towards the tighter time span.

    Follows MIL-NCE's `_find_nearest_candidates`: extend left when that span is strictly shorter, else right.
    With fewer than K captions all of them are returned (the caller pads empty rows instead of repeating).
    """
    n = len(captions)
    k = min(k, n)
    lo = hi = anchor
    while hi - lo + 1 < k:
        if lo == 0:
            return list(range(0, k))
        if hi == n - 1:
            return list(range(n - k, n))
        left = captions[hi]["end"] - captions[lo - 1]["start"]
        right = captions[hi + 1]["end"] - captions[lo]["start"]
        if left < right:
            lo -= 1
        else:
            hi += 1
    return list(range(lo, hi + 1))


def _padded_span(caption: dict, min_seconds: float) -> tuple[float, float]:
    """The anchor caption's span, padded symmetrically to at least `min_seconds` (no int() cast as upstream)."""
    start, end = float(caption["start"]), float(caption["end"])
    if end - start < min_seconds:
        start = max(0.0, start - (min_seconds - (end - start)) / 2)
        end = start + min_seconds
    return start, end


def _clip_seconds(cfg: DataConfig) -> float:
    return cfg.num_frames / cfg.fps


def _clamp_start(start: float, duration: float, cfg: DataConfig) -> float:
    return min(max(start, 0.0), max(duration - _clip_seconds(cfg), 0.0))


def _open(sample: dict, cfg: DataConfig) -> tuple[Vd.VideoSource, float]:
    try:
        video = Vd.open_video(sample["video"], cfg.decoder)
    except Exception as e:
        raise SampleRejected("video_decode", f"{type(e).__name__}: {e}") from e
    if video.num_frames <= 0 or video.fps <= 0:
        raise SampleRejected("video_decode", f"{video.num_frames} frames at {video.fps} fps")
    return video, video.num_frames / video.fps


def _captions(sample: dict) -> list[dict]:
    caps = [c for c in sample["meta"].get("captions") or [] if str(c.get("text", "")).strip()]
    if not caps:
        raise SampleRejected("no_captions")
    return caps


def _common(sample: dict) -> dict:
    return {
        "idx": torch.tensor(sample["idx"], dtype=torch.int64),
        "label": torch.tensor(sample["label"], dtype=torch.int64),
        "has_audio": torch.tensor(sample["has_audio"]),
    }


def _augment(clip: torch.Tensor, cfg: DataConfig, rng: np.random.Generator, train: bool) -> torch.Tensor:
    if not (train and cfg.augment.enabled):
        return Vd.center_crop(clip, cfg.size)
    aug = cfg.augment
    return Vd.augment_clip(clip, cfg.size, rng, scale=aug.crop_scale, flip=aug.flip, jitter=aug.color_jitter)


def _video_view(video: Vd.VideoSource, start: float, cfg: DataConfig, rng: np.random.Generator, train: bool):
    try:
        clip = Vd.decode_clip(video, start, cfg.num_frames, cfg.fps)
    except Exception as e:
        raise SampleRejected("video_decode", f"{type(e).__name__}: {e}") from e
    return _augment(clip, cfg, rng, train)


def _audio_view(sample: dict, start: float, cfg: DataConfig, rng: np.random.Generator, train: bool) -> torch.Tensor:
    return _audio_spec(_audio_windows(sample, [start], cfg)[0], cfg, rng, train)


def _audio_windows(sample: dict, starts: list[float], cfg: DataConfig) -> list[np.ndarray | None]:
    """The waveform of each window at the configured rate (one decode pass); None for a silent sample."""
    ac = cfg.audio
    if sample["audio"] is None:
        return [None] * len(starts)
    try:
        waves, sr = A.read_windows(sample["audio"], starts, ac.seconds)  # (W, n)
    except Exception as e:
        raise SampleRejected("audio_decode", f"{type(e).__name__}: {e}") from e
    return [A.resample(wav, sr, ac.sample_rate) for wav in waves]


def _audio_spec(wav: np.ndarray | None, cfg: DataConfig, rng: np.random.Generator, train: bool) -> torch.Tensor:
    """Volume jitter, log-mel and SpecAugment of one window `(1, F, Ta)`; zeros for a silent sample."""
    ac = cfg.audio
    if wav is None:
        return A.silent_log_mel(ac.num_mel_bins, _mel_frames(cfg))
    augment = train and cfg.augment.enabled
    if augment:
        wav = A.volume_jitter(wav, cfg.augment.volume_jitter, rng)
    spec = A.log_mel(wav, ac.sample_rate, ac.num_mel_bins, ac.win_ms, ac.hop_ms)
    if augment and cfg.augment.spec_augment:
        spec = A.spec_augment(spec, rng)
    return spec


def _audio_eval(sample: dict, starts: list[float], cfg: DataConfig) -> torch.Tensor:
    """Un-augmented log-mels of all eval windows `(N, 1, F, Ta)`, computed as one batch."""
    ac = cfg.audio
    waves = _audio_windows(sample, starts, cfg)
    if waves[0] is None:
        return A.silent_log_mel(ac.num_mel_bins, _mel_frames(cfg)).expand(len(starts), -1, -1, -1).clone()
    return A.log_mel(np.stack(waves), ac.sample_rate, ac.num_mel_bins, ac.win_ms, ac.hop_ms)


def _mel_frames(cfg: DataConfig) -> int:
    ac = cfg.audio
    return round(ac.seconds * ac.sample_rate) // round(ac.sample_rate * ac.hop_ms / 1000) + 1


def _captions_near_clip(sample: dict, start: float, cfg: DataConfig, tokenizer: Any) -> dict:
    """K captions around the caption closest to the clip's centre (empty rows when the sample has none)."""
    caps = [c for c in sample["meta"].get("captions") or [] if str(c.get("text", "")).strip()]
    if not caps:
        return _tokenize([], cfg, tokenizer)
    centre = start + _clip_seconds(cfg) / 2
    anchor = int(np.argmin([abs((c["start"] + c["end"]) / 2 - centre) for c in caps]))
    return _tokenize([caps[i]["text"] for i in nearest_captions(caps, anchor, cfg.text.num_captions)], cfg, tokenizer)


def _tokenize(texts: list[str], cfg: DataConfig, tokenizer: Any, rows: int | None = None) -> dict:
    """`text (rows, L)` int64 and `text_mask (rows, L)` bool; rows past the captions are all-False padding.

    Same ids as `data_prep.tokenizer.encode_batch` (pad 0, right-padded, truncated to L), but each caption is
    encoded on its own into one numpy buffer: sentencepiece's list call sets up a thread pool even with one
    thread, which costs ~4x the encoding of K=4 short captions.
    """
    rows = cfg.text.num_captions if rows is None else rows
    length = cfg.text.max_tokens
    ids = np.full((rows, length), PAD_ID, dtype=np.int64)  # (rows, L)
    for row, text in enumerate(texts[:rows]):
        pieces = tokenizer.encode(text)[:length]
        ids[row, : len(pieces)] = pieces
    text = torch.from_numpy(ids)
    return {"text": text, "text_mask": text != PAD_ID}
