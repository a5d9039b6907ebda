"""Training augmentation in two halves: loader workers draw each view's parameters, a batched step applies them.

Workers decode and cut, nothing more: for every training view they draw a crop box (random resized crop), a
flip and colour-jitter factors (video), a gain and SpecAugment masks (audio) from the sample's seeded numpy
generator, and hand over the uint8 pixels of the box plus the parameters: the raw batch's `video_box` (RGB, or
luma with `video_uv` chroma), `video_aug (B, V, 8)` (columns `VIDEO_PARAMS`) and `audio_aug (B, V, 5)`
(`AUDIO_PARAMS`). `augment_batch` then does the float work for the whole batch on whatever device the batch is
on and writes the model's input `video`: crop-and-resize each box to the model's size (uint8 on the CPU, float
elsewhere), convert YUV to RGB, flip, jitter, normalise with the model's mean/std, and the audio gain and masks.
Because the parameters travel with the batch, the result does not depend on where the step runs (in the
training process after the copy, or at the end of a worker's batch) nor on which worker drew them.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from models.contracts import normalize_video
from pipeline.audio import LOG_EPS
from pipeline.video import center_box, chroma_box, upsample_chroma, yuv420_to_rgb

if TYPE_CHECKING:
    from pipeline.data_config import AugmentConfig, DataConfig

# chroma_top/left: the box starts on a chroma sample's second row/column (odd top/left; YUV batches only).
VIDEO_PARAMS = ("height", "width", "flip", "brightness", "contrast", "saturation", "chroma_top", "chroma_left")
AUDIO_PARAMS = ("gain", "freq_start", "freq_width", "time_start", "time_width")
VIDEO_COLUMN = {name: i for i, name in enumerate(VIDEO_PARAMS)}  # the column of each video parameter
AUDIO_COLUMN = {name: i for i, name in enumerate(AUDIO_PARAMS)}
JITTER = slice(VIDEO_COLUMN["brightness"], VIDEO_COLUMN["saturation"] + 1)  # the colour-jitter factors
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights, as torchvision's rgb_to_grayscale
SPEC_FREQ_WIDTH, SPEC_TIME_WIDTH = 3, 6  # GDT's "medium" SpecAugment: one mask each, width below these


# ---- worker side: draw the parameters of one view


def center_square(height: int, width: int) -> tuple[int, int, int, int]:
    """The box `(top, left, h, w)` of the centred square of the short side."""
    side = min(height, width)
    return (*center_box(height, width, side), side, side)


def draw_box(
    height: int,
    width: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A random resized crop's box `(top, left, h, w)`: area fraction in `scale`, aspect in `ratio`; after ten
    misses the centred square of the short side (torchvision's rule, with a numpy generator)."""
    for _ in range(10):
        area = height * width * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return center_square(height, width)


def draw_video_view(
    height: int, width: int, aug: AugmentConfig, rng: np.random.Generator | None
) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """One video view's box in a `height` x `width` frame and its `VIDEO_PARAMS` row.

    Without `rng` (or with augmentation off) the box is the centred square of the short side, unflipped and
    unjittered: the device step then only resizes and normalises.
    """
    if rng is None or not aug.enabled:
        box = center_square(height, width)
        return box, video_params(box)
    box = draw_box(height, width, rng, aug.crop_scale)
    flip = aug.flip and rng.random() < 0.5
    s = aug.color_jitter
    factors = rng.uniform(1 - s, 1 + s, size=3) if s > 0 else np.ones(3)
    return box, video_params(box, flip, factors)


def video_params(box: tuple[int, int, int, int], flip: bool = False, factors=(1.0, 1.0, 1.0)) -> np.ndarray:
    """The `VIDEO_PARAMS` row of one view: its box `(top, left, h, w)`, flip and jitter factors."""
    top, left, h, w = box
    row = np.zeros(len(VIDEO_PARAMS), dtype=np.float32)
    row[[VIDEO_COLUMN["height"], VIDEO_COLUMN["width"], VIDEO_COLUMN["flip"]]] = h, w, flip
    row[JITTER] = factors
    row[[VIDEO_COLUMN["chroma_top"], VIDEO_COLUMN["chroma_left"]]] = top % 2, left % 2
    return row


def draw_audio_view(mel_bins: int, frames: int, aug: AugmentConfig, rng: np.random.Generator | None) -> np.ndarray:
    """One audio view's `AUDIO_PARAMS` row: a gain in [1 - v, 1 + v] and one frequency and one time mask
    (widths below 3 bins and 6 frames, GDT's "medium" SpecAugment); identity without `rng`."""
    col = AUDIO_COLUMN
    row = np.zeros(len(AUDIO_PARAMS), dtype=np.float32)
    row[col["gain"]] = 1
    if rng is None or not aug.enabled:
        return row
    if aug.volume_jitter > 0:
        row[col["gain"]] = rng.uniform(1 - aug.volume_jitter, 1 + aug.volume_jitter)
    if aug.spec_augment:
        fw = int(rng.integers(0, SPEC_FREQ_WIDTH))
        row[[col["freq_start"], col["freq_width"]]] = int(rng.integers(0, max(mel_bins - fw, 0) + 1)), fw
        tw = int(rng.integers(0, SPEC_TIME_WIDTH))
        row[[col["time_start"], col["time_width"]]] = int(rng.integers(0, max(frames - tw, 0) + 1)), tw
    return row


def mirror_audio_view(row: np.ndarray, frames: int) -> np.ndarray:
    """The parameters that augment a time-reversed spectrogram exactly as `row` augments the forward one."""
    out = row.copy()
    start, width = AUDIO_COLUMN["time_start"], AUDIO_COLUMN["time_width"]
    out[start] = frames - row[start] - row[width]
    return out


# ---- the batched step


def augment_batch(batch: dict, cfg: DataConfig) -> dict:
    """Turn a raw training batch into the model's input on its device: `video_box` uint8 boxes (RGB, or luma with
    `video_uv` chroma) and `video_aug` -> `video`, float RGB `(B, V, 3, T, S, S)` normalised with the model's
    mean/std; `audio` -> gain and masks of `audio_aug` applied. The raw keys are consumed.

    A batch without raw keys (eval views, or already augmented) is returned unchanged.
    """
    if "video_box" in batch:
        chroma = batch.pop("video_uv", None)
        batch["video"] = augment_video(
            batch.pop("video_box"), batch.pop("video_aug"), cfg.size, cfg.mean, cfg.std, chroma
        )
    if "audio_aug" in batch:
        batch["audio"] = augment_audio(batch["audio"], batch.pop("audio_aug"))
    return batch


def augment_video(
    video: torch.Tensor,
    params: torch.Tensor,
    size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    chroma: torch.Tensor | None = None,
    uint8_resize: bool | None = None,
) -> torch.Tensor:
    """Crop-resize, flip, jitter and normalise every view of a batch.

    `video (B, V, C, T, H, W)` uint8 holds each view's box at the top-left of its slot (the rest is padding):
    RGB, or luma (C = 1) with `chroma (B, V, 2, T, Hc, Wc)`, the 4:2:0 chroma rows and columns covering each box.
    A YUV box is resized as YUV 4:4:4 (chroma repeated over its 2 x 2 pixels) and converted to RGB at the model's
    size, where it costs least. `params (B, V, 8)` are `VIDEO_PARAMS` on the CPU. Returns float32
    `(B, V, 3, T, size, size)`. `uint8_resize` (default: on the CPU) resizes in uint8, torch's fast CPU kernel;
    accelerators resize in float.
    """
    uint8_resize = video.device.type == "cpu" if uint8_resize is None else uint8_resize
    b, v, _, t = video.shape[:4]
    col = VIDEO_COLUMN
    out = torch.empty(b * v, 3, t, size, size, dtype=torch.float32, device=video.device)
    for n, row in enumerate(params.reshape(-1, len(VIDEO_PARAMS)).tolist()):
        h, w = int(row[col["height"]]), int(row[col["width"]])
        if chroma is None:
            box = video[n // v, n % v, :, :, :h, :w].permute(1, 0, 2, 3)  # (T, C, h, w)
        else:
            odd_top, odd_left = int(row[col["chroma_top"]]), int(row[col["chroma_left"]])
            _, _, ch, cw = chroma_box(odd_top, odd_left, h, w)
            uv = chroma[n // v, n % v, :, :, :ch, :cw].transpose(0, 1)  # (T, 2, ch, cw)
            box = upsample_chroma(video[n // v, n % v, 0, :, :h, :w], uv, odd_top, odd_left)  # (T, 3, h, w)
        frames = _resize(box, size, uint8_resize)  # (T, C, S, S) float
        if chroma is not None:
            frames = yuv420_to_rgb(frames, dim=1).clamp_(0, 255)  # per view: small temporaries, cache-warm
        frames = frames.transpose(0, 1)  # (C, T, S, S)
        out[n] = frames.flip(-1) if row[col["flip"]] else frames
    if bool((params[..., JITTER] == 1).all()):
        out.clamp_(0, 255)  # a float resize may overshoot a little
    else:
        factors = params.to(video.device, non_blocking=True).reshape(-1, len(VIDEO_PARAMS))[:, JITTER]  # (N, 3)
        _color_jitter_(out, factors)
    return normalize_video(out, mean, std).unflatten(0, (b, v))


def _resize(box: torch.Tensor, size: int, uint8_resize: bool) -> torch.Tensor:
    """`(T, C, h, w)` uint8 -> `(T, C, size, size)` float, antialiased bilinear."""
    if box.shape[-2:] == (size, size):
        return box.float()
    if uint8_resize:
        box = box.contiguous(memory_format=torch.channels_last)  # the fast uint8 kernel wants dense NHWC
    else:
        box = box.float()
    return F.interpolate(box, size=(size, size), mode="bilinear", align_corners=False, antialias=True).float()


def _color_jitter_(x: torch.Tensor, factors: torch.Tensor) -> None:
    """In place on `x (N, C, T, H, W)` in [0, 255]: brightness, then contrast around each frame's mean grey,
    then saturation around the grey image, per clip; clamped to [0, 255]."""
    f = factors.reshape(-1, 3, 1, 1, 1, 1)  # (N, 3, 1, 1, 1, 1)
    x.mul_(f[:, 0])
    mean = _grey(x).mean(dim=(3, 4), keepdim=True)  # (N, 1, T, 1, 1)
    x.sub_(mean).mul_(f[:, 1]).add_(mean)
    grey = _grey(x)  # (N, 1, T, H, W)
    x.sub_(grey).mul_(f[:, 2]).add_(grey).clamp_(0, 255)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma `(N, 1, T, H, W)` of RGB `(N, 3, T, H, W)`."""
    return GREY[0] * x[:, 0:1] + GREY[1] * x[:, 1:2] + GREY[2] * x[:, 2:3]


def augment_audio(spec: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Gain and SpecAugment masks on log-mels `(B, V, 1, F, Ta)` with `params (B, V, 5)` (`AUDIO_PARAMS`).

    The gain g scales the waveform, so the mel power by g^2: `log(g^2 (exp(s) - eps) + eps)` is exactly the
    log-mel of the scaled waveform. Masked bins are set to 0, as GDT does.
    """
    p = params.to(spec.device, non_blocking=True).reshape(*spec.shape[:2], 1, 1, 1, len(AUDIO_PARAMS))
    gain, fs, fw, ts, tw = (p[..., AUDIO_COLUMN[name]] for name in AUDIO_PARAMS)  # each (B, V, 1, 1, 1)
    if not bool((params[..., AUDIO_COLUMN["gain"]] == 1).all()):
        spec = torch.log((spec.exp() - LOG_EPS).clamp_min_(0).mul_(gain.square()).add_(LOG_EPS))
    f = torch.arange(spec.shape[-2], device=spec.device).view(-1, 1)  # (F, 1)
    t = torch.arange(spec.shape[-1], device=spec.device)  # (Ta,)
    masked = ((f >= fs) & (f < fs + fw)) | ((t >= ts) & (t < ts + tw))
    return spec.masked_fill(masked, 0.0)
