"""One colour pipeline: sources tagged BT.709, full range or BT.2020 HLG are stored as BT.601 limited range, so
the training view (PyAV YUV planes + the device step's BT.601 formula) and the eval view (decord RGB) both show
what ffmpeg shows for the source. The untagged BT.601 source, built and measured alongside, sets the tolerance."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile

import av
import imageio_ffmpeg
import numpy as np
import pytest
import torch

from data_prep import media
from data_prep.build import build_dataset
from pipeline import video as V

# Colour bars: saturated flat colours, where a wrong matrix or range shows, and few edges for the codec to blur.
PATTERN = "smptebars=size=128x72:rate=8:duration=1"
SOURCES = {
    "untagged": "format=yuv420p,setparams=colorspace=unknown:range=unknown",  # smptebars itself says bt470bg
    "bt709": "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p,"
    "setparams=colorspace=bt709:color_primaries=bt709:color_trc=bt709:range=tv",
    "full": "scale=out_color_matrix=bt601:out_range=pc,format=yuv420p,setparams=range=pc",
    "hlg": "scale=out_color_matrix=bt2020:out_range=tv,format=yuv420p10le,"
    "setparams=colorspace=bt2020nc:color_primaries=bt2020:color_trc=arib-std-b67:range=tv",
}
SIDE = 72  # the stored short side = the sources' height: the views compare colour, not resampling
SLACK = 1.5  # grey levels a tagged source may lose over the untagged one (one more YUV -> YUV rounding)


def _ffmpeg(*args: str) -> bytes:
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    return subprocess.run(argv, check=True, timeout=60, capture_output=True).stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    src = tmp_path_factory.mktemp("colour-src")
    for name, vf in SOURCES.items():
        _ffmpeg("-f", "lavfi", "-i", PATTERN, "-vf", vf, "-c:v", "libx264", "-crf", "12", str(src / f"{name}.mp4"))
    out = tmp_path_factory.mktemp("colour-ds")
    build_dataset(src, out, fps=8, short_side=SIDE, workers=1)
    samples = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                samples[meta["id"]] = (meta, members[name[: -len("json")] + "mp4"])
    return src, out, samples


def _reference(path: str, height: int, width: int, frames: int) -> torch.Tensor:
    """ffmpeg's own RGB of the source at the stored size, centre square: uint8 `(3, T, S, S)`."""
    vf = f"scale={width}:{height},format=rgb24"
    raw = _ffmpeg("-i", path, "-vf", vf, "-frames:v", str(frames), "-f", "rawvideo", "-")
    rgb = torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(frames, height, width, 3).copy())
    top, left = V.center_box(height, width, SIDE)
    return rgb[:, top : top + SIDE, left : left + SIDE].permute(3, 0, 1, 2)


def _views(meta: dict, mp4: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    """(training view, eval view) of every frame, uint8 RGB `(3, T, S, S)`, as the loader makes them."""
    frames = list(range(meta["num_frames"]))
    train = V.center_clip(V.open_video(mp4, "pyav", pixels="yuv420").get_frames(frames), SIDE)
    size = V.short_side_size(meta["height"], meta["width"], SIDE)
    rgb = V.open_video(mp4, "decord", size=size).get_frames(frames).frames
    top, left = V.center_box(*size, SIDE)
    return train, rgb[:, top : top + SIDE, left : left + SIDE].permute(3, 0, 1, 2)


def test_every_source_colour_reaches_both_views_as_ffmpeg_shows_the_source(built):
    src, _, samples = built
    errors = {}
    for name, (meta, mp4) in samples.items():
        want = _reference(str(src / f"{name}.mp4"), meta["height"], meta["width"], meta["num_frames"]).float()
        train, evaluation = _views(meta, mp4)
        errors[name] = ((train.float() - want).abs().mean().item(), (evaluation.float() - want).abs().mean().item())
    assert sorted(errors) == sorted(SOURCES)
    base_train, base_eval = errors["untagged"]
    assert base_train < 2.0 and base_eval < 2.0, errors  # the reference case itself: codec loss only
    for name in ("bt709", "full", "hlg"):  # before canonical colour: training views 5-8.5 levels off
        train, evaluation = errors[name]
        assert train < base_train + SLACK and evaluation < base_eval + SLACK, (name, errors)


def test_clips_are_tagged_bt601_limited_and_the_source_tags_are_recorded(built):
    _, out, samples = built
    for _, mp4 in samples.values():
        with av.open(io.BytesIO(mp4)) as c:
            cc = c.streams.video[0].codec_context
            assert (cc.pix_fmt, cc.colorspace, cc.color_range) == ("yuv420p", 6, 1)  # smpte170m, tv
    assert json.loads((out / "dataset.json").read_text())["video"]["color"] == media.CANONICAL_COLOR == "bt601-tv"
    probes = json.loads((out / "plan.json").read_text())["probes"]  # in source order: sorted by id
    tags = {name: probe["color"] for name, probe in zip(sorted(SOURCES), probes)}
    assert tags["untagged"] == {"pix_fmt": "yuv420p", "space": "unknown", "range": "unknown", **UNKNOWN}
    assert tags["bt709"] == {
        "pix_fmt": "yuv420p",
        "space": "bt709",
        "range": "tv",
        "primaries": "bt709",
        "trc": "bt709",
    }
    assert tags["full"] == {"pix_fmt": "yuvj420p", "space": "bt470bg", "range": "pc", **UNKNOWN}
    assert tags["hlg"] == {
        "pix_fmt": "yuv420p10le",
        "space": "bt2020nc",
        "range": "tv",
        "primaries": "bt2020",
        "trc": "arib-std-b67",
    }


UNKNOWN = {"primaries": "unknown", "trc": "unknown"}
