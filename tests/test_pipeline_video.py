"""Video decoding (decord and PyAV behind one interface), frame picking by timestamp, and pure augmentations."""

from __future__ import annotations

import tarfile
from pathlib import Path

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
    assert video.fps == pytest.approx(10.0) and video.num_frames == 40 and video.device == torch.device("cpu")
    clip = V.decode_clip(video, 1.0, 4, 5.0)
    assert clip.frames.dtype == torch.uint8 and clip.frames.shape == (4, 64, 86, 3)  # (N, H, W, 3)
    assert clip.order.tolist() == [0, 1, 2, 3]
    dense = clip.dense()
    assert dense.shape == (3, 4, 64, 86) and dense.is_contiguous()
    assert video.decoded_frames >= 4
    again = V.decode_clip(video, 1.6, 1, 5.0)  # = clip frame 3 (1.0 + 3 / 5 s)
    assert torch.equal(again.dense()[:, 0], dense[:, 3])


def test_repeated_frames_are_decoded_once_and_reversal_reorders_without_copies(mp4):
    clip = V.decode_clip(V.open_video(mp4), 3.7, 4, 10.0)  # frames 37, 38, 39, 39 (clamped at the end)
    assert clip.frames.shape[0] == 3 and clip.order.tolist() == [0, 1, 2, 2]
    back = clip.reversed()
    assert back.frames is clip.frames and torch.equal(back.dense(), clip.dense().flip(1))


def test_decord_and_pyav_agree_on_the_same_frames(mp4):
    a = V.decode_clip(V.open_video(mp4, "decord"), 0.7, 6, 10.0).dense().float()
    b = V.decode_clip(V.open_video(mp4, "pyav"), 0.7, 6, 10.0).dense().float()
    assert a.shape == b.shape
    assert (a - b).abs().mean() < 3.0  # same H.264 frames; colour conversion may differ by a level or two
    shifted = V.decode_clip(V.open_video(mp4, "pyav"), 1.5, 6, 10.0).dense().float()
    assert (a - b).abs().mean() < (a - shifted).abs().mean()


@pytest.mark.parametrize("backend", V.BACKENDS)
def test_decoder_side_scaling_matches_a_resize_after_decoding(mp4, backend):
    full = V.decode_clip(V.open_video(mp4, backend), 0.5, 3, 10.0)
    scaled = V.decode_clip(V.open_video(mp4, backend, size=(32, 43)), 0.5, 3, 10.0)
    assert scaled.frames.shape == (3, 32, 43, 3)
    resized = V.resize_frames(full.frames, 32, 43).float()
    other = V.decode_clip(V.open_video(mp4, backend, size=(32, 43)), 2.5, 3, 10.0).frames.float()
    err = (scaled.frames.float() - resized).abs().mean()
    assert err < 4.0 and err < (other - resized).abs().mean() / 2  # interpolation differs, content does not


def test_bad_bytes_and_unknown_backend_raise(mp4):
    for backend in V.BACKENDS:
        with pytest.raises(Exception):  # noqa: B017 - each library raises its own error type
            V.decode_clip(V.open_video(b"not a video at all" * 10, backend), 0.0, 2, 10.0)
    with pytest.raises(ValueError, match="unknown video decoder 'opencv'"):
        V.open_video(mp4, "opencv")


def test_center_clip_crops_the_short_side_square_before_resizing():
    frames = torch.randint(0, 256, (2, 48, 80, 3), dtype=torch.uint8)
    clip = V.Clip(frames, torch.tensor([1, 0, 0]))
    out = V.center_clip(clip, 32)
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.uint8
    same = V.center_clip(clip, 48)  # already 48 x 48 after the crop: no resampling
    assert torch.equal(same, clip.dense()[..., 16:64])


def test_window_copy_places_the_box_top_left_and_zeroes_the_rest():
    frames = torch.randint(1, 256, (3, 20, 30, 3), dtype=torch.uint8)
    out = torch.full((4, 12, 16, 3), 7, dtype=torch.uint8)
    V.VideoWindow(V.Clip(frames, torch.tensor([2, 1, 1, 0])), 5, 8, 10, 14).write_into(out)
    for t, i in enumerate([2, 1, 1, 0]):
        assert torch.equal(out[t, :10, :14], frames[i, 5:15, 8:22])
    assert not out[:, 10:].any() and not out[:, :, 14:].any()


def test_pyav_yuv_planes_are_the_frames_decord_converts_to_rgb(mp4):
    rgb = V.decode_clip(V.open_video(mp4, "decord"), 0.7, 6, 10.0)
    video = V.open_video(mp4, "pyav", pixels="yuv420")
    yuv = V.decode_clip(video, 0.7, 6, 10.0)
    assert yuv.frames.shape == (6, 64, 86) and yuv.chroma.shape == (6, 2, 32, 43)  # 4:2:0, 86 / 2 columns
    assert yuv.frames.dtype == yuv.chroma.dtype == torch.uint8 and yuv.size == rgb.size == (64, 86)
    diff = yuv.dense().float() - rgb.dense().float()
    # The exact BT.601 conversion; libswscale's fixed point reads 1-1.6 levels darker, never more than 4.
    assert 0 < diff.mean() < 2.0 and diff.abs().max() <= 4
    other = V.decode_clip(V.open_video(mp4, "pyav", pixels="yuv420"), 2.5, 6, 10.0)
    assert (other.dense().float() - rgb.dense().float()).abs().mean() > 2 * diff.abs().mean()  # content differs
    back = yuv.reversed()
    assert back.chroma is yuv.chroma and torch.equal(back.dense(), yuv.dense().flip(1))
    assert video.decoded_frames >= 6


def test_yuv_needs_pyav_at_the_stored_size_and_pixel_formats_are_checked(mp4):
    with pytest.raises(ValueError, match="decord decodes to RGB only"):
        V.open_video(mp4, "decord", pixels="yuv420")
    with pytest.raises(ValueError, match="stored size only"):
        V.open_video(mp4, "pyav", size=(32, 43), pixels="yuv420")
    with pytest.raises(ValueError, match="unknown pixel format 'nv12'"):
        V.open_video(mp4, "pyav", pixels="nv12")


def test_yuv_window_copies_the_luma_box_and_the_chroma_covering_it():
    luma = torch.randint(1, 256, (3, 20, 30), dtype=torch.uint8)
    chroma = torch.randint(1, 256, (3, 2, 10, 15), dtype=torch.uint8)
    window = V.VideoWindow(V.Clip(luma, torch.tensor([2, 1, 0]), chroma), 5, 8, 10, 13)
    assert window.chroma_box() == (2, 4, 6, 7)  # luma rows 5-14 -> chroma rows 2-7, columns 8-20 -> 4-10
    out, out_uv = torch.full((3, 12, 16), 7, dtype=torch.uint8), torch.full((3, 2, 7, 9), 7, dtype=torch.uint8)
    window.write_into(out, out_uv)
    for t, i in enumerate([2, 1, 0]):
        assert torch.equal(out[t, :10, :13], luma[i, 5:15, 8:21])
        assert torch.equal(out_uv[t, :, :6, :7], chroma[i, :, 2:8, 4:11])
    assert not out[:, 10:].any() and not out[:, :, 13:].any()
    assert not out_uv[..., 6:, :].any() and not out_uv[..., 7:].any()


def test_chroma_upsampling_keeps_each_sample_over_its_two_by_two_pixels_at_odd_offsets():
    luma = torch.zeros(1, 4, 6, dtype=torch.uint8)
    chroma = torch.arange(2 * 3 * 4, dtype=torch.uint8).view(1, 2, 3, 4)  # covers luma rows 0-5, columns 0-7
    full = V.upsample_chroma(torch.zeros(1, 6, 8, dtype=torch.uint8), chroma, 0, 0)  # (T, 3, H, W)
    assert torch.equal(full[0, 1], chroma[0, 0].repeat_interleave(2, 0).repeat_interleave(2, 1))
    box = V.upsample_chroma(luma, chroma, 1, 1)  # a 4 x 6 box starting at luma row 1, column 1
    assert box.shape == (1, 3, 4, 6) and torch.equal(box[0, 1:], full[0, 1:, 1:5, 1:7])


def test_yuv_conversion_maps_the_limited_range_to_full_rgb():
    yuv = torch.tensor([[16.0, 235.0, 81.0], [128.0, 128.0, 90.0], [128.0, 128.0, 240.0]])  # black, white, red
    rgb = V.yuv420_to_rgb(yuv, dim=0)
    assert torch.allclose(rgb[:, 0], torch.zeros(3), atol=1e-4) and torch.allclose(rgb[:, 1], torch.full((3,), 255.0))
    assert rgb[0, 2] > 250 and rgb[1, 2] < 5 and rgb[2, 2] < 5  # BT.601 red


def test_a_video_stored_in_another_pixel_format_reaches_the_yuv_path_as_420(tmp_path):
    """A 4:4:4 H.264 file (not what `vatp data build` writes, but what a shard may hold): PyAV's frames are
    converted to yuv420p before their planes are taken, and the clip matches decord's RGB within the loss of
    chroma resolution."""
    import io

    import av
    import numpy as np

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv444p"
        yy, xx = np.mgrid[0:48, 0:64]
        for t in range(8):
            rgb = np.stack([xx * 4, yy * 5, np.full_like(xx, 30 * t)], -1).clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    data = buf.getvalue()
    source = V.open_video(data, "pyav", pixels="yuv420")
    clip = source.get_frames([2, 3, 4])
    assert clip.frames.shape == (3, 48, 64) and clip.chroma.shape == (3, 2, 24, 32)
    want = V.open_video(data, "decord").get_frames([2, 3, 4]).dense().float()
    assert (clip.dense().float() - want).abs().mean() < 3.0


def test_center_clip_of_a_yuv_clip_matches_the_centre_of_its_rgb_frames(mp4):
    yuv = V.decode_clip(V.open_video(mp4, "pyav", pixels="yuv420"), 0.5, 4, 10.0)
    rgb = V.Clip(yuv.dense().permute(1, 2, 3, 0).contiguous(), torch.arange(4))  # the same frames, converted
    got, want = V.center_clip(yuv, 32).float(), V.center_clip(rgb, 32).float()
    assert got.shape == want.shape == (3, 4, 32, 32) and got.dtype == torch.float32
    assert (got - want).abs().mean() < 0.6 and (got - want).abs().max() <= 4  # resized before vs after converting


def _ffmpeg(*args: str) -> bytes:
    import subprocess

    import imageio_ffmpeg

    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    return subprocess.run(argv, check=True, timeout=60, capture_output=True).stdout


def test_legacy_clips_tagged_with_another_matrix_or_range_reach_the_yuv_path_as_bt601_limited(tmp_path):
    """Clips as builds before canonical colour stored them (the source's matrix and range kept, tagged): the YUV
    decoder converts them to BT.601 limited range, so `yuv420_to_rgb` gives what ffmpeg shows for the clip."""
    import numpy as np

    tags = {
        "untagged": "format=yuv420p,setparams=colorspace=unknown:range=unknown",
        "bt709": "scale=out_color_matrix=bt709:out_range=tv,format=yuv420p,setparams=colorspace=bt709:range=tv",
        "full": "scale=out_color_matrix=bt601:out_range=pc,format=yuv420p,setparams=range=pc",
    }
    errors = {}
    for name, vf in tags.items():
        path = str(tmp_path / f"{name}.mp4")
        _ffmpeg("-f", "lavfi", "-i", "smptebars=size=96x64:rate=8:duration=0.5", "-vf", vf, "-c:v", "libx264", path)
        raw = _ffmpeg("-i", path, "-vf", "format=rgb24", "-f", "rawvideo", "-")
        want = torch.from_numpy(np.frombuffer(raw, np.uint8).reshape(-1, 64, 96, 3).copy()).float()
        with open(path, "rb") as f:
            clip = V.open_video(f.read(), "pyav", pixels="yuv420").get_frames([0, 1, 2, 3])
        assert clip.frames.shape == (4, 64, 96) and clip.chroma.shape == (4, 2, 32, 48)
        errors[name] = (clip.dense().permute(1, 2, 3, 0).float() - want[:4]).abs().mean().item()
    assert errors["untagged"] < 1.5, errors
    # Without the conversion: BT.709 read as BT.601 is ~8.5 levels off, full range ~5 (contrast x1.04).
    assert errors["bt709"] < errors["untagged"] + 0.5 and errors["full"] < errors["untagged"] + 0.5, errors


def test_canonical_frames_reach_the_yuv_path_untouched():
    frame = __import__("av").VideoFrame(16, 8, "yuv420p")
    assert V.bt601_yuv420(frame) is frame  # untagged: BT.601 limited for every decoder, no conversion pass


def test_a_stream_that_starts_late_is_indexed_from_its_first_frame_by_both_decoders(mp4, tmp_path):
    """A clip whose video stream starts after 0 (older builds, from sources whose first frames did not decode):
    PyAV counts frames from the stream's first one, as decord does, instead of missing frames 0, 1, ..."""
    (tmp_path / "clip.mp4").write_bytes(mp4)
    _ffmpeg("-itsoffset", "1.12", "-i", str(tmp_path / "clip.mp4"), "-c", "copy", str(tmp_path / "late.mp4"))
    late = (tmp_path / "late.mp4").read_bytes()
    import av

    with av.open(tmp_path / "late.mp4") as c:
        stream = c.streams.video[0]
        assert float(stream.start_time * stream.time_base) == pytest.approx(1.12, abs=0.01)
    want = V.decode_clip(V.open_video(mp4, "pyav"), 0.0, 6, 10.0).dense().float()
    for backend in V.BACKENDS:
        video = V.open_video(late, backend)
        assert video.num_frames == 40
        got = V.decode_clip(video, 0.0, 6, 10.0).dense().float()
        assert (got - want).abs().mean() < 3.0, backend  # frames 0-5 of the clip, in both decoders
        end = V.decode_clip(video, 3.5, 5, 10.0)  # up to the last frame, 39
        assert end.frames.shape[0] == 5
    yuv = V.decode_clip(V.open_video(late, "pyav", pixels="yuv420"), 0.0, 3, 10.0)
    assert (yuv.dense().float() - want[:, :3]).abs().mean() < 3.0


@pytest.mark.parametrize("size", [(32, 48), (20, 16), (48, 72), (30, 24)])
def test_decord_scales_to_sizes_its_own_scaler_cannot_hand_over(tmp_path, size):
    """decord 0.6.0 decodes a scaled frame at widths 1-4, 6, 8, 12, 16, 24, 48 and 72 but cannot copy it out
    ("The size must exactly match"); the source then decodes at the stored size and resizes."""
    path = str(tmp_path / "clip.mp4")
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=8:duration=1", "-c:v", "libx264", "-bf", "0", path)
    with open(path, "rb") as f:
        data = f.read()
    for _ in range(2):  # the second time the size is known to need the fallback
        clip = V.open_video(data, "decord", size=size).get_frames([0, 3, 3])
        assert clip.frames.shape == (2, *size, 3) and clip.order.tolist() == [0, 1, 1]
        want = V.resize_frames(V.open_video(data, "decord").get_frames([0, 3]).frames, *size).float()
        assert (clip.frames.float() - want).abs().mean() < 1.0


def test_eval_view_at_size_32_of_a_3_2_clip_decodes_with_decord(tmp_path):
    """`vatp embed` of 3:2 videos at a model size of 32: the eval view decodes 48 x 32 frames (a width decord's
    scaler cannot hand over) and cuts the centre square."""
    import numpy as np

    from data_prep.build import build_dataset
    from models.contracts import AudioInput, TextInput, VideoInput
    from pipeline.data_config import AudioConfig, DataConfig, DatasetSource, TextConfig, resolve_inputs
    from pipeline.stages import CheckSample
    from pipeline.views import sample_views

    src = tmp_path / "src"
    src.mkdir()
    _ffmpeg("-f", "lavfi", "-i", "testsrc2=size=96x64:rate=10:duration=1", "-c:v", "libx264", str(src / "a.mp4"))
    build_dataset(src, tmp_path / "ds", fps=10, short_side=64, workers=1)
    shard = next((tmp_path / "ds" / "shards").glob("*.tar"))
    with tarfile.open(shard) as tf:
        raw = {"__key__": "000000000"} | {m.name.split(".", 1)[1]: tf.extractfile(m).read() for m in tf}
    cfg = DataConfig(
        datasets=[DatasetSource("unused")],
        views="eval",
        decoder="decord",
        eval_windows=1,
        audio=AudioConfig(enabled=False),
        text=TextConfig(enabled=False),
    )
    cfg = resolve_inputs(cfg, video=VideoInput(4, 32, 10.0), audio=AudioInput(16000, 16, 0.5), text=TextInput(8, 100))
    row = sample_views(CheckSample(cfg, {})(dict(raw)), cfg, np.random.default_rng(0), None)
    (window,) = row["video"]
    assert window.clip.size == (32, 48) and (window.top, window.left, window.height, window.width) == (0, 8, 32, 32)
    frames = window.clip.frames[:, :, 8:40].float()
    full = V.open_video(raw["mp4"], "decord").get_frames(list(range(window.clip.frames.shape[0]))).frames
    assert (frames - V.resize_frames(full, 32, 48)[:, :, 8:40].float()).abs().mean() < 3.0
