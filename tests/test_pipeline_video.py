"""Video decoding (decord and PyAV behind one interface), frame picking by timestamp, and pure augmentations."""

from __future__ import annotations

import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import video as V


@pytest.fixture(scope="module")
def mp4(tiny_dataset) -> bytes:
    shard = sorted((Path(tiny_dataset) / "shards").glob("*.tar"))[0]
    with tarfile.open(shard) as tf:
        return tf.extractfile(next(m for m in tf if m.name.endswith(".mp4"))).read()


def test_frame_indices_pick_the_frame_shown_at_each_timestamp():
    assert V.frame_indices(0.0, 4, 5.0, 10.0, 40) == [0, 2, 4, 6]  # every other frame at half the rate
    assert V.frame_indices(1.05, 3, 10.0, 10.0, 40) == [10, 11, 12]  # 1.05 s is still frame 10
    assert V.frame_indices(3.8, 4, 10.0, 10.0, 40) == [38, 39, 39, 39]  # clamped at the end


@pytest.mark.parametrize("backend", V.BACKENDS)
def test_decoders_return_uint8_clips_at_the_requested_times(mp4, backend):
    video = V.open_video(mp4, backend)
    assert video.fps == pytest.approx(10.0) and video.num_frames == 40
    clip = V.decode_clip(video, 1.0, 4, 5.0)
    assert clip.dtype == torch.uint8 and clip.shape[:2] == (3, 4) and min(clip.shape[2:]) == 64
    assert video.decoded_frames >= 4
    again = V.decode_clip(video, 1.6, 1, 5.0)  # = clip frame 3 (1.0 + 3 / 5 s)
    assert torch.equal(again[:, 0], clip[:, 3])


def test_decord_and_pyav_agree_on_the_same_frames(mp4):
    a = V.decode_clip(V.open_video(mp4, "decord"), 0.7, 6, 10.0).float()
    b = V.decode_clip(V.open_video(mp4, "pyav"), 0.7, 6, 10.0).float()
    assert a.shape == b.shape
    assert (a - b).abs().mean() < 3.0  # same H.264 frames; colour conversion may differ by a level or two
    shifted = V.decode_clip(V.open_video(mp4, "pyav"), 1.5, 6, 10.0).float()
    assert (a - b).abs().mean() < (a - shifted).abs().mean()


def test_bad_bytes_and_unknown_backend_raise(mp4):
    for backend in V.BACKENDS:
        with pytest.raises(Exception):  # noqa: B017 - each library raises its own error type
            V.decode_clip(V.open_video(b"not a video at all" * 10, backend), 0.0, 2, 10.0)
    with pytest.raises(ValueError, match="unknown video decoder 'opencv'"):
        V.open_video(mp4, "opencv")


def test_center_crop_and_random_resized_crop_shapes_and_determinism():
    clip = torch.randint(0, 256, (3, 4, 48, 80), dtype=torch.uint8)
    out = V.center_crop(clip, 32)
    assert out.shape == (3, 4, 32, 32) and out.dtype == torch.uint8
    a = V.random_resized_crop(clip, 24, np.random.default_rng(3))
    b = V.random_resized_crop(clip, 24, np.random.default_rng(3))
    c = V.random_resized_crop(clip, 24, np.random.default_rng(4))
    assert a.shape == (3, 4, 24, 24) and torch.equal(a, b) and not torch.equal(a, c)
    same = V.center_crop(clip[..., 16:64], 48)  # already 48 x 48: a pure crop, no resampling
    assert torch.equal(same, clip[..., 16:64])


def test_color_jitter_works_on_the_channel_axis():
    grey = torch.full((3, 4, 8, 8), 100, dtype=torch.uint8)
    grey[:, 2] = 200  # frames differ in time; channels are equal everywhere
    out = V.color_jitter(grey, 0.4, np.random.default_rng(0))
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])  # grey stays grey
    assert not torch.equal(out, grey)
    assert torch.equal(V.color_jitter(grey, 0.0, np.random.default_rng(0)), grey)


def test_hflip_mirrors_width():
    clip = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(1, 1, 2, 12)[..., :12].expand(3, 2, 2, 12)
    assert torch.equal(V.hflip(clip)[..., 0], clip[..., -1])
