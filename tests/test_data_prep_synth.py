"""The synthetic corpus: real decodable files, determinism, and structure each objective can learn from."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import av
import decord
import numpy as np
import pytest

from data_prep import synth_captions
from data_prep.synth import assign_splits, make_synth_corpus, plan_video, render_video
from data_prep.synth_classes import CLASSES

ARGS = dict(videos=8, seed=0, seconds=3.0, width=96, height=72, fps=20, sample_rate=16000)
GEOMETRY = {k: ARGS[k] for k in ("seed", "seconds", "width", "height", "fps", "sample_rate")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    make_synth_corpus(out, **ARGS, workers=2)
    return out


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def _events(out: Path) -> dict[str, dict]:
    return {e["id"]: e for e in map(json.loads, (out / "events.jsonl").read_text().splitlines())}


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _audio(path: Path) -> tuple[np.ndarray, int]:
    """Decoded audio `(channels, samples)` float and its sample rate."""
    with av.open(str(path)) as c:
        frames = list(c.decode(audio=0))
    assert frames[0].format.is_planar
    return np.concatenate([f.to_ndarray() for f in frames], axis=1), frames[0].sample_rate


def _object_track(path: Path, rgb: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per frame: centroid x, centroid y (NaN where the object is absent) and area of the object's colour."""
    vr = decord.VideoReader(str(path))
    frames = vr.get_batch(list(range(len(vr)))).asnumpy().astype(np.float32)  # (T, H, W, 3)
    mask = np.linalg.norm(frames - np.array(rgb, np.float32), axis=-1) < 60  # (T, H, W)
    area = mask.sum(axis=(1, 2)).astype(np.float64)
    ys, xs = np.mgrid[0 : mask.shape[1], 0 : mask.shape[2]]
    with np.errstate(invalid="ignore"):
        cx = (mask * xs).sum(axis=(1, 2)) / area
        cy = (mask * ys).sum(axis=(1, 2)) / area
    return cx, cy, area


def test_corpus_files_are_real_h264_aac_with_sidecars(corpus):
    rows = _manifest(corpus)
    labels = {c["label"] for c in json.loads((corpus / "classes.json").read_text())["classes"]}
    assert len(rows) == ARGS["videos"] and len(labels) == len(CLASSES)
    for row in rows:
        path = corpus / row["path"]
        assert row["label"] in labels and path.with_suffix(".srt").is_file()
        vr = decord.VideoReader(str(path))
        assert abs(len(vr) - ARGS["seconds"] * ARGS["fps"]) <= 1
        assert vr[0].shape == (ARGS["height"], ARGS["width"], 3)
        with av.open(str(path)) as c:
            v, a = c.streams.video[0], c.streams.audio[0]
            assert v.codec_context.name == "h264" and v.codec_context.pix_fmt == "yuv420p"
            assert a.codec_context.name == "aac" and a.codec_context.sample_rate == ARGS["sample_rate"]
            assert abs(c.duration / 1e6 - ARGS["seconds"]) < 0.1
        audio, sr = _audio(path)
        assert abs(audio.shape[1] / sr - ARGS["seconds"]) < 0.1
    assert not list(corpus.rglob("*.tmp*")), "temporary files left behind"


def test_same_seed_gives_identical_bytes_and_rerun_skips(corpus, tmp_path):
    again = tmp_path / "again"
    make_synth_corpus(again, **ARGS, workers=1)
    assert _files(again) == _files(corpus)  # mp4 bytes too, across worker counts

    before = {p: p.stat().st_mtime_ns for p in (corpus / "videos").glob("*.mp4")}
    summary = make_synth_corpus(corpus, **ARGS, workers=2)
    assert summary["written"] == 0 and summary["skipped"] == ARGS["videos"]
    assert {p: p.stat().st_mtime_ns for p in (corpus / "videos").glob("*.mp4")} == before


def test_changed_args_or_seed_rewrite_and_differ(tmp_path):
    small = dict(videos=3, seconds=1.0, width=32, height=32, fps=10, workers=1)
    make_synth_corpus(tmp_path / "a", seed=0, **small)
    make_synth_corpus(tmp_path / "b", seed=1, **small)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a["manifest.csv"] != b["manifest.csv"]
    assert all(a[k] != b[k] for k in a if k.startswith("videos/"))

    summary = make_synth_corpus(tmp_path / "a", seed=0, **{**small, "fps": 12})  # a stale file is not "finished"
    assert summary["written"] == 3
    assert len(decord.VideoReader(str(tmp_path / "a" / "videos" / "synth_000000.mp4"))) == 12


def test_clicks_sit_on_the_visual_bounce_contacts(tmp_path):
    (tmp_path / "videos").mkdir()
    index = next(i for i in range(len(CLASSES)) if plan_video(i, **GEOMETRY).cls.label == "red_circle_bounce")
    plan = plan_video(index, **GEOMETRY)
    render_video(plan, tmp_path)
    path = tmp_path / "videos" / f"{plan.id}.mp4"
    _, cy, area = _object_track(path, plan.look["object_rgb"])
    visible = np.concatenate([[0], (area > 0).astype(int), [0]])
    runs = zip(np.nonzero(np.diff(visible) == 1)[0], np.nonzero(np.diff(visible) == -1)[0])  # appearances
    arrivals = []  # frames where the falling ball lands (each appearance has its own size, so its own floor)
    for a, b in runs:
        floor = cy[a:b].max()
        arrivals += [f for f in range(a + 1, b) if cy[f] >= floor - 1.0 and cy[f - 1] < cy[f] - 1.0]
    arrivals = np.array(arrivals)
    assert len(arrivals) >= 4

    audio, sr = _audio(path)
    high = np.diff(audio.mean(axis=0), prepend=0.0) ** 2  # clicks are broadband, tones are not
    per_frame = sr // ARGS["fps"]
    env = np.array([high[f * per_frame : (f + 1) * per_frame].sum() for f in range(len(cy))])
    quiet = np.median(env)
    for f in arrivals:
        assert env[max(f - 1, 0) : f + 2].max() > 20 * quiet, f"no click at contact frame {f}"
    loudest = np.argsort(env)[::-1][:3]
    assert all(np.abs(arrivals - f).min() <= 1 for f in loudest), (loudest, arrivals)


def test_tone_starts_when_the_object_appears(corpus):
    events, checked = _events(corpus), 0
    for row in _manifest(corpus):
        path = corpus / row["path"]
        audio, sr = _audio(path)
        level = np.abs(audio.mean(axis=0))
        _, _, area = _object_track(path, events[row["id"]]["look"]["object_rgb"])
        for seg in events[row["id"]]["segments"]:
            f0 = round(seg["start"] * ARGS["fps"])
            if f0 < 3:
                continue
            assert area[f0 - 2] == 0 and area[f0 + 1] > 0  # the object really appears at the segment start
            before = level[int((seg["start"] - 0.1) * sr) : int(seg["start"] * sr)].mean()
            after = level[int(seg["start"] * sr) : int((seg["start"] + 0.1) * sr)].mean()
            assert after > 4 * before, (row["id"], seg, before, after)
            checked += 1
    assert checked >= 4


def test_motions_have_a_direction_so_reversed_clips_differ(corpus):
    """Each class's motion statistic has a fixed sign forward; time-reversed it would flip."""
    events = _events(corpus)
    motions_seen = set()
    for row in _manifest(corpus):
        cls = next(c for c in CLASSES if c.label == row["label"])
        cx, cy, area = _object_track(corpus / row["path"], events[row["id"]]["look"]["object_rgb"])
        for seg in events[row["id"]]["segments"]:
            a, b = round(seg["start"] * ARGS["fps"]) + 1, round(seg["end"] * ARGS["fps"]) - 1
            t = np.arange(a, b)
            x, y, s = cx[a:b], cy[a:b], area[a:b]
            stat = {
                "rightward": np.polyfit(t, x, 1)[0],
                "bounce": np.polyfit(t, x, 1)[0],
                "leftward": -np.polyfit(t, x, 1)[0],
                "grow": np.polyfit(t, s, 1)[0],
                "shrink": -np.polyfit(t, s, 1)[0],
                # Clockwise on screen (y down): consecutive velocities turn with a positive cross product.
                "orbit": np.sum(np.diff(x)[:-1] * np.diff(y)[1:] - np.diff(y)[:-1] * np.diff(x)[1:]),
            }.get(cls.motion)
            if stat is None:
                continue
            motions_seen.add(cls.motion)
            assert stat > 0, (row["label"], seg, stat)
    assert len(motions_seen) >= 4


def _parse_srt(text: str) -> list[tuple[float, float, str]]:
    def secs(stamp: str) -> float:
        h, m, s, ms = map(int, re.split("[:,]", stamp))
        return h * 3600 + m * 60 + s + ms / 1000

    out = []
    for block in text.strip().split("\n\n"):
        _, times, caption = block.split("\n", 2)
        start, end = times.split(" --> ")
        out.append((secs(start), secs(end), caption))
    return out


def test_srt_sidecars_hold_the_planned_captions(corpus):
    for vid, event in _events(corpus).items():
        srt = _parse_srt((corpus / "videos" / f"{vid}.srt").read_text(encoding="utf-8"))
        assert srt == [(c["start"], c["end"], c["text"]) for c in event["captions"]]


def test_captions_are_varied_partly_filler_and_partly_mistimed():
    plans = [plan_video(i, **GEOMETRY | {"seconds": 10.0}) for i in range(60)]
    caps = [c for p in plans for c in p.captions]
    kinds = Counter(c["kind"] for c in caps)
    assert 0.2 < kinds["filler"] / len(caps) < 0.45
    assert 0.05 < kinds["mistimed"] / len(caps) < 0.35
    narrations = [c for c in caps if c["kind"] != "filler"]
    assert len({c["text"] for c in narrations}) > 0.8 * len(narrations)
    for p in plans:
        for c in p.captions:
            if c["kind"] == "filler":
                assert c["text"] in synth_captions.FILLERS
                continue
            seg = p.segments[c["segment"]]
            offset = abs(c["start"] - seg.start / p.fps)
            assert (offset >= 1.0) if c["kind"] == "mistimed" else (offset < 1e-3)
            shape_words = synth_captions.SHAPE_WORDS[p.cls.shape]
            assert any(f" {w}" in c["text"].replace(",", " ") for w in shape_words), c["text"]
    red = " ".join(c["text"] for p in plans if p.cls.colour == "red" for c in p.captions)
    assert sum(w in red.split() for w in synth_captions.COLOUR_WORDS["red"]) >= 2  # synonyms, not one fixed word


def test_splits_are_stratified_deterministic_and_cover_all():
    classes = [CLASSES.index(plan_video(i, **GEOMETRY).cls) for i in range(200)]
    splits = assign_splits(classes, seed=0)
    assert splits == assign_splits(classes, seed=0) and splits != assign_splits(classes, seed=1)
    for c in range(len(CLASSES)):
        counts = Counter(s for s, k in zip(splits, classes) if k == c)
        assert sum(counts.values()) == 20
        assert abs(counts["train"] - 14) <= 1 and abs(counts["val"] - 3) <= 1 and abs(counts["test"] - 3) <= 1


def test_small_corpus_still_has_every_split(corpus):
    assert {r["split"] for r in _manifest(corpus)} == {"train", "val", "test"}


@pytest.mark.parametrize(
    "bad, match",
    [({"videos": 0}, "videos"), ({"width": 63}, "width"), ({"seconds": 0.5}, "seconds"), ({"workers": 0}, "workers")],
)
def test_bad_arguments_name_the_value(tmp_path, bad, match):
    with pytest.raises(ValueError, match=match):
        make_synth_corpus(tmp_path, **{**ARGS, **bad})


def test_ffmpeg_failure_carries_its_stderr_and_leaves_no_temp_files(tmp_path, monkeypatch):
    import imageio_ffmpeg

    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'Unknown encoder libx264' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(imageio_ffmpeg, "get_ffmpeg_exe", lambda: str(fake))
    with pytest.raises(RuntimeError, match="exit code 3.*Unknown encoder libx264"):
        make_synth_corpus(tmp_path / "out", **{**ARGS, "videos": 1}, workers=1)
    assert not [p for p in (tmp_path / "out" / "videos").iterdir() if p.suffix != ".srt"]
