"""Video for the loader: decode frames picked by timestamp from in-memory mp4 bytes, then crop/flip/jitter.

Two decoders sit behind one small interface (`open_video(data, backend)` -> `VideoSource`): decord (the
default, one decoder thread, fault tolerance on) and PyAV. Clips are uint8 tensors `(C, T, H, W)`; every
augmentation is a pure function of the clip and a numpy `Generator`, so a seeded sample is reproducible.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("decord", "pyav")
# decord raises once more than 1 % of a video's frames had to be "recovered" (duplicated) instead of
# silently handing us repeated frames; its default (-1) never raises.
DECORD_FAULT_TOL = 0.01


class VideoSource:
    """An opened video: `fps`, `num_frames`, and `get_frames(indices) -> (N, H, W, 3) uint8`.

    `decoded_frames` counts frames the decoder produced so far (for the frames-decoded-per-frame-used
    figure); it is exact for PyAV and estimated from keyframe positions for decord.
    """

    fps: float
    num_frames: int
    decoded_frames: int

    def get_frames(self, indices: list[int]) -> np.ndarray:
        raise NotImplementedError


class DecordSource(VideoSource):
    def __init__(self, data: bytes):
        import decord

        # One decoder thread per DataLoader worker: more threads per reader barely help (performance.md §2.2).
        self._vr = decord.VideoReader(io.BytesIO(data), num_threads=1, fault_tol=DECORD_FAULT_TOL)
        self.fps = float(self._vr.get_avg_fps())
        self.num_frames = len(self._vr)
        self._keys = np.asarray(self._vr.get_key_indices(), dtype=np.int64)
        self.decoded_frames = 0

    def get_frames(self, indices: list[int]) -> np.ndarray:
        wanted = sorted(set(indices))
        key = self._keys[self._keys <= wanted[0]]
        self.decoded_frames += wanted[-1] - (int(key[-1]) if len(key) else 0) + 1
        frames = self._vr.get_batch(wanted).asnumpy()  # (N', H, W, 3)
        pos = {i: k for k, i in enumerate(wanted)}
        return frames[[pos[i] for i in indices]]


class PyAVSource(VideoSource):
    def __init__(self, data: bytes):
        import av

        self._container = av.open(io.BytesIO(data))
        self._stream = self._container.streams.video[0]
        self._stream.codec_context.thread_count = 1
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.fps = float(rate)
        frames = self._stream.frames
        if not frames:
            duration = float(self._container.duration or 0) / 1_000_000
            frames = int(round(duration * self.fps))
        self.num_frames = int(frames)
        self.decoded_frames = 0

    def get_frames(self, indices: list[int]) -> np.ndarray:
        wanted = set(indices)
        first, last = min(wanted), max(wanted)
        tb = self._stream.time_base
        self._container.seek(int(first / self.fps / tb), stream=self._stream, backward=True, any_frame=False)
        got: dict[int, np.ndarray] = {}
        for frame in self._container.decode(self._stream):
            self.decoded_frames += 1
            i = int(round(float(frame.pts * tb) * self.fps))
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
        # Past the real end (headers over-counting frames): repeat the last decoded frame.
        missing = wanted - set(got)
        if missing and got:
            last_got = got[max(got)]
            got.update({i: last_got for i in missing if i > max(got)})
        if wanted - set(got):
            raise ValueError(f"PyAV could not decode frames {sorted(wanted - set(got))[:5]} (seek target {first})")
        return np.stack([got[i] for i in indices])


def open_video(data: bytes, backend: str = "decord") -> VideoSource:
    """Open mp4 bytes with `backend` ('decord' or 'pyav')."""
    if backend == "decord":
        return DecordSource(data)
    if backend == "pyav":
        return PyAVSource(data)
    raise ValueError(f"unknown video decoder {backend!r} (known: {', '.join(BACKENDS)})")


def frame_indices(start: float, num_frames: int, fps: float, video_fps: float, total: int) -> list[int]:
    """Indices of the frames shown at `start + i / fps` (i < num_frames), clamped to the video."""
    times = start + np.arange(num_frames) / fps
    idx = np.floor(times * video_fps + 1e-6).astype(np.int64)
    return np.clip(idx, 0, total - 1).tolist()


def decode_clip(video: VideoSource, start: float, num_frames: int, fps: float) -> torch.Tensor:
    """`num_frames` frames at `fps` from `start` seconds, as uint8 `(C, T, H, W)`."""
    idx = frame_indices(start, num_frames, fps, video.fps, video.num_frames)
    frames = video.get_frames(idx)  # (T, H, W, 3)
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).contiguous()


def resize_clip(clip: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of a uint8 `(C, T, H, W)` clip."""
    if clip.shape[-2:] == (height, width):
        return clip
    x = clip.permute(1, 0, 2, 3).float()  # (T, C, H, W)
    x = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8).permute(1, 0, 2, 3).contiguous()


def center_crop(clip: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the short side to `size`, then take the centre `size` x `size` square."""
    h, w = clip.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    clip = resize_clip(clip, nh, nw)
    top, left = (nh - size) // 2, (nw - size) // 2
    return clip[..., top : top + size, left : left + size].contiguous()


def random_resized_crop(
    clip: torch.Tensor,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.5, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """One random box (area fraction in `scale`, aspect in `ratio`) for all frames, resized to `size`^2."""
    h, w = clip.shape[-2:]
    for _ in range(10):
        area = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
            return resize_clip(clip[..., top : top + ch, left : left + cw], size, size)
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return resize_clip(clip[..., top : top + side, left : left + side], size, size)


def hflip(clip: torch.Tensor) -> torch.Tensor:
    """Mirror left-right."""
    return clip.flip(-1)


def color_jitter(clip: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], applied on the channel axis (dim 0).

    GDT's version indexes channels on dim 1 of a (C, T, H, W) tensor (i.e. time); here the grey image
    and the means are taken over the real channel axis.
    """
    if strength <= 0:
        return clip
    b, c, s = rng.uniform(1 - strength, 1 + strength, size=3)
    x = clip.float() * b
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)  # (1, T, H, W)
    x = (x - grey.mean(dim=(2, 3), keepdim=True)) * c + grey.mean(dim=(2, 3), keepdim=True)
    grey = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
    x = grey + (x - grey) * s
    return x.round().clamp(0, 255).to(torch.uint8)


def augment_clip(
    clip: torch.Tensor,
    size: int,
    rng: np.random.Generator,
    *,
    scale: tuple[float, float],
    flip: bool,
    jitter: float,
) -> torch.Tensor:
    """Training augmentation of a `(C, T, H, W)` uint8 clip: random resized crop, optional flip, colour jitter."""
    clip = random_resized_crop(clip, size, rng, scale)
    if flip and rng.random() < 0.5:
        clip = hflip(clip)
    return color_jitter(clip, jitter, rng)
