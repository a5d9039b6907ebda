"""The two halves of training augmentation: parameters drawn per view, and the batched step that applies them."""

from __future__ import annotations

import numpy as np
import torch

from models import VARIANTS
from pipeline import audio as A
from pipeline import augment as Aug
from pipeline import video as V
from pipeline.batch_memory import collate_rows
from pipeline.data_config import AugmentConfig

MEAN, STD = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def batch_of(frames: list[torch.Tensor], rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A (B, 1, C, T, H, W) uint8 batch of whole-frame windows, as the loader collates them, and its params."""
    views = [
        {"video": [V.VideoWindow(V.Clip(f, torch.arange(len(f))), 0, 0, *f.shape[1:3])], "idx": torch.tensor(i)}
        for i, f in enumerate(frames)
    ]
    rows = [r + [0, 0] if len(r) == 6 else r for r in rows]  # RGB boxes: no chroma offsets
    return collate_rows(views, {})["video"], torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, -1)


def test_drawn_boxes_lie_inside_the_frame_with_the_configured_area_and_aspect():
    rng = np.random.default_rng(0)
    boxes = [Aug.draw_box(90, 160, rng, (0.3, 0.8)) for _ in range(500)]
    for top, left, h, w in boxes:
        assert 0 <= top and top + h <= 90 and 0 <= left and left + w <= 160
        assert 0.25 <= h * w / (90 * 160) <= 0.85 and 0.7 <= w / h <= 1.4
    assert len({b[:2] for b in boxes}) > 100  # positions vary
    assert Aug.draw_box(10, 10, np.random.default_rng(0), (1.0, 1.0), (2.0, 3.0)) == (0, 0, 10, 10)  # centre square


def test_views_without_randomness_are_the_centre_square_unflipped_unjittered():
    box, row = Aug.draw_video_view(48, 80, AugmentConfig(), None)
    assert box == (0, 16, 48, 48) and row.tolist() == [48, 48, 0, 1, 1, 1, 0, 0]
    box, row = Aug.draw_video_view(48, 80, AugmentConfig(enabled=False), np.random.default_rng(0))
    assert box == (0, 16, 48, 48) and row.tolist() == [48, 48, 0, 1, 1, 1, 0, 0]
    rows = [Aug.draw_video_view(48, 80, AugmentConfig(flip=True), np.random.default_rng(i))[1] for i in range(200)]
    assert 60 < sum(r[2] for r in rows) < 140 and all(0.6 <= f <= 1.4 for r in rows for f in r[3:6])


def test_identity_parameters_resize_and_normalise_with_the_models_contract():
    frames = torch.randint(0, 256, (4, 40, 40, 3), dtype=torch.uint8)
    video, params = batch_of([frames], [[40, 40, 0, 1, 1, 1]])
    contract = VARIANTS["r2plus1d_18"].contract  # GDT's mean/std, not the identity
    out = Aug.augment_video(video, params, 40, contract.mean, contract.std)
    assert out.shape == (1, 1, 3, 4, 40, 40) and out.dtype == torch.float32
    pixels = frames.permute(3, 0, 1, 2).float()  # (C, T, H, W)
    mean, std = torch.tensor(contract.mean).view(3, 1, 1, 1), torch.tensor(contract.std).view(3, 1, 1, 1)
    assert torch.allclose(out[0, 0], (pixels / 255 - mean) / std, atol=1e-5)


def test_boxes_of_different_sizes_batch_together_and_each_is_resized_alone():
    a = torch.randint(0, 256, (2, 30, 50, 3), dtype=torch.uint8)
    b = torch.randint(0, 256, (2, 44, 20, 3), dtype=torch.uint8)
    video, params = batch_of([a, b], [[30, 50, 0, 1, 1, 1], [44, 20, 0, 1, 1, 1]])
    assert video.shape == (2, 1, 3, 2, 44, 50) and video.dtype == torch.uint8
    assert video.permute(0, 1, 3, 4, 5, 2).is_contiguous()  # channels last in memory, as decoders hand frames
    out = Aug.augment_video(video, params, 16, MEAN, STD) * 255
    for frames, got in zip((a, b), out[:, 0]):
        want = V.resize_frames(frames, 16, 16).permute(3, 0, 1, 2).float()  # padding never leaks in
        assert torch.allclose(got, want, atol=1e-3)


def test_flip_mirrors_and_jitter_stays_bounded_and_keeps_grey_grey():
    grey = torch.full((3, 16, 16, 3), 100, dtype=torch.uint8)
    grey[1] = 200  # frames differ in time; channels are equal everywhere
    ramp = torch.arange(16, dtype=torch.uint8).mul(15).view(1, 1, 16, 1).expand(3, 16, 16, 3).contiguous()
    video, params = batch_of(
        [ramp, ramp, grey], [[16, 16, 0, 1, 1, 1], [16, 16, 1, 1, 1, 1], [16, 16, 0, 1.3, 0.7, 1.4]]
    )
    out = Aug.augment_video(video, params, 16, MEAN, STD) * 255  # (3, 1, C, T, H, W)
    assert torch.allclose(out[1], out[0].flip(-1)) and not torch.allclose(out[1], out[0])
    jittered = out[2, 0]
    assert torch.allclose(jittered[0], jittered[1], atol=1e-3) and torch.allclose(jittered[1], jittered[2], atol=1e-3)
    assert jittered.min() >= 0 and jittered.max() <= 255 and not torch.allclose(jittered, grey.float()[..., 0])
    assert 100 < float(jittered[0, 0].mean()) < 200  # brightness 1.3, then contrast 0.7 towards the mean


def test_float_resize_path_used_on_gpus_matches_the_uint8_cpu_path():
    """Accelerators resize in float (no uint8 kernel there); forced here on the CPU, the two agree to rounding."""
    frames = torch.randint(0, 256, (4, 50, 70, 3), dtype=torch.uint8)
    video, params = batch_of([frames], [[37, 61, 1, 1.1, 0.9, 1.2]])
    fast = Aug.augment_video(video, params, 24, MEAN, STD, uint8_resize=True)
    slow = Aug.augment_video(video, params, 24, MEAN, STD, uint8_resize=False)
    assert (fast - slow).abs().max() * 255 <= 1.5


def test_audio_gain_equals_the_log_mel_of_the_scaled_waveform_and_masks_zero_their_bins():
    wav = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    spec = A.log_mel(wav, 16000, 40, 25.0, 10.0)  # (1, F, Ta)
    params = torch.tensor([[[1.08, 5, 2, 30, 4]]])  # gain, freq start/width, time start/width
    out = Aug.augment_audio(spec[None, None], params)[0, 0]
    want = A.log_mel(wav * np.float32(1.08), 16000, 40, 25.0, 10.0)
    keep = torch.ones_like(want, dtype=torch.bool)
    keep[:, 5:7] = False
    keep[:, :, 30:34] = False
    assert torch.allclose(out[keep], want[keep], atol=1e-3)
    assert (out[~keep] == 0).all() and (out[keep] != 0).all()


def test_mirrored_audio_parameters_augment_a_reversed_spectrogram_as_its_time_flip():
    spec = torch.randn(1, 20, 51)
    row = Aug.draw_audio_view(20, 51, AugmentConfig(), np.random.default_rng(3))
    assert row[4] > 0  # a real time mask
    pair = torch.stack([spec, spec.flip(-1)])[None]  # (1, 2, 1, F, Ta)
    params = torch.from_numpy(np.stack([row, Aug.mirror_audio_view(row, 51)]))[None]
    out = Aug.augment_audio(pair, params)[0]
    assert torch.allclose(out[1], out[0].flip(-1))


def test_augment_batch_consumes_the_parameters_and_leaves_eval_batches_alone():
    from pipeline.data_config import DataConfig, DatasetSource

    cfg = DataConfig(datasets=[DatasetSource("x")], size=8, mean=MEAN, std=STD)
    video, params = batch_of([torch.zeros(2, 10, 10, 3, dtype=torch.uint8)], [[10, 10, 0, 1, 1, 1]])
    out = Aug.augment_batch({"video_box": video, "video_aug": params}, cfg)
    assert set(out) == {"video"} and out["video"].shape == (1, 1, 3, 2, 8, 8)
    plain = {"video": torch.zeros(1, 1, 3, 2, 8, 8, dtype=torch.uint8)}
    assert Aug.augment_batch(dict(plain), cfg)["video"].dtype == torch.uint8


def test_model_normalises_pixels_itself_and_takes_augmented_input_as_is():
    from models.contracts import normalize_video
    from models.towers import ModelConfig, SpaceConfig, build_model

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(
            video="r2plus1d_tiny", size=16, num_frames=2, spaces=[SpaceConfig(name="v", modalities=["video"], dim=4)]
        )
    ).eval()
    contract = model.input_contracts()["video"]
    pixels = torch.randint(0, 256, (2, 1, 3, 2, 16, 16), dtype=torch.uint8)
    normalised = normalize_video(pixels.clone(), contract.mean, contract.std)
    with torch.no_grad():
        a = model({"video": pixels})["video@v"]
        b = model({"video": normalised})["video@v"]
    assert torch.allclose(a, b, atol=1e-5)


def yuv_frames(t: int, h: int, w: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Smooth, in-gamut YUV 4:2:0 frames (luma 16-235, chroma near grey), as a camera would store them."""
    g = torch.Generator().manual_seed(seed)
    luma = torch.randint(40, 200, (t, h, w), generator=g, dtype=torch.uint8)
    chroma = torch.randint(110, 146, (t, 2, (h + 1) // 2, (w + 1) // 2), generator=g, dtype=torch.uint8)
    return luma, chroma


def yuv_batch(luma, chroma, boxes, rows):
    """Collate one YUV window per box (top, left, h, w) of the same frames, as the loader does."""
    clip = V.Clip(luma, torch.arange(len(luma)), chroma)
    views = [{"video": [V.VideoWindow(clip, *box)], "idx": torch.tensor(i)} for i, box in enumerate(boxes)]
    batch = collate_rows(views, {})
    params = [row + [box[0] % 2, box[1] % 2] for box, row in zip(boxes, rows)]
    return batch, torch.tensor(params, dtype=torch.float32).view(len(boxes), 1, -1)


def test_yuv_boxes_at_odd_offsets_convert_exactly_like_the_whole_frame():
    """Without a resize the device step's output is the whole frame's RGB conversion, cut at the box: the chroma
    covering an odd top/left box lines up with its luma."""
    luma, chroma = yuv_frames(3, 21, 30)
    full = V.yuv420_to_rgb(V.upsample_chroma(luma, chroma, 0, 0).transpose(0, 1).float()).clamp(0, 255)
    boxes = [(0, 0, 16, 16), (1, 3, 16, 16), (5, 14, 16, 16), (4, 8, 16, 16)]
    batch, params = yuv_batch(luma, chroma, boxes, [[16, 16, 0, 1, 1, 1]] * 4)
    assert batch["video"].shape == (4, 1, 1, 3, 16, 16) and batch["video_uv"].shape == (4, 1, 2, 3, 9, 9)
    out = Aug.augment_video(batch["video"], params, 16, MEAN, STD, batch["video_uv"]) * 255
    for (top, left, h, w), got in zip(boxes, out[:, 0]):
        assert torch.allclose(got, full[:, :, top : top + h, left : left + w], atol=1e-3)


def test_yuv_boxes_resize_and_convert_like_rgb_frames_within_rounding():
    luma, chroma = yuv_frames(4, 40, 64, seed=1)
    rgb = V.Clip(luma, torch.arange(4), chroma).dense().permute(1, 2, 3, 0).contiguous()  # (T, H, W, 3) uint8
    box, row = (3, 7, 33, 41), [33, 41, 1, 1.2, 0.8, 1.1]
    batch, params = yuv_batch(luma, chroma, [box], [row])
    got = Aug.augment_video(batch["video"], params, 24, MEAN, STD, batch["video_uv"])
    top, left, h, w = box
    ref_video, ref_params = batch_of([rgb[:, top : top + h, left : left + w].contiguous()], [row])
    want = Aug.augment_video(ref_video, ref_params, 24, MEAN, STD)
    diff = (got - want).abs() * 255
    # Only where rounding happens differs (uint8 resize of YUV vs of RGB, amplified by the conversion and jitter).
    assert diff.mean() < 1.0 and diff.max() < 6, (diff.mean(), diff.max())


def test_float_resize_path_used_on_gpus_matches_the_uint8_cpu_path_for_yuv_boxes():
    luma, chroma = yuv_frames(4, 50, 70, seed=2)
    batch, params = yuv_batch(luma, chroma, [(3, 5, 37, 61)], [[37, 61, 1, 1.1, 0.9, 1.2]])
    args = (batch["video"], params, 24, MEAN, STD, batch["video_uv"])
    fast, slow = Aug.augment_video(*args, uint8_resize=True), Aug.augment_video(*args, uint8_resize=False)
    # uint8 rounding of the YUV resize (0.5 level), amplified by the conversion (up to 2x for blue) and the jitter
    assert (fast - slow).abs().max() * 255 <= 3.5
