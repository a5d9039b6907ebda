"""A source whose first frames cannot be decoded (an MPEG-TS cut mid-GOP): the chunk starts at the first decodable
frame, so picture and sound stay aligned and both decoders agree on which frames exist."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import av
import imageio_ffmpeg
import numpy as np
import pytest
import soundfile
import torch

from data_prep import media
from data_prep.build import build_dataset
from pipeline import video as V

FPS = 25
FLASH = "between(t,3,3.2)"  # source seconds 3.0-3.2: a white picture and a 440 Hz tone, nothing else sounds


@pytest.fixture(scope="module")
def cut_ts(tmp_path_factory):
    """6 s of H.264 (GOP 2 s, B-frames) + AAC in MPEG-TS with its first 15 % of bytes dropped at a packet boundary:
    the first ~1.1 s of video left in the file reference a keyframe that is gone."""
    d = tmp_path_factory.mktemp("cut")
    video = f"testsrc2=size=320x240:rate={FPS}:duration=6"
    audio = f"aevalsrc='0.5*sin(2*PI*440*t)*{FLASH}':s=44100:d=6"
    flash = f"drawbox=x=0:y=0:w=iw:h=ih:color=white:t=fill:enable='{FLASH}'"
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y"]
    argv += ["-f", "lavfi", "-i", video, "-f", "lavfi", "-i", audio, "-vf", flash]
    argv += ["-c:v", "libx264", "-g", "50", "-bf", "2", "-c:a", "aac", "-f", "mpegts", str(d / "full.ts")]
    subprocess.run(argv, check=True, timeout=60, capture_output=True)
    data = (d / "full.ts").read_bytes()
    (d / "src").mkdir()
    (d / "src" / "cut.ts").write_bytes(data[len(data) * 15 // 100 // 188 * 188 :])
    return d / "src" / "cut.ts"


def _source_frame_at(path, seconds: float, height: int, width: int) -> torch.Tensor:
    """The source's picture shown `seconds` after the container's start (ffmpeg's `-ss` clock), RGB at the size."""
    with av.open(str(path)) as c:
        origin = c.start_time / av.time_base
        for frame in c.decode(video=0):
            if abs(frame.time - origin - seconds) < 0.5 / FPS:
                return torch.from_numpy(
                    frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")
                )
    raise AssertionError(f"no source frame shown at {seconds:.3f} s")


def test_a_stream_cut_mid_gop_starts_at_its_first_decodable_frame(cut_ts, tmp_path):
    av.logging.set_level(av.logging.PANIC)  # the cut stream's leading packets make the decoder complain
    with av.open(str(cut_ts)) as c:
        stream = c.streams.video[0]
        stream_start = float(stream.start_time * stream.time_base) - c.start_time / av.time_base
    info = media.probe_media(str(cut_ts))
    assert info.video_start > stream_start + 0.5  # ~1.1 s of undecodable frames after the stream's start
    build_dataset(cut_ts.parent, tmp_path / "ds", fps=FPS, short_side=64, workers=1)
    with tarfile.open(next((tmp_path / "ds" / "shards").glob("*.tar"))) as tf:
        files = {m.name.split(".", 1)[1]: tf.extractfile(m).read() for m in tf}
    meta = json.loads(files["json"])
    assert meta["start"] == pytest.approx(info.video_start, abs=1e-6)
    with av.open(io.BytesIO(files["mp4"])) as c:
        assert c.streams.video[0].start_time == 0  # the stored picture starts with the chunk
    want = _source_frame_at(cut_ts, meta["start"], meta["height"], meta["width"]).float()
    later = _source_frame_at(cut_ts, meta["start"] + 1 / FPS, meta["height"], meta["width"]).float()
    flashes = []
    for backend, pixels in [("decord", "rgb"), ("pyav", "rgb"), ("pyav", "yuv420")]:
        video = V.open_video(files["mp4"], backend, pixels=pixels)
        assert video.num_frames == meta["num_frames"]
        clip = video.get_frames(list(range(video.num_frames))).dense().float()  # (3, T, H, W)
        first = clip[:, 0].permute(1, 2, 0)  # frame 0 is the source's picture at the chunk's start, not a later one
        error, off_by_one = (first - want).abs().mean(), (first - later).abs().mean()
        assert error < 7.0 and error < off_by_one, (backend, pixels, error, off_by_one)  # codec + resampling: ~6
        flashes.append(int(np.argmax(clip.mean(dim=(0, 2, 3)).numpy() > 200)))
    audio, rate = soundfile.read(io.BytesIO(files["flac"]))
    assert len(audio) / rate == pytest.approx(meta["duration"], abs=1.5 / FPS)
    tone = np.argmax(np.abs(audio) > 0.1) / rate
    assert flashes[0] > 0 and len(set(flashes)) == 1  # every decoder shows the flash at the same frame
    assert abs(flashes[0] / FPS - tone) < 1.5 / FPS  # ... when the tone sounds (before: 1.1 s apart)
