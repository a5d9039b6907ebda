"""Probe a source video (PyAV) and canonicalise one chunk of it (ffmpeg): the media half of `vatp data build`.

Every call on an untrusted file either returns a result or raises `MediaError(reason, detail)`; ffmpeg runs
as an argv list with a timeout, in a temporary directory that is removed whatever happens.
"""

from __future__ import annotations

import glob
import io
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from fractions import Fraction

import av
import imageio_ffmpeg
import soundfile

# Failure reasons (also the keys of `failed` in stats and in the build summary).
EMPTY_FILE = "empty_file"
NOT_MEDIA = "not_media"
NO_VIDEO = "no_video_stream"
NO_FRAMES = "no_frames"
UNREADABLE = "unreadable"
TRANSCODE_FAILED = "transcode_failed"
TRANSCODE_TIMEOUT = "transcode_timeout"


TEMP_PREFIX = "vatp-chunk-"  # + the worker's pid, so a later run can tell leftovers of killed workers


class MediaError(Exception):
    """A source (or one chunk of it) that cannot become a sample; `reason` is one of the constants above."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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
    video_start: float = 0.0  # seconds from the container's start to the video stream's (audio may come first)


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
        duration = _duration(container, stream)
        video_start = _video_start(container, stream)
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
        )


def _first_frame(container, stream) -> av.VideoFrame:
    try:
        for frame in container.decode(stream):
            return frame
    except (av.error.FFmpegError, ValueError) as e:
        raise MediaError(UNREADABLE, f"decoding the first frame: {e}") from None
    raise MediaError(NO_FRAMES, "no decodable video frame")


def _duration(container, stream) -> float:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    raise MediaError(UNREADABLE, "unknown duration")


def _video_start(container, stream) -> float:
    """How long after the container's start the video begins (ffmpeg's `-ss` counts from the container's start)."""
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    origin = container.start_time / av.time_base if container.start_time is not None else 0.0
    return round(max(0.0, float(stream.start_time * stream.time_base) - origin), 6)


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

    One decode feeds both outputs. Auto-rotation (ffmpeg's default) runs before the scale filter, so
    `iw`/`ih` are the upright sizes; `-2` keeps the aspect ratio with an even size for yuv420p.
    """
    gop = str(max(1, round(fps)))
    scale = f"scale=w='if(lte(iw,ih),{short_side},-2)':h='if(lte(iw,ih),-2,{short_side})'"
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y"]
    argv += ["-threads", "1", "-filter_threads", "1", "-ss", f"{start:.6f}", "-t", f"{duration:.6f}", "-i", path]
    argv += ["-map", "0:v:0", "-an", "-sn", "-dn", "-vf", f"fps={fps},{scale},setsar=1,format=yuv420p"]
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
    """Canonicalise one chunk of `path` (see DESIGN.md "Dataset on disk") and measure the result."""
    with tempfile.TemporaryDirectory(prefix=f"{TEMP_PREFIX}{os.getpid()}-") as tmp:
        video_out = os.path.join(tmp, "video.mp4")
        audio_out = os.path.join(tmp, f"audio.{audio_format}") if has_audio else None
        argv = ffmpeg_argv(
            path,
            start,
            duration,
            video_out,
            audio_out,
            fps=fps,
            short_side=short_side,
            sample_rate=sample_rate,
            audio_format=audio_format,
        )
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise MediaError(TRANSCODE_TIMEOUT, f"ffmpeg ran past {timeout:g} s") from None
        if done.returncode != 0:
            stderr = done.stderr.decode("utf-8", "replace").strip()
            raise MediaError(TRANSCODE_FAILED, f"ffmpeg exit {done.returncode}: {stderr[-400:]}")
        with open(video_out, "rb") as f:
            video = f.read()
        audio = None
        if audio_out is not None and os.path.exists(audio_out) and os.path.getsize(audio_out) > 0:
            with open(audio_out, "rb") as f:
                audio = f.read()
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
