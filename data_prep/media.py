"""Probe a source video (PyAV) and canonicalise one chunk of it (ffmpeg): the media half of `vatp data build`.

Every call on an untrusted file either returns a result or raises `MediaError(reason, detail)`; ffmpeg runs
as an argv list with a timeout, in a temporary directory that is removed whatever happens. The one exception is
storage: a temporary folder that is full or read-only fails every chunk alike, so it raises `StorageError` and
stops the build instead of being counted against each chunk.
"""

from __future__ import annotations

import errno
import glob
import io
import math
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from fractions import Fraction

import av
import imageio_ffmpeg
import soundfile
from av.video.reformatter import ColorPrimaries, ColorTrc

# Failure reasons (also the keys of `failed` in stats and in the build summary).
EMPTY_FILE = "empty_file"
NOT_MEDIA = "not_media"
NO_VIDEO = "no_video_stream"
NO_FRAMES = "no_frames"
UNREADABLE = "unreadable"
TRANSCODE_FAILED = "transcode_failed"
TRANSCODE_TIMEOUT = "transcode_timeout"


TEMP_PREFIX = "vatp-chunk-"  # + the worker's pid, so a later run can tell leftovers of killed workers

# Every stored clip is BT.601 YUV in limited ("tv") range, whatever the source's matrix and range: the one
# encoding `pipeline.video.yuv420_to_rgb` (the training step's conversion) is right for. Recorded in dataset.json.
CANONICAL_COLOR = "bt601-tv"
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the temporary folder cannot take ffmpeg's output


class MediaError(Exception):
    """A source (or one chunk of it) that cannot become a sample; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class StorageError(OSError):
    """The temporary folder is full or read-only (`errno` ENOSPC, EDQUOT or EROFS; `filename` is the folder): no
    chunk can be written there, so the build stops instead of failing each chunk."""


@dataclass(frozen=True)
class MediaInfo:
    """What the builder needs to know about a source before transcoding it."""

    duration: float
    codec: str
    width: int
    height: int
    fps: float
    frames: int  # from the container header; 0 when the container does not say
    rotation: int
    has_audio: bool
    # Seconds from the container's start to the first decodable frame: audio may come first, and a stream cut
    # mid-GOP (a recording joined late) holds frames that cannot be decoded before its first keyframe.
    video_start: float = 0.0
    color: dict = field(default_factory=dict)  # the source's colour tags (`_color_tags`); clips are CANONICAL_COLOR


@dataclass(frozen=True)
class ChunkMedia:
    """One canonical chunk: encoded bytes plus the facts measured on those bytes."""

    video: bytes
    audio: bytes | None
    fps: float
    num_frames: int
    width: int
    height: int
    audio_seconds: float
    dropped: tuple[str, str] | None = None  # (reason, detail) when the source's audio was left out of the chunk


def probe_media(path: str) -> MediaInfo:
    """Open `path` with PyAV and decide early whether it can be a video sample.

    Decodes the first video frame, so a file whose header looks fine but holds no decodable picture
    is rejected here rather than after a transcode.
    """
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise MediaError(UNREADABLE, str(e)) from None
    if size == 0:
        raise MediaError(EMPTY_FILE, "0 bytes")
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.InvalidDataError as e:
        raise MediaError(NOT_MEDIA, str(e)) from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise MediaError(UNREADABLE, str(e)) from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["nothing"]
            raise MediaError(NO_VIDEO, f"streams: {', '.join(kinds)}")
        stream = container.streams.video[0]
        if stream.codec_context.name in ("png", "mjpeg", "bmp", "gif", "webp") and (stream.frames or 0) <= 1:
            raise MediaError(NOT_MEDIA, f"a still image ({stream.codec_context.name})")
        first = _first_frame(container, stream)
        video_start, duration = _video_span(container, stream, first)
        rate = stream.average_rate or stream.guessed_rate or Fraction(0)
        return MediaInfo(
            duration=duration,
            codec=stream.codec_context.name,
            width=first.width,
            height=first.height,
            fps=float(rate),
            frames=int(stream.frames or 0),
            rotation=int(getattr(first, "rotation", 0) or 0),
            has_audio=bool(container.streams.audio),
            video_start=video_start,
            color=_color_tags(first),
        )


def _first_frame(container, stream) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except (av.error.FFmpegError, ValueError) as e:
        raise MediaError(UNREADABLE, f"decoding the first frame: {e}") from None
    raise MediaError(NO_FRAMES, "no decodable video frame")


def _video_span(container, stream, first: av.VideoFrame) -> tuple[float, float]:
    """(start, duration) of the decodable video: seconds from the container's start (ffmpeg's `-ss` counts from
    there) to the first decodable frame, and from that frame to the stream's end.

    The start is rounded down to the microsecond, so a chunk starting there never drops that frame.
    """
    origin = container.start_time / av.time_base if container.start_time is not None else 0.0
    tb = stream.time_base
    stream_start = float(stream.start_time * tb) if stream.start_time is not None and tb is not None else origin
    first_time = float(first.pts * tb) if first.pts is not None and tb is not None else stream_start
    if stream.duration is not None and tb is not None:
        end = stream_start + float(stream.duration * tb)
    elif container.duration is not None:
        end = origin + container.duration / av.time_base
    else:
        raise MediaError(UNREADABLE, "unknown duration")
    start = math.floor(max(0.0, first_time - origin) * 1e6) / 1e6
    return start, round(end - origin - start, 6)


_SPACES = {0: "gbr", 1: "bt709", 2: "unknown", 4: "fcc", 5: "bt470bg", 6: "smpte170m", 7: "smpte240m", 8: "ycgco"}
_SPACES.update({9: "bt2020nc", 10: "bt2020c", 11: "smpte2085", 14: "ictcp"})


def _color_tags(frame: av.VideoFrame) -> dict:
    """A decoded frame's colour description in ffmpeg's words (`yuv420p(tv, bt709/bt709/bt709)` in its logs)."""
    return {
        "pix_fmt": frame.format.name,
        "space": _SPACES.get(frame.colorspace, str(frame.colorspace)),
        "range": {1: "tv", 2: "pc"}.get(frame.color_range, "unknown"),
        "primaries": _enum_name(ColorPrimaries, frame.color_primaries),
        "trc": _enum_name(ColorTrc, frame.color_trc),
    }


def _enum_name(enum, value: int) -> str:
    if value == 2:  # AVCOL_PRI_UNSPECIFIED and AVCOL_TRC_UNSPECIFIED
        return "unknown"
    try:
        return enum(value).name.lower().replace("_", "-")
    except ValueError:
        return str(value)


def ffmpeg_argv(
    path: str,
    start: float,
    duration: float,
    video_out: str,
    audio_out: str | None,
    *,
    fps: float,
    short_side: int,
    sample_rate: int,
    audio_format: str,
) -> list[str]:
    """The single ffmpeg call that turns `[start, start+duration)` of `path` into the canonical video (+audio).

    One decode feeds both outputs. Video filters, in order:
    - `fps` with `start_time=0`: constant frame rate, and a picture from the chunk's first instant on. Where the
      source's first frame comes after the cut (a chunk start between two frames, a stream whose first
      frames do not decode), the first frame is repeated back to 0 instead of the mp4 storing a late start;
      a chunk that starts on a frame comes out as without it.
    - `scale` to the display size (`dar` = iw / ih * sar, so anamorphic pixels are widened), short side
      `short_side`, both sides even; auto-rotation (ffmpeg's default) runs before it, so sizes are upright.
      The same swscale pass converts the source's matrix and range (read from each frame's tags; untagged =
      BT.601 limited, as every decoder assumes) to BT.601 limited range (`CANONICAL_COLOR`).
    - `setsar=1`, `format=yuv420p`, and `setparams` to tag the result as BT.601 (smpte170m) limited range.
      Primaries and transfer are not converted (an HLG source keeps its curve, as every RGB decoder shows it)
      and keep their tags.
    """
    gop = str(max(1, round(fps)))
    portrait = "lte(dar,1)"
    width = f"if({portrait},{short_side},2*round({short_side}*dar/2))"
    height = f"if({portrait},2*round({short_side}/dar/2),{short_side})"
    scale = f"scale=w='{width}':h='{height}':out_color_matrix=bt601:out_range=tv"
    video_filter = f"fps={fps}:start_time=0,{scale},setsar=1,format=yuv420p,setparams=colorspace=smpte170m:range=tv"
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    argv += ["-threads", "1", "-filter_threads", "1", "-ss", f"{start:.6f}", "-t", f"{duration:.6f}", "-i", path]
    argv += ["-map", "0:v:0", "-an", "-sn", "-dn", "-vf", video_filter]
    argv += ["-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-bf", "0", "-g", gop, "-keyint_min", gop]
    argv += ["-sc_threshold", "0", "-threads", "1", "-map_metadata", "-1", "-map_chapters", "-1"]
    argv += ["-fflags", "+bitexact", "-flags:v", "+bitexact", "-movflags", "+faststart", video_out]
    if audio_out is not None:
        codec = "flac" if audio_format == "flac" else "pcm_s16le"
        # Alignment: aresample's async + first_pts=0 pads silence where the audio starts after the chunk does
        # (and fills timestamp gaps); apad + -t make it span the chunk where the audio track ends early.
        audio_filter = "aresample=async=1:first_pts=0,apad"
        argv += ["-map", "0:a:0", "-vn", "-sn", "-dn", "-af", audio_filter, "-t", f"{duration:.6f}"]
        argv += ["-ac", "1", "-ar", str(sample_rate), "-c:a", codec]
        argv += ["-map_metadata", "-1", "-map_chapters", "-1", "-fflags", "+bitexact", "-flags:a", "+bitexact"]
        argv += [audio_out]
    return argv


def transcode_chunk(
    path: str,
    start: float,
    duration: float,
    *,
    has_audio: bool,
    fps: float,
    short_side: int,
    sample_rate: int,
    audio_format: str,
    timeout: float,
) -> ChunkMedia:
    """Canonicalise one chunk of `path` (see DESIGN.md "Dataset on disk") and measure the result.

    Raises `MediaError` for a chunk that cannot become a sample, `StorageError` where the temporary folder
    cannot take the output (full, over quota, read-only), which no other chunk would survive either.
    """
    try:
        video, audio = _run_ffmpeg(
            path,
            start,
            duration,
            has_audio,
            timeout,
            fps=fps,
            short_side=short_side,
            sample_rate=sample_rate,
            audio_format=audio_format,
        )
    except OSError as e:
        if e.errno in STORAGE_ERRNOS and not isinstance(e, StorageError):
            raise _storage_error(e.errno) from e
        raise
    num_frames, width, height = _measure_video(video)
    if num_frames < 1:
        raise MediaError(NO_FRAMES, f"no output frame at {fps:g} fps in [{start:.3f}, {start + duration:.3f}) s")
    audio_seconds = 0.0
    if audio is not None:
        info = soundfile.info(io.BytesIO(audio))
        audio_seconds = info.frames / info.samplerate
        if info.frames == 0:
            audio = None  # the audio track ended before this chunk: treat the chunk as silent-less
    return ChunkMedia(video, audio, fps, num_frames, width, height, audio_seconds)


def _run_ffmpeg(path: str, start: float, duration: float, has_audio: bool, timeout: float, **canon):
    """(video bytes, audio bytes or None) of one ffmpeg run in a fresh temporary folder."""
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        video_out = os.path.join(tmp, "video.mp4")
        audio_out = os.path.join(tmp, f"audio.{canon['audio_format']}") if has_audio else None
        argv = ffmpeg_argv(path, start, duration, video_out, audio_out, **canon)
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise MediaError(TRANSCODE_TIMEOUT, f"ffmpeg ran past {timeout:g} s") from None
        if done.returncode != 0:
            stderr = done.stderr.decode("utf-8", "replace").strip()
            for code in STORAGE_ERRNOS:  # ffmpeg exits with -errno, and says so
                if done.returncode == 256 - code or os.strerror(code) in stderr:
                    raise _storage_error(code)
            raise MediaError(TRANSCODE_FAILED, f"ffmpeg exit {done.returncode}: {stderr[-400:]}")
        with open(video_out, "rb") as f:
            video = f.read()
        audio = None
        if audio_out is not None and os.path.exists(audio_out) and os.path.getsize(audio_out) > 0:
            with open(audio_out, "rb") as f:
                audio = f.read()
    return video, audio


def _storage_error(code: int) -> StorageError:
    why = "cannot write transcoded chunks to the temporary folder (free space there or point TMPDIR at"
    return StorageError(code, f"{os.strerror(code)}: {why} another folder, then re-run)", tempfile.gettempdir())


def trim_audio(data: bytes, seconds: float, audio_format: str) -> bytes:
    """Cut encoded mono audio (flac or wav, 16-bit) to its first `seconds`, re-encoded in the same format."""
    samples, rate = soundfile.read(io.BytesIO(data), dtype="int16")
    out = io.BytesIO()
    soundfile.write(out, samples[: round(seconds * rate)], rate, format=audio_format.upper(), subtype="PCM_16")
    return out.getvalue()


def _measure_video(data: bytes) -> tuple[int, int, int]:
    """(frame count, width, height) of our own encoded mp4, by demuxing packets (cheap, exact)."""
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                return 0, 0, 0  # ffmpeg wrote no frame at all (the chunk is shorter than one output frame)
            stream = container.streams.video[0]
            count = sum(1 for packet in container.demux(stream) if packet.size > 0)
            return count, stream.codec_context.width, stream.codec_context.height
    except av.error.FFmpegError as e:
        raise MediaError(TRANSCODE_FAILED, f"unreadable output: {e}") from None


def sweep_stale_temp() -> int:
    """Remove chunk temp dirs left by killed workers (their pid is gone); returns how many were removed."""
    removed = 0
    for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{TEMP_PREFIX}*-*")):
        pid = os.path.basename(path)[len(TEMP_PREFIX) :].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
