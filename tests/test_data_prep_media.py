"""Probe and canonicalise real tiny media files (made with the bundled ffmpeg)."""

from __future__ import annotations

import contextlib
import errno
import glob
import io
import os
import subprocess
import tempfile

import av
import imageio_ffmpeg
import pytest
import soundfile

from data_prep import media

CANON = dict(fps=8.0, short_side=32, sample_rate=16000, audio_format="flac", timeout=30.0)


def _ffmpeg(*args: str) -> None:
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    subprocess.run(argv, check=True, timeout=60, capture_output=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    src = "testsrc=size=48x32:rate=10:duration=2"
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        src,
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=300:sample_rate=22050:duration=2",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-c:a",
        "aac",
        "-ac",
        "2",
        str(d / "av.mp4"),
    )
    _ffmpeg("-display_rotation", "90", "-i", str(d / "av.mp4"), "-c", "copy", str(d / "rotated.mp4"))
    _ffmpeg("-f", "lavfi", "-i", src, "-c:v", "mpeg4", "-bf", "2", str(d / "mpeg4.avi"))
    _ffmpeg("-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac", str(d / "audio_only.mp4"))
    return d


def test_probe_reports_streams_duration_and_codec(clips):
    info = media.probe_media(str(clips / "av.mp4"))
    assert (info.codec, info.width, info.height, info.fps, info.rotation) == ("h264", 48, 32, 10.0, 0)
    assert info.has_audio and info.frames == 20
    assert info.duration == pytest.approx(2.0, abs=0.05)


def test_probe_sees_rotation_metadata(clips):
    assert media.probe_media(str(clips / "rotated.mp4")).rotation in (90, -90, 270)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", media.EMPTY_FILE), (b"just some text\n", media.NOT_MEDIA), (b"\x00" * 4096, media.NOT_MEDIA)],
)
def test_probe_rejects_non_media_early(tmp_path, content, reason):
    path = tmp_path / "fake.mp4"
    path.write_bytes(content)
    with pytest.raises(media.MediaError) as e:
        media.probe_media(str(path))
    assert e.value.reason == reason


def test_probe_rejects_audio_only(clips):
    with pytest.raises(media.MediaError) as e:
        media.probe_media(str(clips / "audio_only.mp4"))
    assert e.value.reason == media.NO_VIDEO and "audio" in e.value.detail


def test_probe_missing_file_is_unreadable(tmp_path):
    with pytest.raises(media.MediaError) as e:
        media.probe_media(str(tmp_path / "nope.mp4"))
    assert e.value.reason == media.UNREADABLE


def test_transcode_chunk_is_canonical(clips):
    got = media.transcode_chunk(str(clips / "av.mp4"), 0.5, 1.0, has_audio=True, **CANON)
    assert (got.width, got.height) == (48, 32) and got.num_frames == 8 and got.fps == 8.0
    with av.open(io.BytesIO(got.video)) as c:
        assert not c.streams.audio  # video member is video only
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        frames = list(c.decode(stream))
    assert len(frames) == 8
    assert sum(f.key_frame for f in frames) == 1  # one keyframe per second of output (GOP = fps)
    assert all(f.pict_type != av.video.frame.PictureType.B for f in frames)
    pts = [float(f.time) for f in frames]
    assert pts == pytest.approx([i / 8 for i in range(8)], abs=1e-3)  # constant frame rate
    audio, rate = soundfile.read(io.BytesIO(got.audio))
    assert rate == 16000 and audio.ndim == 1  # mono at the dataset rate
    assert len(audio) / rate == pytest.approx(1.0, abs=0.05) and got.audio_seconds == pytest.approx(len(audio) / rate)


def test_transcode_is_byte_deterministic(clips):
    a = media.transcode_chunk(str(clips / "av.mp4"), 0.0, 2.0, has_audio=True, **CANON)
    b = media.transcode_chunk(str(clips / "av.mp4"), 0.0, 2.0, has_audio=True, **CANON)
    assert a.video == b.video and a.audio == b.audio


def test_transcode_applies_rotation_so_frames_are_upright(clips):
    got = media.transcode_chunk(str(clips / "rotated.mp4"), 0.0, 1.0, has_audio=True, **CANON)
    assert (got.width, got.height) == (32, 48)  # 48x32 stored, displayed rotated: portrait, short side 32


def test_transcode_converts_other_codecs(clips):
    info = media.probe_media(str(clips / "mpeg4.avi"))
    # AVI with B-frames stamps its first frame 0.1 s: the plan's chunk starts there, 1.9 s long.
    assert (info.video_start, info.duration) == pytest.approx((0.1, 1.9))
    got = media.transcode_chunk(str(clips / "mpeg4.avi"), info.video_start, info.duration, has_audio=False, **CANON)
    with av.open(io.BytesIO(got.video)) as c:
        assert c.streams.video[0].codec_context.name == "h264" and c.streams.video[0].start_time == 0
    assert got.audio is None and got.num_frames == 15  # 1.9 s at 8 fps


def test_transcode_wav_output(clips):
    got = media.transcode_chunk(str(clips / "av.mp4"), 0.0, 1.0, has_audio=True, **{**CANON, "audio_format": "wav"})
    info = soundfile.info(io.BytesIO(got.audio))
    assert info.format == "WAV" and info.subtype == "PCM_16" and info.channels == 1


def test_transcode_timeout_is_a_failure_and_cleans_up(clips):
    before = set(glob.glob(f"{tempfile.gettempdir()}/vatp-chunk-*"))
    with pytest.raises(media.MediaError) as e:
        media.transcode_chunk(str(clips / "av.mp4"), 0.0, 2.0, has_audio=True, **{**CANON, "timeout": 0.001})
    assert e.value.reason == media.TRANSCODE_TIMEOUT
    assert set(glob.glob(f"{tempfile.gettempdir()}/vatp-chunk-*")) == before


def test_transcode_failure_keeps_ffmpeg_stderr(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video at all")
    with pytest.raises(media.MediaError) as e:
        media.transcode_chunk(str(bad), 0.0, 1.0, has_audio=False, **CANON)
    assert e.value.reason == media.TRANSCODE_FAILED and "ffmpeg exit" in e.value.detail and "bad.mp4" in e.value.detail


def test_ffmpeg_argv_is_a_list_with_the_canonical_settings():
    argv = media.ffmpeg_argv(
        "a b'c.mp4", 1.5, 2.0, "v.mp4", "a.flac", fps=16, short_side=160, sample_rate=16000, audio_format="flac"
    )
    assert "a b'c.mp4" in argv  # the path is one argument: no shell quoting involved
    joined = " ".join(argv)
    for flag in (
        "-bf 0",
        "-g 16",
        "-keyint_min 16",
        "-sc_threshold 0",
        "-preset veryfast",
        "-crf 23",
        "-an",
        "-vn",
        "-ac 1",
        "-ar 16000",
        "-c:a flac",
        "+faststart",
        "-map_metadata -1",
        "-ss 1.500000",
        "fps=16:start_time=0",
        "out_color_matrix=bt601:out_range=tv",
        "setparams=colorspace=smpte170m:range=tv",
    ):
        assert flag in joined, flag


@pytest.mark.parametrize("rotate", [False, True])
def test_transcode_stores_anamorphic_sources_at_their_display_aspect(tmp_path, rotate):
    """720 x 576 at SAR 64:45 is 1024 x 576 on screen (16:9): stored 56 x 32 with square pixels (not 40 x 32),
    and upright 32 x 56 when the file says to rotate it."""
    path = tmp_path / "pal.mp4"
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=720x576:rate=10:duration=0.5", "-vf", "setsar=64/45", str(path))
    if rotate:
        _ffmpeg("-display_rotation", "90", "-i", str(path), "-c", "copy", str(tmp_path / "rotated.mp4"))
        path = tmp_path / "rotated.mp4"
    got = media.transcode_chunk(str(path), 0.0, 0.5, has_audio=False, **CANON)
    assert (got.width, got.height) == ((32, 56) if rotate else (56, 32))
    with av.open(io.BytesIO(got.video)) as c:
        assert c.streams.video[0].sample_aspect_ratio in (None, 1)


@contextlib.contextmanager
def _tmpfs(path, *options: str):
    """A small tmpfs at `path` (root only; the test is skipped where it cannot be mounted)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip() or done.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.parametrize("problem", ["full", "read_only"])
def test_a_full_or_read_only_temp_folder_stops_the_build_with_one_error(clips, tmp_path, monkeypatch, problem):
    """Every chunk would fail alike: the build stops with one OSError naming the folder, and writes no shard
    (before: each chunk counted as transcode_failed and the build finished with empty shards)."""
    from data_prep.build import build_dataset

    options = ["size=1m"] + (["ro"] if problem == "read_only" else [])
    with _tmpfs(tmp_path / "tmp", *options) as tmp:
        if problem == "full":
            (tmp / "filler").write_bytes(b"\0" * (1024 * 1024 - 16 * 1024))  # 16 kB left: not one chunk's output
        monkeypatch.setenv("TMPDIR", str(tmp))
        monkeypatch.setattr(tempfile, "tempdir", str(tmp))
        src = tmp_path / "src"
        src.mkdir()
        (src / "a.mp4").symlink_to(clips / "av.mp4")
        with pytest.raises(OSError) as e:
            build_dataset(src, tmp_path / "ds", fps=8, short_side=32, workers=1)
    assert e.value.errno == (errno.ENOSPC if problem == "full" else errno.EROFS) and e.value.filename == str(tmp)
    assert isinstance(e.value, media.StorageError) and "\n" not in str(e.value)  # the CLI prints it as one line
    assert e.value.strerror.startswith(os.strerror(e.value.errno)) and "TMPDIR" in e.value.strerror
    assert not list((tmp_path / "ds" / "shards").glob("*.tar")) and not (tmp_path / "ds" / "dataset.json").exists()


def test_sweep_removes_only_temp_dirs_of_dead_processes():
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tempfile.mkdtemp(prefix=f"{media.TEMP_PREFIX}{dead.pid}-")
    live = tempfile.mkdtemp(prefix=f"{media.TEMP_PREFIX}{os.getpid()}-")
    try:
        assert media.sweep_stale_temp() >= 1
        assert not os.path.exists(stale) and os.path.isdir(live)
    finally:
        os.rmdir(live)
