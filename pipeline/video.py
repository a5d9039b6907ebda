"""Video for the loader: decode the frames picked by timestamp from in-memory mp4 bytes, as uint8 tensors.

The decoder interface is what a GPU decoder will also implement: `open_video(data, backend, size=...)` returns
a `VideoSource` whose `get_frames(indices)` hands back the distinct wanted frames as a uint8 tensor
`(N, H, W, 3)` on `source.device`, plus the order that lays them out as the clip. Nothing after the decoder
(the batch's window copy, the device augmentation) cares which device the frames are on.

Two CPU decoders sit behind it: decord (the default; one decoder thread, fault tolerance on, frames handed
over through DLPack without a copy) and PyAV. Both can scale frames while decoding (`size=(h, w)`), which is
how eval views reach the model's size without a resize pass of their own.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("decord", "pyav")
# decord raises once more than 1 % of a video's frames had to be "recovered" (duplicated) instead of
# silently handing us repeated frames; its default (-1) never raises.
DECORD_FAULT_TOL = 0.01


@dataclass
class Clip:
    """The frames of one clip without copies: clip frame `i` is `frames[order[i]]`.

    `frames (N, H, W, 3)` uint8 holds each distinct frame once, in time order; `order (T,)` int64 repeats an
    index where the clip shows a frame twice (a clip sampled faster than the video, or clamped at its end) and
    runs backwards for a time-reversed view.
    """

    frames: torch.Tensor
    order: torch.Tensor

    @property
    def num_frames(self) -> int:
        return len(self.order)

    def reversed(self) -> Clip:
        return Clip(self.frames, self.order.flip(0))

    def dense(self) -> torch.Tensor:
        """The clip as one contiguous uint8 `(C, T, H, W)` tensor (a copy)."""
        return self.frames[self.order].permute(3, 0, 1, 2).contiguous()


class VideoSource:
    """An opened video: `fps`, `num_frames`, the `device` its frames land on, and `get_frames(indices) -> Clip`.

    `decoded_frames` counts frames the decoder produced so far (for the frames-decoded-per-frame-used
    figure); it is exact for PyAV and estimated from keyframe positions for decord.
    """

    fps: float
    num_frames: int
    device: torch.device = torch.device("cpu")
    decoded_frames: int

    def get_frames(self, indices: list[int]) -> Clip:
        raise NotImplementedError


class DecordSource(VideoSource):
    def __init__(self, data: bytes, size: tuple[int, int] | None = None):
        import decord

        h, w = size or (-1, -1)
        # One decoder thread per DataLoader worker: more threads per reader barely help (performance.md §2.2).
        self._vr = decord.VideoReader(io.BytesIO(data), num_threads=1, fault_tol=DECORD_FAULT_TOL, width=w, height=h)
        self.fps = float(self._vr.get_avg_fps())
        self.num_frames = len(self._vr)
        self._spans: list[tuple[int, int]] = []  # (first, last) wanted frame of each call

    @property
    def decoded_frames(self) -> int:
        # From the keyframe before each call's first frame to its last; the key list is read only when asked
        # (it costs ~5 % of a clip's decoding).
        keys = np.asarray(self._vr.get_key_indices(), dtype=np.int64)
        total = 0
        for first, last in self._spans:
            before = keys[keys <= first]
            total += last - (int(before[-1]) if len(before) else 0) + 1
        return total

    def get_frames(self, indices: list[int]) -> Clip:
        wanted, order = _distinct(indices)
        self._spans.append((wanted[0], wanted[-1]))
        batch = self._vr.get_batch(wanted)  # decord NDArray (N, H, W, 3)
        return Clip(torch.utils.dlpack.from_dlpack(batch.to_dlpack()), order)  # shares decord's buffer: no copy


class PyAVSource(VideoSource):
    def __init__(self, data: bytes, size: tuple[int, int] | None = None):
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
        self._scale = {} if size is None else {"height": size[0], "width": size[1], "interpolation": "BILINEAR"}
        self.decoded_frames = 0

    def get_frames(self, indices: list[int]) -> Clip:
        wanted, order = _distinct(indices)
        first, last = wanted[0], wanted[-1]
        want = set(wanted)
        tb = self._stream.time_base
        self._container.seek(int(first / self.fps / tb), stream=self._stream, backward=True, any_frame=False)
        got: dict[int, np.ndarray] = {}
        for frame in self._container.decode(self._stream):
            self.decoded_frames += 1
            i = int(round(float(frame.pts * tb) * self.fps))
            if i in want:
                got[i] = frame.to_ndarray(format="rgb24", **self._scale)
            if i >= last:
                break
        # Past the real end (headers over-counting frames): repeat the last decoded frame.
        missing = want - set(got)
        if missing and got:
            last_got = got[max(got)]
            got.update({i: last_got for i in missing if i > max(got)})
        if want - set(got):
            raise ValueError(f"PyAV could not decode frames {sorted(want - set(got))[:5]} (seek target {first})")
        return Clip(torch.from_numpy(np.stack([got[i] for i in wanted])), order)


def open_video(data: bytes, backend: str = "decord", size: tuple[int, int] | None = None) -> VideoSource:
    """Open mp4 bytes with `backend` ('decord' or 'pyav'); with `size=(h, w)` the decoder scales every frame."""
    if backend == "decord":
        return DecordSource(data, size)
    if backend == "pyav":
        return PyAVSource(data, size)
    raise ValueError(f"unknown video decoder {backend!r} (known: {', '.join(BACKENDS)})")


def _distinct(indices: list[int]) -> tuple[list[int], torch.Tensor]:
    """The sorted distinct indices, and for each requested index its position among them."""
    wanted = sorted(set(indices))
    pos = {i: k for k, i in enumerate(wanted)}
    return wanted, torch.tensor([pos[i] for i in indices], dtype=torch.int64)


def frame_indices(start: float, num_frames: int, fps: float, video_fps: float, total: int) -> list[int]:
    """Indices of the frames shown at `start + i / fps` (i < num_frames), clamped to the video."""
    times = start + np.arange(num_frames) / fps
    idx = np.floor(times * video_fps + 1e-6).astype(np.int64)
    return np.clip(idx, 0, total - 1).tolist()


def decode_clip(video: VideoSource, start: float, num_frames: int, fps: float) -> Clip:
    """`num_frames` frames at `fps` from `start` seconds."""
    return video.get_frames(frame_indices(start, num_frames, fps, video.fps, video.num_frames))


def short_side_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """`(h, w)` of a frame scaled so its short side is `short_side` (aspect kept, never below `short_side`)."""
    scale = short_side / min(height, width)
    return max(short_side, round(height * scale)), max(short_side, round(width * scale))


def center_box(height: int, width: int, side: int) -> tuple[int, int]:
    """Top-left corner of the centred `side` x `side` box of a `height` x `width` frame."""
    return (height - side) // 2, (width - side) // 2


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 frames `(N, H, W, 3)` -> `(N, height, width, 3)`, staying in uint8
    (torch's channels-last uint8 kernel on the CPU; other devices resize in float and round back)."""
    if frames.shape[1:3] == (height, width):
        return frames
    x = frames.permute(0, 3, 1, 2)  # (N, 3, H, W), channels-last in memory
    if x.device.type != "cpu":
        x = x.float()
    y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    if y.dtype != torch.uint8:
        y = y.round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1)


def center_clip(clip: Clip, size: int) -> torch.Tensor:
    """Eval view of a clip: the centred square of the short side, resized to `size`, as uint8 `(C, T, S, S)`.

    A clip decoded at the right scale (`open_video(..., size=short_side_size(...))`) is only cropped here.
    """
    h, w = clip.frames.shape[1:3]
    side = min(h, w)
    top, left = center_box(h, w, side)
    frames = resize_frames(clip.frames[:, top : top + side, left : left + side], size, size)  # (N, S, S, 3)
    return frames[clip.order].permute(3, 0, 1, 2).contiguous()


@dataclass
class VideoWindow:
    """One view as a worker hands it to the batch: the `height` x `width` box at (`top`, `left`) of every frame of
    `clip`. Collation copies it (the only copy of its pixels in the worker) into the batch's uint8 tensor."""

    clip: Clip
    top: int
    left: int
    height: int
    width: int

    def write_into(self, out: torch.Tensor) -> None:
        """Copy the window into `out (T, H, W, 3)` at its top-left corner and zero the rest of `out`."""
        frames = self.clip.frames[:, self.top : self.top + self.height, self.left : self.left + self.width]
        order = self.clip.order.tolist()
        box = out[:, : self.height, : self.width]
        if order == list(range(order[0], order[0] + len(order))):
            box.copy_(frames[order[0] : order[0] + len(order)])  # the usual case: consecutive distinct frames
        else:
            for t, i in enumerate(order):
                box[t].copy_(frames[i])
        out[:, self.height :].zero_()
        out[:, : self.height, self.width :].zero_()
