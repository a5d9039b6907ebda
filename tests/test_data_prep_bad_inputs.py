"""Every kind of bad input is converted or skipped with a reason (failures.jsonl + summary); nothing half-written."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import imageio_ffmpeg
import pytest

from data_prep import media
from data_prep.build import build_dataset

OPTS = dict(fps=8, short_side=32, max_seconds=30.0, sample_rate=16000, samples_per_shard=4, workers=2, timeout=60.0)
SRC = "testsrc=size=48x32:rate=10:duration=1"
TONE = "sine=frequency=300:sample_rate=16000:duration=1"
ODD_NAME = "we ird 'name\" é"


def _ffmpeg(*args: str) -> None:
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    subprocess.run(argv, check=True, timeout=60, capture_output=True)


def _video(path: Path, src: str = SRC, *extra: str, audio: bool = True) -> Path:
    inputs = ["-f", "lavfi", "-i", src] + (["-f", "lavfi", "-i", TONE, "-c:a", "aac"] if audio else [])
    _ffmpeg(*inputs, *extra, "-pix_fmt", "yuv420p", str(path))
    return path


def _make_bad_corpus(d: Path) -> None:
    d.mkdir()
    good = _video(d / "good.mp4")
    (d / "zero_byte.mp4").write_bytes(b"")
    (d / "truncated.mp4").write_bytes(good.read_bytes()[: good.stat().st_size // 3])  # moov is at the end: lost
    (d / "text.mp4").write_text("this is not a video\n")
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32", "-frames:v", "1", "-f", "image2", str(d / "image.mp4"))
    _ffmpeg("-f", "lavfi", "-i", TONE, "-c:a", "aac", str(d / "audio_only.mp4"))
    _video(d / "no_audio.mp4", audio=False)
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=32x32:rate=25",
        "-frames:v",
        "1",
        "-pix_fmt",
        "yuv420p",
        str(d / "sub_frame.mp4"),
    )
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=33x17:rate=10:duration=1", "-pix_fmt", "yuv444p", str(d / "odd.mp4"))
    _ffmpeg("-display_rotation", "90", "-i", str(good), "-c", "copy", str(d / "rotated.mp4"))
    _video(d / "vfr.mp4", SRC, "-vf", "select='lt(mod(n,5),2)'", "-fps_mode", "vfr", audio=False)
    _video(d / "mpeg4.avi", SRC, "-c:v", "mpeg4", audio=False)
    _ffmpeg("-f", "lavfi", "-i", SRC, "-c:v", "libvpx-vp9", str(d / "vp9.webm"))
    _video(d / "huge.mp4", "testsrc=size=4000x2000:rate=5:duration=0.4", audio=False)
    _video(d / f"{ODD_NAME}.mp4")
    _video(d / "dup.mp4", audio=False)
    _video(d / "dup.mkv", audio=False)
    captions = {
        "cap_empty.srt": b"",
        "cap_malformed.srt": b"this is\nnot --> an srt\n\x00\x01\n",
        "cap_malformed_vtt.vtt": b"WEBVTT\n\nno timing here\n\n00:00.000 --> soon\nbroken\n",
        "cap_latin1.srt": "1\n00:00:00,000 --> 00:00:00,800\ncaf\xe9 cr\xe8me\n".encode("latin-1"),
        "cap_outside.srt": b"1\n00:00:50,000 --> 00:00:60,000\nlater\n\n2\n00:00:00,500 --> 00:01:40,000\nspans\n",
    }
    for name, content in captions.items():
        _video(d / f"{Path(name).stem}.mp4", audio=False)
        (d / name).write_bytes(content)


class Built:
    def __init__(self, out: Path, summary):
        self.out, self.summary = out, summary
        self.samples: dict[str, dict] = {}
        self.members: dict[str, list[str]] = {}
        for shard in sorted((out / "shards").glob("*.tar")):
            with tarfile.open(shard) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    self.members.setdefault(key, []).append(ext)
                    if ext == "json":
                        meta = json.loads(tar.extractfile(m).read())
                        self.samples[meta["id"]] = meta
        lines = (out / "failures.jsonl").read_text(encoding="utf-8").splitlines()
        self.failures = [json.loads(line) for line in lines]

    def failure(self, name: str) -> dict:
        found = [f for f in self.failures if os.path.basename(f["source"]) == name and not f.get("kept")]
        assert len(found) == 1, (name, self.failures)
        return found[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    _make_bad_corpus(root / "videos")
    out = root / "dataset"
    return Built(out, build_dataset(root / "videos", out, **OPTS))


def test_zero_byte_file_is_skipped(built):
    assert built.failure("zero_byte.mp4")["reason"] == "empty_file"


def test_truncated_mp4_is_skipped(built):
    assert built.failure("truncated.mp4")["reason"] in ("not_media", "unreadable")
    assert "truncated" not in built.samples


def test_text_file_named_mp4_is_skipped(built):
    assert built.failure("text.mp4")["reason"] == "not_media"


def test_image_renamed_mp4_is_skipped(built):
    assert built.failure("image.mp4")["reason"] == "not_media"


def test_audio_only_file_is_skipped(built):
    f = built.failure("audio_only.mp4")
    assert f["reason"] == "no_video_stream" and "audio" in f["detail"]


def test_video_without_audio_is_converted_without_audio_member(built):
    meta = built.samples["no_audio"]
    assert meta["has_audio"] is False and meta["sample_rate"] is None
    assert sorted(built.members[f"{meta['idx']:09d}"]) == ["json", "mp4"]
    assert sorted(built.members[f"{built.samples['good']['idx']:09d}"]) == ["flac", "json", "mp4"]


def test_sub_one_frame_video_is_skipped(built):
    assert built.failure("sub_frame.mp4")["reason"] == "no_frames"


def test_odd_dimensions_become_even(built):
    meta = built.samples["odd"]
    assert meta["height"] == 32 and meta["width"] % 2 == 0 and meta["width"] == pytest.approx(33 * 32 / 17, abs=2)


def test_rotated_video_is_stored_upright(built):
    assert (built.samples["good"]["width"], built.samples["good"]["height"]) == (48, 32)
    assert (built.samples["rotated"]["width"], built.samples["rotated"]["height"]) == (32, 48)


def test_variable_frame_rate_becomes_constant(built):
    meta = built.samples["vfr"]
    assert meta["fps"] == 8.0 and meta["num_frames"] == pytest.approx(meta["duration"] * 8, abs=0.01)
    assert meta["num_frames"] >= 6  # the dropped frames are filled in: ~0.9 s at 8 fps


@pytest.mark.parametrize("name", ["mpeg4", "vp9"])
def test_other_codecs_are_converted(built, name):
    meta = built.samples[name]
    assert (meta["width"], meta["height"]) == (48, 32) and meta["num_frames"] == 8


def test_huge_resolution_is_scaled_down(built):
    assert (built.samples["huge"]["width"], built.samples["huge"]["height"]) == (64, 32)


def test_path_with_spaces_quotes_and_unicode_is_converted(built):
    meta = built.samples[ODD_NAME]
    assert meta["source"].endswith(f"{ODD_NAME}.mp4") and meta["has_audio"]


def test_duplicate_ids_keep_one_and_report_the_other(built):
    assert "dup" in built.samples
    assert [f["reason"] for f in built.failures if "dup." in f["source"]] == ["duplicate_id"]


def test_empty_and_malformed_caption_files_give_no_captions(built):
    assert built.samples["cap_empty"]["captions"] == []
    assert built.samples["cap_malformed"]["captions"] == []


def test_latin1_captions_are_decoded(built):
    assert [c["text"] for c in built.samples["cap_latin1"]["captions"]] == ["café crème"]


def test_unusable_caption_sidecars_are_recorded_and_the_video_kept(built):
    kept = {os.path.basename(f["source"]): f for f in built.failures if f.get("kept")}
    bad = {"cap_empty.mp4", "cap_malformed.mp4", "cap_malformed_vtt.mp4"}
    assert {name for name, f in kept.items() if f["reason"] == "bad_captions"} == bad  # Latin-1 is not bad
    assert all("kept without those captions" in kept[name]["detail"] for name in bad)
    assert {"cap_empty", "cap_malformed", "cap_malformed_vtt"} <= set(built.samples)
    assert built.summary.kept.get("bad_captions") == 3 and "bad_captions" not in built.summary.failed
    assert "kept         3 converted despite a problem (bad_captions 3)" in built.summary.format()


def test_caption_times_outside_the_video_are_dropped_or_clipped(built):
    captions = built.samples["cap_outside"]["captions"]
    assert captions == [{"start": 0.5, "end": pytest.approx(1.0), "text": "spans"}]


def test_every_input_is_counted(built):
    failed = sum(built.summary.failed.values())
    skipped = [f for f in built.failures if not f.get("kept")]  # kept rows list converted inputs (bad_captions)
    assert failed == len(skipped) and built.summary.samples == len(built.samples)
    assert built.summary.inputs == failed + len(built.samples)  # nothing dropped silently
    by_reason: dict[str, int] = {}
    for f in skipped:
        by_reason[f["reason"]] = by_reason.get(f["reason"], 0) + 1
    assert by_reason == built.summary.failed
    assert len(built.failures) - len(skipped) == sum(built.summary.kept.values())


def test_nothing_half_written_is_left(built):
    assert not [p for p in built.out.rglob("*") if p.name.endswith(".tmp")]


# ---- manifests --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("manifest")
    _video(d / "a.mp4")
    _video(d / "b.mp4", audio=False)
    return d


def test_manifest_row_with_missing_file_is_reported(manifest_dir, tmp_path):
    (manifest_dir / "manifest.csv").write_text("id,path,label\na,a.mp4,x\ngone,missing.mp4,y\nb,b.mp4,z\n")
    summary = build_dataset(manifest_dir / "manifest.csv", tmp_path / "out", **OPTS)
    failures = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert [f["reason"] for f in failures] == ["missing_file"] and "missing.mp4" in f"{failures}"
    assert summary.samples == 2 and summary.failed == {"missing_file": 1}


def test_manifest_duplicate_ids_are_reported(manifest_dir, tmp_path):
    (manifest_dir / "dups.csv").write_text("id,path\na,a.mp4\na,b.mp4\n")
    summary = build_dataset(manifest_dir / "dups.csv", tmp_path / "out", **OPTS)
    assert summary.samples == 1 and summary.failed == {"duplicate_id": 1}


def test_unknown_manifest_column_fails_before_any_work(manifest_dir, tmp_path):
    (manifest_dir / "typo.csv").write_text("id,path,lable\na,a.mp4,x\n")
    with pytest.raises(ValueError, match="lable"):
        build_dataset(manifest_dir / "typo.csv", tmp_path / "out", **OPTS)
    assert not (tmp_path / "out").exists()


# ---- a killed build resumes to the same bytes -----------------------------------------------------------------


def test_killed_build_resumes_to_identical_shards(manifest_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        _video(corpus / f"v{i}.mp4", f"testsrc=size=48x32:rate=10:duration={1 + i % 2}")
    args = ["data", "build", str(corpus), "--fps", "8", "--short-side", "32", "--samples-per-shard", "1"]
    cmd = [sys.executable, "-m", "launch.cli", *args, "--workers", "1"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*cmd, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while not (killed / "stats" / "000000.json").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # the parent only: its pool workers must not outlive it
        proc.wait(timeout=30)
        assert not (killed / "dataset.json").exists(), "the build finished before it could be killed"
        assert _group_gone(proc.pid, within=20.0), "worker processes outlived the killed build"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run([*cmd, "--out", str(killed)], check=True, timeout=120, capture_output=True)
    clean = tmp_path / "clean"
    subprocess.run([*cmd, "--out", str(clean)], check=True, timeout=120, capture_output=True)
    names = sorted(p.name for p in (clean / "shards").iterdir())
    assert names == sorted(p.name for p in (killed / "shards").iterdir()) and len(names) == 6
    for name in names:
        assert (killed / "shards" / name).read_bytes() == (clean / "shards" / name).read_bytes(), name
    assert not [p for p in killed.rglob("*.tmp")]


def _group_gone(pgid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


# ---- a worker process dying (a decoder segfault) costs one input, not the build ---------------------------------


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="patches the worker code through fork")
@pytest.mark.parametrize("stage", ["probe_media", "transcode_chunk"])
def test_worker_crash_skips_only_that_input(manifest_dir, tmp_path, monkeypatch, stage):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(manifest_dir / name, d / name)
    real = getattr(media, stage)

    def crash_on_a(path, *args, **kwargs):
        if path.endswith("a.mp4"):
            os.kill(os.getpid(), signal.SIGKILL)  # dies like a segfault would, without a faulthandler dump
        return real(path, *args, **kwargs)

    monkeypatch.setattr(media, stage, crash_on_a)
    summary = build_dataset(d, tmp_path / "out", **OPTS)
    assert summary.failed == {"worker_crashed": 1} and summary.samples == 1 and summary.complete
    failure = json.loads((tmp_path / "out" / "failures.jsonl").read_text())
    assert failure["source"].endswith("a.mp4") and failure["reason"] == "worker_crashed"


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="patches the worker code through fork")
def test_hanging_probe_times_out(manifest_dir, tmp_path, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(manifest_dir / name, d / name)
    real = media.probe_media

    def hang_on_a(path):
        if path.endswith("a.mp4"):
            time.sleep(60)
        return real(path)

    monkeypatch.setattr(media, "probe_media", hang_on_a)
    t0 = time.monotonic()
    summary = build_dataset(d, tmp_path / "out", **{**OPTS, "timeout": 2.0})
    assert time.monotonic() - t0 < 30 and summary.failed == {"probe_timeout": 1} and summary.samples == 1


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="patches the worker code through fork")
def test_broken_audio_track_keeps_the_video(manifest_dir, tmp_path, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(manifest_dir / "a.mp4", d / "a.mp4")
    real = media.transcode_chunk

    def audio_fails(path, *args, has_audio, **kwargs):
        if has_audio:
            raise media.MediaError(media.TRANSCODE_FAILED, "ffmpeg exit 1: error decoding audio")
        return real(path, *args, has_audio=has_audio, **kwargs)

    monkeypatch.setattr(media, "transcode_chunk", audio_fails)
    summary = build_dataset(d, tmp_path / "out", **OPTS)
    assert summary.samples == 1 and summary.failed == {}
    assert Built(tmp_path / "out", summary).samples["a"]["has_audio"] is False


# ---- audio and video streams that start at different times -----------------------------------------------------


def _offset_corpus(d: Path) -> Path:
    """late.mp4: 3 s of video, a 440 Hz tone from 1 s (audio delayed with -itsoffset); early.mp4: the audio
    starts 1 s before the video (video delayed), silent until 2 s, so the tone starts 1 s into the video."""
    d.mkdir()
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=48x32:rate=10:duration=3", "-pix_fmt", "yuv420p", str(d / "v.mp4"))
    _ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:sample_rate=16000:duration=2", "-c:a", "aac", str(d / "a.m4a"))
    tone_from_2s = "aevalsrc=0.125*gte(t\\,2)*sin(2*PI*440*t):s=16000:d=4"
    _ffmpeg("-f", "lavfi", "-i", tone_from_2s, "-c:a", "aac", str(d / "b.m4a"))
    mux = ["-map", "0:v", "-map", "1:a", "-c", "copy"]
    _ffmpeg("-i", str(d / "v.mp4"), "-itsoffset", "1.0", "-i", str(d / "a.m4a"), *mux, str(d / "late.mp4"))
    _ffmpeg("-itsoffset", "1.0", "-i", str(d / "v.mp4"), "-i", str(d / "b.m4a"), *mux, str(d / "early.mp4"))
    for name in ("v.mp4", "a.m4a", "b.m4a"):
        (d / name).unlink()
    return d


def _audio(built: Built, vid: str):
    import soundfile

    key = f"{built.samples[vid]['idx']:09d}"
    for shard in (built.out / "shards").glob("*.tar"):
        with tarfile.open(shard) as tar:
            if f"{key}.flac" in tar.getnames():
                audio, rate = soundfile.read(tar.extractfile(f"{key}.flac"), dtype="float32")
                onset = int((abs(audio) > 0.02).argmax())
                return len(audio) / rate, onset / rate
    return None


@pytest.fixture(scope="module")
def offsets(tmp_path_factory):
    root = tmp_path_factory.mktemp("offsets")
    corpus = _offset_corpus(root / "videos")
    return Built(root / "dataset", build_dataset(corpus, root / "dataset", **OPTS))


def test_audio_starting_after_the_video_is_padded_not_shifted(offsets):
    seconds, onset = _audio(offsets, "late")
    assert seconds == pytest.approx(3.0, abs=0.02) and onset == pytest.approx(1.0, abs=0.03)
    assert offsets.samples["late"]["duration"] == pytest.approx(3.0) and offsets.failures == []


def test_audio_starting_before_the_video_is_cut_to_the_first_frame(offsets):
    sample = offsets.samples["early"]
    assert sample["start"] == pytest.approx(1.0) and sample["duration"] == pytest.approx(3.0)
    seconds, onset = _audio(offsets, "early")
    assert seconds == pytest.approx(3.0, abs=0.02) and onset == pytest.approx(1.0, abs=0.03)


def test_offset_streams_pass_inspect_with_decoding(offsets):
    from data_prep.inspect import inspect_dataset

    report = inspect_dataset(offsets.out, decode=2)
    assert report.ok and report.decoded == 2, report.errors


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="patches the worker code through fork")
def test_audio_shorter_than_its_video_is_dropped_and_recorded_old_filter_patched(offsets, tmp_path, monkeypatch):
    d = tmp_path / "in"
    d.mkdir()
    shutil.copy(offsets.out.parent / "videos" / "late.mp4", d / "late.mp4")
    real = media.ffmpeg_argv

    def pad_end_only(*args, **kwargs):  # the filter before the fix: delayed audio comes out early and short
        return ["apad" if a.startswith("aresample=") else a for a in real(*args, **kwargs)]

    monkeypatch.setattr(media, "ffmpeg_argv", pad_end_only)
    summary = build_dataset(d, tmp_path / "out", **OPTS)
    built = Built(tmp_path / "out", summary)
    assert summary.samples == 1 and summary.failed == {} and summary.kept == {"audio_misaligned": 1}
    assert built.samples["late"]["has_audio"] is False and built.members[f"{built.samples['late']['idx']:09d}"] == [
        "json",
        "mp4",
    ]
    (row,) = built.failures
    assert row["reason"] == "audio_misaligned" and row["kept"] is True and "kept without audio" in row["detail"]
