"""Video for the loader: decode the frames picked by timestamp from in-memory mp4 bytes, as uint8 tensors.

The decoder interface is what a GPU decoder will also implement: `open_video(data, backend, size=...,
pixels=...)` returns a `VideoSource` whose `get_frames(indices)` hands back the distinct wanted frames as uint8
tensors on `source.device`, plus the order that lays them out as the clip. Nothing after the decoder (the
batch's window copy, the device augmentation) cares which device the frames are on.

Frames come in one of two pixel formats (`PIXELS`): `rgb` (`(N, H, W, 3)`) or `yuv420`, the decoder's own
output before any conversion to RGB: luma `(N, H, W)` and the two chroma planes at half resolution
`(N, 2, H/2, W/2)` (what H.264 stores and what a GPU decoder hands over), always BT.601 limited range. Converting
to RGB costs a CPU about as much as decoding itself (libswscale, per frame), so training views travel as YUV and
the batched device step converts them after the crop and resize (`yuv420_to_rgb`, BT.601); eval views are RGB at
the model's size. `vatp data build` stores every clip in BT.601 limited range; a clip from an older build that is
tagged with another matrix (BT.709, BT.2020) or full range is converted to it by the YUV decoder, so the device
step's formula holds for every clip. RGB output honours the tags itself.

Two CPU decoders sit behind it: decord (RGB only; one decoder thread, fault tolerance on, frames handed over
through DLPack without a copy) and PyAV (RGB or YUV; a newer FFmpeg whose H.264 decoding costs about half of
decord's). Both can scale frames while decoding (`size=(h, w)`, RGB), which is how eval views reach the
model's size without a resize pass of their own.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("decord", "pyav")
PIXELS = ("rgb", "yuv420")
# decord raises once more than 1 % of a video's frames had to be "recovered" (duplicated) instead of
# silently handing us repeated frames; its default (-1) never raises.
DECORD_FAULT_TOL = 0.01
# Scaled sizes at which decord's RGB output could not be copied out (its frames came with padded rows: widths
# 1-4, 6, 8, 12, 16, 24, 48 and 72 in decord 0.6.0, any height); later videos at these sizes are decoded at their
# stored size and resized instead of failing first.
_DECORD_UNSCALABLE: set[tuple[int, int]] = set()
# AVColorSpace values that mean the BT.601 matrix: unspecified (what every decoder then assumes), bt470bg, smpte170m.
_BT601_SPACES = (2, 5, 6)
_FULL_RANGE = 2  # AVCOL_RANGE_JPEG

log = logging.getLogger(__name__)


@dataclass
class Clip:
    """The frames of one clip without copies: clip frame `i` is `frames[order[i]]`.

    `frames` uint8 holds each distinct frame once, in time order: RGB `(N, H, W, 3)`, or luma `(N, H, W)` when
    `chroma (N, 2, ceil(H/2), ceil(W/2))` (U, V; 4:2:0) is set. `order (T,)` int64 repeats an index where the
    clip shows a frame twice (a clip sampled faster than the video, or clamped at its end) and runs backwards
    for a time-reversed view.
    """

    frames: torch.Tensor
    order: torch.Tensor
    chroma: torch.Tensor | None = None

    @property
    def num_frames(self) -> int:
        return len(self.order)

    @property
    def size(self) -> tuple[int, int]:
        """`(H, W)` of a frame."""
        return tuple(self.frames.shape[1:3])

    def reversed(self) -> Clip:
        return Clip(self.frames, self.order.flip(0), self.chroma)

    def dense(self) -> torch.Tensor:
        """The clip as one contiguous uint8 RGB `(C, T, H, W)` tensor (a copy; YUV converted)."""
        if self.chroma is None:
            return self.frames[self.order].permute(3, 0, 1, 2).contiguous()
        yuv = upsample_chroma(self.frames[self.order], self.chroma[self.order], 0, 0)  # (T, 3, H, W)
        rgb = yuv420_to_rgb(yuv.transpose(0, 1).float())
        return rgb.round_().clamp_(0, 255).to(torch.uint8)


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
    """decord, RGB only. Scaled decoding (`size`) falls back to decoding at the stored size plus `resize_frames`
    for the sizes decord's own scaling cannot hand over (`_DECORD_UNSCALABLE`)."""

    def __init__(self, data: bytes, size: tuple[int, int] | None = None):
        self._data = data
        self._resize = tuple(size) if size is not None and tuple(size) in _DECORD_UNSCALABLE else None
        self._vr = self._reader(None if self._resize else size)
        self._size = size
        self.fps = float(self._vr.get_avg_fps())
        self.num_frames = len(self._vr)
        self._spans: list[tuple[int, int]] = []  # (first, last) wanted frame of each call

    def _reader(self, size: tuple[int, int] | None):
        import decord

        h, w = size or (-1, -1)
        # One decoder thread per DataLoader worker: more threads per reader barely help (performance.md §2.2).
        return decord.VideoReader(io.BytesIO(self._data), num_threads=1, fault_tol=DECORD_FAULT_TOL, width=w, height=h)

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
        try:
            batch = self._vr.get_batch(wanted)  # decord NDArray (N, H, W, 3)
        except Exception as e:  # decord.DECORDError; its module is imported lazily
            if self._size is None or self._resize is not None or "size must exactly match" not in str(e):
                raise
            self._unscalable()
            batch = self._vr.get_batch(wanted)
        frames = torch.utils.dlpack.from_dlpack(batch.to_dlpack())  # shares decord's buffer: no copy
        if self._resize is not None:
            frames = resize_frames(frames, *self._resize)
        return Clip(frames, order)

    def _unscalable(self) -> None:
        """decord decoded at `size` but could not copy the frames out: decode at the stored size from now on."""
        size = tuple(self._size)
        if size not in _DECORD_UNSCALABLE:
            log.warning(
                "decord cannot hand over frames scaled to %s (h, w); decoding at the stored size and resizing", size
            )
        _DECORD_UNSCALABLE.add(size)
        self._resize = size
        self._vr = self._reader(None)


class PyAVSource(VideoSource):
    """PyAV: RGB frames (scaled to `size` when given) or, with `pixels="yuv420"`, the decoder's planes untouched."""

    def __init__(self, data: bytes, size: tuple[int, int] | None = None, pixels: str = "rgb"):
        import av

        if pixels == "yuv420" and size is not None:
            raise ValueError("PyAV hands over YUV frames at their stored size only (size must be None)")
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
        # Frame i is the one shown i / fps after the stream's first frame: a clip from an older build whose stream
        # starts late (undecodable leading frames) has frames 0, 1, ... as decord counts them.
        self._origin = self._stream.start_time or 0
        self._scale = {} if size is None else {"height": size[0], "width": size[1], "interpolation": "BILINEAR"}
        self._yuv = pixels == "yuv420"
        self.decoded_frames = 0

    def get_frames(self, indices: list[int]) -> Clip:
        wanted, order = _distinct(indices)
        first, last = wanted[0], wanted[-1]
        want = set(wanted)
        tb = self._stream.time_base
        target = self._origin + int(first / self.fps / tb)
        self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        got: dict = {}
        for frame in self._container.decode(self._stream):
            self.decoded_frames += 1
            i = int(round(float((frame.pts - self._origin) * tb) * self.fps))
            if i in want:
                got[i] = frame if self._yuv else frame.to_ndarray(format="rgb24", **self._scale)
            if i >= last:
                break
        # Past the real end (headers over-counting frames): repeat the last decoded frame.
        missing = want - set(got)
        if missing and got:
            last_got = got[max(got)]
            got.update({i: last_got for i in missing if i > max(got)})
        if want - set(got):
            raise ValueError(f"PyAV could not decode frames {sorted(want - set(got))[:5]} (seek target {first})")
        if self._yuv:
            return _yuv_clip([got[i] for i in wanted], order)
        return Clip(torch.from_numpy(np.stack([got[i] for i in wanted])), order)


def _yuv_clip(frames: list, order: torch.Tensor) -> Clip:
    """Luma and chroma planes of PyAV frames copied straight out of the decoder's buffers (row padding
    dropped); a frame in another pixel format, matrix or range is first converted to BT.601 limited yuv420p."""
    h, w = frames[0].height, frames[0].width
    ch, cw = (h + 1) // 2, (w + 1) // 2
    luma = np.empty((len(frames), h, w), dtype=np.uint8)
    chroma = np.empty((len(frames), 2, ch, cw), dtype=np.uint8)
    for k, frame in enumerate(frames):
        y, u, v = bt601_yuv420(frame).planes
        luma[k] = _plane(y, h, w)
        chroma[k, 0], chroma[k, 1] = _plane(u, ch, cw), _plane(v, ch, cw)
    return Clip(torch.from_numpy(luma), order, torch.from_numpy(chroma))


def bt601_yuv420(frame):
    """A PyAV frame as yuv420p with the BT.601 matrix in limited range (what `yuv420_to_rgb` assumes): the frame
    itself when it is already that (every clip `vatp data build` writes), else a converted copy (libswscale
    reads the frame's own tags: a BT.709, BT.2020 or full-range clip from an older build, a 4:4:4 or 10-bit one)."""
    if frame.format.name == "yuv420p" and frame.colorspace in _BT601_SPACES and frame.color_range != _FULL_RANGE:
        return frame
    return frame.reformat(format="yuv420p", dst_colorspace="itu601", dst_color_range="MPEG")


def _plane(plane, height: int, width: int) -> np.ndarray:
    """A PyAV plane's `height` x `width` pixels as a view (rows are `line_size` bytes apart)."""
    return np.frombuffer(plane, np.uint8)[: height * plane.line_size].reshape(height, plane.line_size)[:, :width]


def open_video(
    data: bytes, backend: str = "decord", size: tuple[int, int] | None = None, pixels: str = "rgb"
) -> VideoSource:
    """Open mp4 bytes with `backend` ('decord' or 'pyav'); with `size=(h, w)` the decoder scales every frame;
    `pixels` is the frames' format (`PIXELS`; decord decodes to RGB only)."""
    if pixels not in PIXELS:
        raise ValueError(f"unknown pixel format {pixels!r} (known: {', '.join(PIXELS)})")
    if backend == "decord":
        if pixels != "rgb":
            raise ValueError("decord decodes to RGB only; use the pyav decoder for yuv420 frames")
        return DecordSource(data, size)
    if backend == "pyav":
        return PyAVSource(data, size, pixels)
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


def chroma_box(top: int, left: int, height: int, width: int) -> tuple[int, int, int, int]:
    """`(top, left, h, w)` of the 4:2:0 chroma samples covering the luma box `height` x `width` at (`top`, `left`):
    one sample per 2 x 2 luma pixels, so a box starting on an odd row or column straddles one more. The one place
    this geometry is written: the worker's window copy, the batch's chroma slot, the device step and
    `center_clip` all ask here."""
    return top // 2, left // 2, (top % 2 + height + 1) // 2, (left % 2 + width + 1) // 2


def chroma_slot(height: int, width: int) -> tuple[int, int]:
    """`(h, w)` of a chroma slot that holds the covering samples of any box up to `height` x `width`, at any
    offset (`chroma_box`'s largest)."""
    return height // 2 + 1, width // 2 + 1


def upsample_chroma(luma: torch.Tensor, chroma: torch.Tensor, top_odd: int, left_odd: int) -> torch.Tensor:
    """A YUV 4:4:4 box `(T, 3, h, w)` uint8 from its luma `(T, h, w)` and the chroma rows and columns that cover
    it `(T, 2, ch, cw)`; each chroma sample repeated over its 2 x 2 luma pixels (as libswscale's RGB conversion
    does). `top_odd`/`left_odd`: the box starts on the second row/column of a chroma sample."""
    h, w = luma.shape[1:]
    up = chroma.repeat_interleave(2, -2).repeat_interleave(2, -1)[..., top_odd : top_odd + h, left_odd : left_odd + w]
    return torch.cat([luma.unsqueeze(1), up], 1)


def yuv420_to_rgb(yuv: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Float YUV along `dim` -> float RGB in [0, 255] (not clamped: the caller clamps once after its own float work).

    The BT.601 matrix in limited range, exactly: what every clip holds (`vatp data build` converts each source
    to it, and `PyAVSource` converts clips of older builds tagged otherwise). H.264 itself can carry any matrix
    and range; this formula is only right because of that canonical form."""
    y, u, v = yuv.unbind(dim)
    y = (y - 16) * (255 / 219)
    u = (u - 128) * (255 / 224)
    v = (v - 128) * (255 / 224)
    return torch.stack([y + 1.402 * v, y - 0.344136 * u - 0.714136 * v, y + 1.772 * u], dim)


def center_clip(clip: Clip, size: int) -> torch.Tensor:
    """Eval view of a clip: the centred square of the short side, resized to `size`, as uint8 RGB `(C, T, S, S)`
    (a YUV clip converted after the resize, as the training step does).

    A clip decoded at the right scale (`open_video(..., size=short_side_size(...))`) is only cropped here.
    """
    h, w = clip.size
    side = min(h, w)
    top, left = center_box(h, w, side)
    if clip.chroma is None:
        frames = resize_frames(clip.frames[:, top : top + side, left : left + side], size, size)  # (N, S, S, 3)
        return frames[clip.order].permute(3, 0, 1, 2).contiguous()
    ctop, cleft, ch, cw = chroma_box(top, left, side, side)
    luma = clip.frames[:, top : top + side, left : left + side]
    yuv = upsample_chroma(luma, clip.chroma[:, :, ctop : ctop + ch, cleft : cleft + cw], top % 2, left % 2)
    yuv = resize_frames(yuv.permute(0, 2, 3, 1), size, size).permute(0, 3, 1, 2).float()  # (N, 3, S, S)
    rgb = yuv420_to_rgb(yuv, dim=1).round_().clamp_(0, 255).to(torch.uint8)
    return rgb[clip.order].transpose(0, 1).contiguous()


@dataclass
class VideoWindow:
    """One view as a worker hands it to the batch: the `height` x `width` box at (`top`, `left`) of every frame of
    `clip`. Collation copies it (the only copy of its pixels in the worker) into the batch's uint8 tensors: RGB,
    or for a YUV clip the luma box and the chroma rows and columns that cover it (`chroma_box`)."""

    clip: Clip
    top: int
    left: int
    height: int
    width: int

    def chroma_box(self) -> tuple[int, int, int, int]:
        """`(top, left, h, w)` of the chroma samples covering the box (`chroma_box`)."""
        return chroma_box(self.top, self.left, self.height, self.width)

    def write_into(self, out: torch.Tensor, out_chroma: torch.Tensor | None = None) -> None:
        """Copy the window into `out (T, H, W, 3)` (RGB) or `out (T, H, W)` and `out_chroma (T, 2, Hc, Wc)` (YUV)
        at the top-left corner and zero the rest."""
        frames = self.clip.frames[:, self.top : self.top + self.height, self.left : self.left + self.width]
        _copy_box(frames, self.clip.order, out, self.height, self.width, (1, 2))
        if self.clip.chroma is not None:
            top, left, h, w = self.chroma_box()
            chroma = self.clip.chroma[:, :, top : top + h, left : left + w]
            _copy_box(chroma, self.clip.order, out_chroma, h, w, (2, 3))


def _copy_box(
    frames: torch.Tensor, order: torch.Tensor, out: torch.Tensor, height: int, width: int, spatial: tuple[int, int]
) -> None:
    """`out[t][:height, :width] = frames[order[t]]` over the `spatial` dims of `out`, the rest of `out` zeroed."""
    box = out.narrow(spatial[0], 0, height).narrow(spatial[1], 0, width)
    order_list = order.tolist()
    if order_list == list(range(order_list[0], order_list[0] + len(order_list))):
        box.copy_(frames[order_list[0] : order_list[0] + len(order_list)])  # the usual case: consecutive frames
    else:
        for t, i in enumerate(order_list):
            box[t].copy_(frames[i])
    out.narrow(spatial[0], height, out.shape[spatial[0]] - height).zero_()
    out.narrow(spatial[0], 0, height).narrow(spatial[1], width, out.shape[spatial[1]] - width).zero_()
