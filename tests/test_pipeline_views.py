"""View samplers on real samples of the tiny synth dataset: shapes, GDT reversal/shift, audio-video alignment.

Rows are collated and put through the batched augmentation step (`finished`), as the loader does, so every
check sees what the model sees."""

from __future__ import annotations

import dataclasses
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from models.contracts import AudioInput, TextInput, VideoInput
from pipeline import audio as A
from pipeline import video as V
from pipeline.augment import augment_batch
from pipeline.batch_memory import collate_rows
from pipeline.data_config import AugmentConfig, DataConfig, DatasetSource, TextConfig, resolve_inputs
from pipeline.stages import CheckSample
from pipeline.views import SampleRejected, gdt_starts, nearest_captions, sample_views

VIDEO, AUDIO, TEXT = VideoInput(4, 32, 10.0), AudioInput(16000, 16, 0.5), TextInput(8, 100)


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset, tmp_path_factory):
    from data_prep.tokenizer import train_tokenizer
    from pipeline.dataset import load_tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "shards").symlink_to(Path(tiny_dataset) / "shards")
    (d / "dataset.json").symlink_to(Path(tiny_dataset) / "dataset.json")
    return load_tokenizer(train_tokenizer(d, vocab_size=100))


@pytest.fixture(scope="module")
def raw_samples(tiny_dataset) -> list[dict]:
    samples: dict[str, dict] = {}
    for shard in sorted((Path(tiny_dataset) / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                key, ext = m.name.split(".", 1)
                samples.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
    return [samples[k] for k in sorted(samples)]


def make_cfg(**kw) -> DataConfig:
    kw = {"augment": AugmentConfig(enabled=False), **kw}
    return resolve_inputs(DataConfig(datasets=[DatasetSource("unused")], **kw), video=VIDEO, audio=AUDIO, text=TEXT)


def checked(raw: dict, cfg: DataConfig) -> dict:
    return CheckSample(cfg, {})(dict(raw))


def finished(row: dict, cfg: DataConfig) -> dict:
    """One row as the model receives it: collated into a batch of one, augmentation applied, batch axis off."""
    batch = augment_batch(collate_rows([row], {}), cfg)
    flat = ("captions", "captions_mask")  # eval captions are collated flat: one row's are all of them
    return {k: v if k in flat else v[0] for k, v in batch.items() if k != "caption_count"}


def pixels(video: torch.Tensor) -> torch.Tensor:
    """Model input back to [0, 255] pixel values (the test contract has mean 0, std 1: input = pixels / 255)."""
    return video.float() * 255 if video.dtype != torch.uint8 else video.float()


def eval_clip(video: V.VideoSource, start: float) -> torch.Tensor:
    return V.center_clip(V.decode_clip(video, start, 4, 10.0), 32).float()


@pytest.mark.parametrize(
    "views, num_views", [("milnce", 1), ("gdt", 4), ("selflabel", 1), ("eval", 3)], ids=lambda x: str(x)
)
def test_every_view_type_has_the_contract_shapes_and_dtypes(raw_samples, tokenizer, views, num_views):
    cfg = make_cfg(views=views, eval_windows=3, augment=AugmentConfig())
    row = sample_views(checked(raw_samples[0], cfg), cfg, np.random.default_rng(0), tokenizer)
    assert len(row["video"]) == num_views and all(w.clip.frames.dtype == torch.uint8 for w in row["video"])
    out = finished(row, cfg)
    dtype = torch.uint8 if views == "eval" else torch.float32  # eval clips need no augmentation step
    assert out["video"].shape == (num_views, 3, 4, 32, 32) and out["video"].dtype == dtype
    assert set(out) == set(row) - {"video_aug", "audio_aug"}
    assert out["audio"].shape == (num_views, 1, 16, AUDIO.num_frames) and out["audio"].dtype == torch.float32
    text = "captions" if views == "eval" else "text"  # eval: every caption; training: the K near the clip
    k = cfg.text.num_captions if views != "eval" else len(row["captions"])
    assert out[text].shape == (k, 8) and out[text].dtype == torch.int64
    assert out[f"{text}_mask"].dtype == torch.bool and out[f"{text}_mask"].shape == out[text].shape
    assert out[f"{text}_mask"][0].any() and (out[text][~out[f"{text}_mask"]] == 0).all()
    assert out["idx"].dtype == torch.int64 and out["label"].item() == -1 and out["has_audio"].item() is True


def test_text_and_audio_switches_remove_those_keys(raw_samples):
    cfg = make_cfg(views="gdt", audio=dataclasses.replace(make_cfg().audio, enabled=False), text=TextConfig(False))
    out = sample_views(checked(raw_samples[0], cfg), cfg, np.random.default_rng(0), None)
    assert set(out) == {"video", "video_aug", "idx", "label", "has_audio"}


def test_gdt_reversed_views_are_exact_time_flips(raw_samples, tokenizer):
    cfg = make_cfg(views="gdt")
    out = finished(sample_views(checked(raw_samples[1], cfg), cfg, np.random.default_rng(0), tokenizer), cfg)
    v, a = out["video"], out["audio"]  # (4, C, T, H, W), (4, 1, F, Ta)
    assert torch.equal(v[1], v[0].flip(1)) and torch.equal(v[3], v[2].flip(1))
    assert torch.equal(a[1], a[0].flip(-1)) and torch.equal(a[3], a[2].flip(-1))
    assert not torch.equal(v[0], v[1])


def assert_same_clip(got: torch.Tensor, want: torch.Tensor, decoder: str) -> None:
    """decord's RGB frames match exactly; YUV frames converted by the device step match within the colour
    conversion's rounding (libswscale's fixed point reads 1-1.6 grey levels darker on average)."""
    if decoder == "decord":
        assert torch.allclose(got, want, atol=1e-3)
    else:
        diff = (got - want).abs()
        assert diff.mean() < 2.0 and diff.max() < 12, (diff.mean(), diff.max())


@pytest.mark.parametrize("decoder", ["decord", "auto"])
def test_gdt_shifted_view_starts_at_the_shifted_time(raw_samples, tokenizer, decoder):
    cfg = make_cfg(views="gdt", gdt_shift_seconds=1.5, decoder=decoder)
    sample = checked(raw_samples[2], cfg)
    out = finished(sample_views(sample, cfg, np.random.default_rng(5), tokenizer), cfg)
    video = V.open_video(sample["video"])
    duration = video.num_frames / video.fps
    t0, t1 = gdt_starts(duration, 0.4, 1.5, np.random.default_rng(5))  # the sampler's first draw
    assert abs(t1 - t0) >= 1.5
    for view, start in ((0, t0), (2, t1)):
        assert_same_clip(pixels(out["video"][view]), eval_clip(video, start), decoder)
        wav, sr = A.decode_audio(sample["audio"])
        spec = A.log_mel(A.audio_window(wav, sr, start, 0.5), sr, 16, 25.0, 10.0)
        assert torch.allclose(out["audio"][view], spec)


def test_gdt_starts_keeps_the_gap_or_the_largest_possible():
    rng = np.random.default_rng(0)
    for _ in range(200):
        a, b = gdt_starts(4.0, 1.0, 1.0, rng)
        assert abs(a - b) >= 1.0 and 0 <= min(a, b) and max(a, b) <= 3.0
    assert sorted(gdt_starts(1.5, 1.0, 2.0, rng)) == [0.0, 0.5]


def test_audio_window_is_aligned_with_the_clip_start(synth_corpus, raw_samples):
    """Synth contacts make a broadband click: its onset must sit at (contact - window start) in every window."""
    events = {}
    for line in (Path(synth_corpus) / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        events[e["id"]] = [c for seg in e["segments"] for c in seg["contacts"]]
    cfg = make_cfg(views="eval", eval_windows=9, text=TextConfig(False))
    cfg = dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, num_mel_bins=40, seconds=1.0))
    hits = {0.0: [], 0.2: []}
    for raw in raw_samples:
        sample = checked(raw, cfg)
        contacts = [c - sample["meta"]["start"] for c in events[sample["meta"]["id"]]]
        if not contacts:
            continue
        out = sample_views(sample, cfg, np.random.default_rng(0), None)
        starts = np.linspace(0, sample["meta"]["duration"] - 0.4, 9)
        for spec, start in zip(out["audio"][:, 0], starts):  # (F, Ta)
            flux = (spec[20:, 1:] - spec[20:, :-1]).clamp(min=0).sum(0)  # onset strength, upper mel bands
            onset = int(flux.argmax()) + 1
            for offset in hits:
                inside = [round((c + offset - start) * 100) for c in contacts if 0.05 < c + offset - start < 0.95]
                if inside:
                    hits[offset].append(min(abs(onset - f) for f in inside) <= 2)
    assert len(hits[0.0]) >= 5
    assert np.mean(hits[0.0]) >= 0.75  # aligned: the loudest onset is a contact click
    assert np.mean(hits[0.2]) <= 0.4  # control: the same check 200 ms off fails


def test_nearest_captions_follows_the_official_greedy_window():
    caps = [{"start": s, "end": e} for s, e in [(0, 1), (1, 2), (5, 6), (6, 7), (7, 8), (20, 21)]]
    assert nearest_captions(caps, 3, 3) == [2, 3, 4]  # right span (7-5) beats left (7-1)
    assert nearest_captions(caps, 1, 2) == [0, 1]  # reaching index 0 returns the first K
    assert nearest_captions(caps, 5, 3) == [3, 4, 5]  # growing right from the end is impossible: left
    assert nearest_captions(caps, 4, 4) == [1, 2, 3, 4]  # left keeps winning: 2 < 14, 3 < 15, 7 < 16
    even = [{"start": s, "end": s + 1} for s in range(3)]
    assert nearest_captions(even, 1, 2) == [1, 2]  # a tie (2 vs 2) extends to the right
    assert nearest_captions(caps[:2], 0, 4) == [0, 1]  # fewer than K: all of them, no repeats


def test_milnce_pads_missing_candidates_with_empty_rows(raw_samples, tokenizer):
    cfg = make_cfg(views="milnce", text=TextConfig(num_captions=4, tokenizer="x"))
    sample = checked(raw_samples[0], cfg)
    sample["meta"]["captions"] = sample["meta"]["captions"][:1]
    out = sample_views(sample, cfg, np.random.default_rng(0), tokenizer)
    assert out["text_mask"][0].any() and not out["text_mask"][1:].any() and (out["text"][1:] == 0).all()


def test_samples_without_captions_or_audio_are_rejected_when_required(raw_samples):
    cfg = make_cfg(views="milnce")
    meta = json.loads(raw_samples[0]["json"])
    meta["captions"] = [{"start": 0, "end": 1, "text": "  "}]
    with pytest.raises(SampleRejected) as e:
        CheckSample(cfg, {})({**raw_samples[0], "json": json.dumps(meta).encode()})
    assert e.value.reason == "no_captions"
    silent = {k: v for k, v in raw_samples[0].items() if k != "flac"}
    with pytest.raises(SampleRejected) as e:
        CheckSample(make_cfg(views="gdt", require_audio=True), {})(silent)
    assert e.value.reason == "missing_audio"
    cfg = make_cfg(views="selflabel", text=TextConfig(False))
    out = finished(sample_views(CheckSample(cfg, {})(silent), cfg, np.random.default_rng(0), None), cfg)
    assert out["has_audio"].item() is False and (out["audio"] == 0).all()


def test_eval_views_are_deterministic_and_evenly_spaced(raw_samples, tokenizer):
    cfg = make_cfg(views="eval", eval_windows=3, with_meta=True)
    sample = checked(raw_samples[3], cfg)
    a = finished(sample_views(dict(sample), cfg, np.random.default_rng(0), tokenizer), cfg)
    b = finished(sample_views(dict(sample), cfg, np.random.default_rng(1), tokenizer), cfg)
    assert torch.equal(a["video"], b["video"]) and torch.equal(a["audio"], b["audio"])
    video = V.open_video(sample["video"])
    last = video.num_frames / video.fps - 0.4
    # decoded straight at the model's size (the decoder scales) vs decoded in full then crop + resize
    assert (a["video"][2].float() - eval_clip(video, last)).abs().mean() < 4.0
    h, w = V.short_side_size(sample["meta"]["height"], sample["meta"]["width"], 32)
    assert (h, w) == (32, 43)  # the stored 64 x 86 frame at the model's short side...
    first = V.decode_clip(V.open_video(sample["video"], size=(h, w + 1)), 0.0, 4, 10.0).dense()
    assert torch.equal(a["video"][0], first[..., 6:38])  # ...decoded 44 wide, so the centre 32 x 32 is exact
    assert a["meta"]["captions"] and a["captions"].shape[0] == len(a["meta"]["captions"])
    whole = sample_views(dict(sample), dataclasses.replace(cfg, eval_windows=0), np.random.default_rng(0), tokenizer)
    assert len(whole["video"]) == 1


def test_eval_audio_windows_are_the_log_mels_of_their_starts_and_silent_ones_are_zero(raw_samples):
    cfg = make_cfg(views="eval", eval_windows=3, text=TextConfig(False))
    sample = checked(raw_samples[3], cfg)
    out = sample_views(dict(sample), cfg, np.random.default_rng(0), None)
    video = V.open_video(sample["video"])
    starts = np.linspace(0, video.num_frames / video.fps - 0.4, 3)
    wav, sr = A.decode_audio(sample["audio"])
    for spec, start in zip(out["audio"], starts):  # batched log-mel vs one window at a time
        assert torch.allclose(spec, A.log_mel(A.audio_window(wav, sr, start, 0.5), sr, 16, 25.0, 10.0), atol=1e-5)
    silent = sample_views({**sample, "audio": None, "has_audio": False}, cfg, np.random.default_rng(0), None)
    assert silent["audio"].shape == out["audio"].shape and not silent["audio"].any()


@pytest.mark.parametrize("max_tokens", [3, 8, 64])
def test_caption_rows_are_the_ids_of_encode_batch(raw_samples, tokenizer, max_tokens):
    """The loader's per-caption encoding gives the same ids and mask as data_prep's batch encoder."""
    from pipeline.dataset import encode_batch

    cfg = make_cfg(views="eval", text=TextConfig(num_captions=4, max_tokens=max_tokens, tokenizer="x"))
    sample = checked(raw_samples[0], cfg)
    out = sample_views(dict(sample), cfg, np.random.default_rng(0), tokenizer)
    captions = [c["text"] for c in sample["meta"]["captions"] if c["text"].strip()]
    ids, mask = encode_batch(tokenizer, captions, max_tokens)
    assert out["captions"].shape == (len(captions), max_tokens)
    assert torch.equal(out["captions"], ids) and torch.equal(out["captions_mask"], mask)
    assert out["captions_mask"].any(1).all()
