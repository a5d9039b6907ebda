"""Views: pure per-sample functions that turn one checked sample into one batch row, one sampler per objective.

A checked sample is `{"key", "video": mp4 bytes, "audio": flac/wav bytes | None, "meta": json dict, "idx",
"label", "has_audio"}` (`pipeline.stages.CheckSample`). A row holds what a worker must produce and nothing
more: `video`, a list of V `VideoWindow`s (the decoded frames of each view's crop box, not yet copied), and for
training views `video_aug (V, 8)` with the parameters the batched augmentation step applies
(`pipeline.augment`); when enabled `audio (V, 1, F, Ta)` log-mels (+ `audio_aug (V, 5)`), `text (K, L)` +
`text_mask` (eval views: every caption, `captions (K, L)` + `captions_mask`); and `idx`, `label`, `has_audio`
as Python values. `pipeline.batch_memory.collate_rows` turns rows into a batch (training rows into the raw
`video_box` the device step turns into the model's `video`). All randomness comes from the `rng` argument.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline import audio as A
from pipeline import augment as Aug
from pipeline import video as Vd
from pipeline.data_config import mel_frames
from pipeline.dataset import PAD_ID

if TYPE_CHECKING:
    from pipeline.data_config import DataConfig


class SampleRejected(Exception):
    """A sample the loader skips; `reason` is the key it is counted under in `Loader.skipped`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def sample_views(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """Dispatch to the sampler named by `cfg.views`."""
    sampler = {"milnce": sample_milnce, "gdt": sample_gdt, "selflabel": sample_selflabel, "eval": sample_eval}
    return sampler[cfg.views](sample, cfg, rng, tokenizer)


def sample_milnce(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """One clip around a random anchor caption plus the K captions nearest to it (HowTo100M loader)."""
    video, duration = _open(sample, cfg)
    caps = captions(sample)
    anchor = int(rng.integers(len(caps)))
    lo, hi = _padded_span(caps[anchor], _clip_seconds(cfg))
    start = float(rng.uniform(lo, max(lo, hi - _clip_seconds(cfg))))
    start = _clamp_start(start, duration, cfg)
    out = _common(sample)
    out.update(_video_views([_decode(video, start, cfg)], cfg, rng))
    if cfg.audio.enabled:
        out.update(_audio_views(sample, [start], cfg, rng))
    out.update(
        _tokenize([caps[i]["text"] for i in nearest_captions(caps, anchor, cfg.text.num_captions)], cfg, tokenizer)
    )
    return out


def sample_gdt(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """Four views in the order base, reversed, shifted, shifted+reversed, each with its aligned audio.

    Video augmentation is drawn independently for each view (as GDT). Audio augmentation is drawn once per
    start time, and the reversed view gets its mirror, so a reversed spectrogram is exactly the time-flip of
    its forward one.
    """
    video, duration = _open(sample, cfg)
    t_base, t_shift = gdt_starts(duration, _clip_seconds(cfg), cfg.gdt_shift_seconds, rng)
    clips = []
    for start in (t_base, t_shift):
        clip = _decode(video, start, cfg)
        clips += [clip, clip.reversed()]
    out = _common(sample)
    out.update(_video_views(clips, cfg, rng))
    if cfg.audio.enabled:
        audio = _audio_views(sample, [t_base, t_shift], cfg, rng)  # (2, 1, F, Ta), (2, 5)
        frames = audio["audio"].shape[-1]
        out["audio"] = torch.stack(
            [audio["audio"][0], audio["audio"][0].flip(-1), audio["audio"][1], audio["audio"][1].flip(-1)]
        )
        rows = audio["audio_aug"].numpy()
        mirrored = [rows[0], Aug.mirror_audio_view(rows[0], frames), rows[1], Aug.mirror_audio_view(rows[1], frames)]
        out["audio_aug"] = torch.from_numpy(np.stack(mirrored))  # (4, 5)
    if cfg.text.enabled:
        out.update(_captions_near_clip(sample, t_base, cfg, tokenizer))
    return out


def sample_selflabel(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """One random clip, its aligned audio and the sample's idx (the self-label row it trains)."""
    video, duration = _open(sample, cfg)
    start = float(rng.uniform(0, max(duration - _clip_seconds(cfg), 0)))
    out = _common(sample)
    out.update(_video_views([_decode(video, start, cfg)], cfg, rng))
    if cfg.audio.enabled:
        out.update(_audio_views(sample, [start], cfg, rng))
    if cfg.text.enabled:
        out.update(_captions_near_clip(sample, start, cfg, tokenizer))
    return out


def eval_window_starts(
    duration: float,
    clip_seconds: float,
    windows: int,
    *,
    placement: str = "spread",
    end_gap: float = 0.0,
    span: tuple[float, float] | None = None,
) -> list[float]:
    """Window starts (seconds into the sample) of the eval view.

    `spread`: `windows` evenly spaced clips over `span` (default the whole sample), the first at its start and the
    last ending `end_gap` seconds before its end (all at the start when the span is shorter than that); with
    `captions` placement `span` is the captions' and a clip may run on past it, into what follows. `middle`: one
    clip centred on the span (SeLaVi's protocol). `windows` 0: one clip at 0 whose frames spread over the sample.
    """
    if windows == 0:
        return [0.0]
    lo, hi = (0.0, duration) if span is None else span
    if placement == "middle":
        return [max(lo, (lo + hi - clip_seconds) / 2)]
    return np.linspace(lo, max(hi - clip_seconds - end_gap, lo), windows).tolist()


def eval_span(meta: dict, duration: float, placement: str) -> tuple[float, float]:
    """What the eval windows cover: the captions' span for `captions` placement (the whole sample when it has no
    timed caption), else the whole sample."""
    times = [(c["start"], c["end"]) for c in meta.get("captions") or [] if "start" in c and "end" in c]
    if placement != "captions" or not times:
        return 0.0, duration
    return min(a for a, _ in times), min(max(b for _, b in times), duration)


def sample_eval(sample: dict, cfg: DataConfig, rng: np.random.Generator, tokenizer: Any) -> dict:
    """N uniformly spaced windows (or, with N=0, num_frames spread over the whole clip), centre crop.

    Deterministic: `rng` is not used. Frames are decoded straight at the model's size where the sample's json
    gives the stored frame size (the decoder scales them), so the worker only cuts the centre square and no
    augmentation step follows. Text is every caption of the sample as `captions (K, L)` + `captions_mask`,
    K varying from sample to sample (collation concatenates them and counts them in `caption_count`).
    """
    size = _scaled_size(sample["meta"], cfg.size)
    video, duration = _open(sample, cfg, size=size, train=False)
    span = eval_span(sample["meta"], duration, cfg.eval_placement)
    starts = eval_window_starts(
        duration,
        _clip_seconds(cfg),
        cfg.eval_windows,
        placement=cfg.eval_placement,
        end_gap=cfg.eval_end_gap,
        span=span,
    )
    fps = cfg.num_frames / max(duration, 1e-6) if cfg.eval_windows == 0 else cfg.fps
    out = _common(sample)
    windows = []
    for start in starts:
        clip = _decode(video, start, cfg, fps=fps)
        if size is None:  # frame size unknown before decoding: crop, then resize in uint8
            clip = Vd.Clip(Vd.center_clip(clip, cfg.size).permute(1, 2, 3, 0), torch.arange(cfg.num_frames))
        h, w = clip.frames.shape[1:3]
        windows.append(Vd.VideoWindow(clip, *Vd.center_box(h, w, cfg.size), cfg.size, cfg.size))
    out["video"] = windows
    if cfg.audio.enabled:
        out["audio"] = _audio_eval(sample, starts, cfg)  # (N, 1, F, Ta)
    caps = [c["text"] for c in sample["meta"].get("captions") or [] if c.get("text", "").strip()]
    if cfg.text.enabled:  # every caption, however many: collated flat, not padded to the batch's longest list
        tokens = _tokenize(caps, cfg, tokenizer, rows=len(caps))
        out.update(captions=tokens["text"], captions_mask=tokens["text_mask"])
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


def captions(sample: dict) -> list[dict]:
    """The sample's non-empty captions; `SampleRejected("no_captions")` when there are none."""
    caps = [c for c in sample["meta"].get("captions") or [] if str(c.get("text", "")).strip()]
    if not caps:
        raise SampleRejected("no_captions")
    return caps


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


def _scaled_size(meta: dict, short_side: int) -> tuple[int, int] | None:
    """The decoder's output size for an eval view (short side = the model's size), from the json's frame size.

    The long side is rounded to the parity of the short one, so the centred square sits exactly in the middle
    (456 x 256 at 224: 400 wide, not 399 with the crop half a pixel off centre)."""
    h, w = meta.get("height"), meta.get("width")
    if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0):
        return None
    scale = short_side / min(h, w)
    sides = [short_side + 2 * round((side * scale - short_side) / 2) for side in (h, w)]
    return max(short_side, sides[0]), max(short_side, sides[1])


def _open(
    sample: dict, cfg: DataConfig, size: tuple[int, int] | None = None, train: bool = True
) -> tuple[Vd.VideoSource, float]:
    """Open the sample's video: training views as YUV (the device step converts), eval views as RGB."""
    backend, pixels = decoder_for(cfg.decoder, train)
    try:
        video = Vd.open_video(sample["video"], backend, size=size, pixels=pixels)
    except Exception as e:
        raise SampleRejected("video_decode", f"{type(e).__name__}: {e}") from e
    if video.num_frames <= 0 or video.fps <= 0:
        raise SampleRejected("video_decode", f"{video.num_frames} frames at {video.fps} fps")
    return video, video.num_frames / video.fps


def decoder_for(decoder: str, train: bool) -> tuple[str, str]:
    """`(backend, pixels)` for the `decoder` setting: `auto` decodes training views with PyAV to YUV (half of
    decord's CPU per clip: no colour conversion in the worker, a newer H.264 decoder) and eval views, which
    want RGB at the model's size, with decord (its scaled RGB output is the cheaper one there)."""
    if decoder == "auto":
        decoder = "pyav" if train else "decord"
    return decoder, "yuv420" if train and decoder == "pyav" else "rgb"


def _decode(video: Vd.VideoSource, start: float, cfg: DataConfig, fps: float | None = None) -> Vd.Clip:
    try:
        return Vd.decode_clip(video, start, cfg.num_frames, fps or cfg.fps)
    except Exception as e:
        raise SampleRejected("video_decode", f"{type(e).__name__}: {e}") from e


def _common(sample: dict) -> dict:
    # Plain Python values: collation makes one tensor per batch of them.
    return {"idx": int(sample["idx"]), "label": int(sample["label"]), "has_audio": bool(sample["has_audio"])}


def _video_views(clips: list[Vd.Clip], cfg: DataConfig, rng: np.random.Generator) -> dict:
    """Each clip's crop box (a `VideoWindow`) and augmentation parameters `video_aug (V, 8)`."""
    windows, params = [], []
    for clip in clips:
        h, w = clip.size
        (top, left, bh, bw), row = Aug.draw_video_view(h, w, cfg.augment, rng)
        windows.append(Vd.VideoWindow(clip, top, left, bh, bw))
        params.append(row)
    return {"video": windows, "video_aug": torch.from_numpy(np.stack(params))}


def _audio_views(sample: dict, starts: list[float], cfg: DataConfig, rng: np.random.Generator) -> dict:
    """Un-augmented log-mels `(W, 1, F, Ta)` of the windows at `starts` and their drawn `audio_aug (W, 5)`;
    zeros and identity parameters for a silent sample."""
    ac = cfg.audio
    frames = mel_frames(cfg)
    if sample["audio"] is None:
        spec = A.silent_log_mel(ac.num_mel_bins, frames).expand(len(starts), -1, -1, -1).clone()
        params = [Aug.draw_audio_view(ac.num_mel_bins, frames, cfg.augment, None) for _ in starts]
    else:
        spec = A.log_mel(
            np.stack(_audio_windows(sample, starts, cfg)), ac.sample_rate, ac.num_mel_bins, ac.win_ms, ac.hop_ms
        )
        params = [Aug.draw_audio_view(ac.num_mel_bins, frames, cfg.augment, rng) for _ in starts]
    return {"audio": spec, "audio_aug": torch.from_numpy(np.stack(params))}


def _audio_windows(sample: dict, starts: list[float], cfg: DataConfig) -> list[np.ndarray]:
    """The waveform of each window at the configured rate (one decode pass)."""
    ac = cfg.audio
    try:
        waves, sr = A.read_windows(sample["audio"], starts, ac.seconds)  # (W, n)
    except Exception as e:
        raise SampleRejected("audio_decode", f"{type(e).__name__}: {e}") from e
    return [A.resample(wav, sr, ac.sample_rate) for wav in waves]


def _audio_eval(sample: dict, starts: list[float], cfg: DataConfig) -> torch.Tensor:
    """Un-augmented log-mels of all eval windows `(N, 1, F, Ta)`, computed as one batch."""
    return _audio_views(sample, starts, cfg, None)["audio"]


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

    Same ids as `pipeline.dataset.encode_batch` (pad 0, right-padded, truncated to L), but each caption is
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
