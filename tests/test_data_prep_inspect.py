"""inspect_dataset accepts a good dataset (and so does plain WebDataset) and names what is wrong with a bad one."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest
import webdataset as wds

from data_prep.inspect import inspect_dataset
from data_prep.shards import write_shard


@pytest.fixture
def copy(tiny_dataset, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(tiny_dataset, out)
    return out


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _rewrite(path, members: dict[str, bytes]) -> None:
    samples: dict[str, dict[str, bytes]] = {}
    for name, data in members.items():
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = data
    write_shard(str(path), samples.items())


def test_good_dataset_is_valid_and_decodes(tiny_dataset):
    report = inspect_dataset(tiny_dataset, decode=3)
    assert report.ok, report.errors
    assert (report.shards, report.samples, report.decoded, report.with_audio) == (4, 8, 3, 8)
    assert report.seconds == pytest.approx(32.0, abs=0.5)
    assert "OK" in report.format()


def test_shards_open_with_plain_webdataset(tiny_dataset):
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    urls = [str(tiny_dataset / "shards" / s["name"]) for s in meta["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(8)]
    assert all({"mp4", "json", "flac"} <= set(s) for s in samples)
    assert json.loads(samples[3]["json"])["idx"] == 3


def test_missing_dataset_json(tmp_path):
    report = inspect_dataset(tmp_path)
    assert not report.ok and "dataset.json" in report.errors[0]


def test_wrong_format_version(copy):
    meta = json.loads((copy / "dataset.json").read_text())
    (copy / "dataset.json").write_text(json.dumps({**meta, "version": 2}))
    assert "format/version" in inspect_dataset(copy).errors[0]


def test_missing_shard(copy):
    (copy / "shards" / "000002.tar").unlink()
    errors = inspect_dataset(copy, decode=0).errors
    assert any("000002.tar: listed in dataset.json but missing" in e for e in errors)


def test_truncated_shard(copy):
    path = copy / "shards" / "000001.tar"
    path.write_bytes(path.read_bytes()[:700])
    errors = inspect_dataset(copy, decode=0).errors
    assert any(e.startswith("000001.tar") for e in errors)


def test_sample_count_mismatch(copy):
    meta = json.loads((copy / "dataset.json").read_text())
    meta["shards"][0]["samples"] = 3
    (copy / "dataset.json").write_text(json.dumps(meta))
    assert any("000000.tar: 2 samples, dataset.json says 3" in e for e in inspect_dataset(copy, decode=0).errors)


def test_missing_audio_member_when_has_audio(copy):
    path = copy / "shards" / "000000.tar"
    members = {k: v for k, v in _members(path).items() if k != "000000001.flac"}
    _rewrite(path, members)
    assert any("000000001: has_audio is true" in e for e in inspect_dataset(copy, decode=0).errors)


def test_bad_json_field(copy):
    path = copy / "shards" / "000000.tar"
    members = _members(path)
    meta = json.loads(members["000000000.json"])
    members["000000000.json"] = json.dumps({**meta, "num_frames": "many"}).encode()
    _rewrite(path, members)
    assert any("num_frames='many' has the wrong type" in e for e in inspect_dataset(copy, decode=0).errors)


def test_duplicate_key_across_shards(copy):
    a, b = copy / "shards" / "000000.tar", copy / "shards" / "000001.tar"
    members = _members(b)
    members.update({k: v for k, v in _members(a).items() if k.startswith("000000000.")})
    _rewrite(b, members)
    meta = json.loads((copy / "dataset.json").read_text())
    meta["shards"][1]["samples"] = 3
    meta["samples"] = 9
    (copy / "dataset.json").write_text(json.dumps(meta))
    assert any("key appears in more than one shard" in e for e in inspect_dataset(copy, decode=0).errors)


def test_decode_catches_a_lying_frame_count(copy):
    path = copy / "shards" / "000000.tar"
    members = _members(path)
    meta = json.loads(members["000000000.json"])
    members["000000000.json"] = json.dumps({**meta, "num_frames": meta["num_frames"] + 5}).encode()
    _rewrite(path, members)
    assert inspect_dataset(copy, decode=0).ok  # structure alone cannot tell
    assert any("frames, json says" in e for e in inspect_dataset(copy, decode=1).errors)


def test_decode_catches_a_broken_video(copy):
    path = copy / "shards" / "000000.tar"
    members = _members(path)
    members["000000000.mp4"] = members["000000000.mp4"][:300]
    _rewrite(path, members)
    errors = inspect_dataset(copy, decode=1).errors
    assert any(e.startswith("000000.tar:000000000.mp4") for e in errors)


def test_decode_catches_short_audio(copy):
    import soundfile

    path = copy / "shards" / "000000.tar"
    members = _members(path)
    audio, rate = soundfile.read(io.BytesIO(members["000000000.flac"]), dtype="int16")
    buf = io.BytesIO()
    soundfile.write(buf, audio[: len(audio) // 2], rate, format="FLAC")
    members["000000000.flac"] = buf.getvalue()
    _rewrite(path, members)
    assert any("s of audio for" in e for e in inspect_dataset(copy, decode=1).errors)


def test_sample_json_that_is_not_an_object_is_reported_not_raised(copy):
    path = copy / "shards" / "000001.tar"
    members = _members(path)
    members["000000002.json"] = b"5"
    _rewrite(path, members)
    report = inspect_dataset(copy, decode=0)
    assert any(e.startswith("000001.tar:000000002.json: expected a JSON object, got int") for e in report.errors)
    assert report.samples == 7


def test_caption_with_a_string_time_is_reported_not_raised(copy):
    path = copy / "shards" / "000000.tar"
    members = _members(path)
    meta = json.loads(members["000000001.json"])
    members["000000001.json"] = json.dumps({**meta, "captions": [{"start": "0.5", "end": 1.0, "text": "hi"}]}).encode()
    _rewrite(path, members)
    errors = inspect_dataset(copy, decode=0).errors
    assert any("000000001: bad caption {'start': '0.5'" in e for e in errors), errors


def test_malformed_dataset_json_shard_entry_is_reported(copy):
    meta = json.loads((copy / "dataset.json").read_text())
    meta["shards"][1] = "000001.tar"
    (copy / "dataset.json").write_text(json.dumps(meta))
    assert "shard entries need a name" in inspect_dataset(copy).errors[0]


def test_decode_spreads_over_every_shard(copy):
    path = copy / "shards" / "000003.tar"  # the last shard: decoding "the first N" samples never reached it
    members = _members(path)
    members["000000006.mp4"] = members["000000006.mp4"][:300]
    _rewrite(path, members)
    report = inspect_dataset(copy, decode=4)  # positions 0, 2, 4, 6 of 8: the first sample of each shard
    undecodable = [e for e in report.errors if "decord cannot decode" in e]
    assert report.decoded == 3 and len(undecodable) == 1 and undecodable[0].startswith("000003.tar:000000006.mp4")
    assert inspect_dataset(copy, decode=4).errors == report.errors  # deterministic
    assert inspect_dataset(copy, decode=100).decoded == 7  # asked for more than there are: all but the broken one


def test_decode_reports_a_video_stream_that_starts_late(copy, tmp_path):
    """A sample as older builds wrote it from a source whose first frames did not decode: the mp4's video starts
    at 1.12 s, so every decoder's frame 0 comes 1.12 s after audio sample 0. Decoding alone cannot tell."""
    import subprocess

    import imageio_ffmpeg

    path = copy / "shards" / "000000.tar"
    members = _members(path)
    (tmp_path / "clip.mp4").write_bytes(members["000000000.mp4"])
    argv = [
        imageio_ffmpeg.get_ffmpeg_exe(),
        "-loglevel",
        "error",
        "-itsoffset",
        "1.12",
        "-i",
        str(tmp_path / "clip.mp4"),
    ]
    subprocess.run([*argv, "-c", "copy", str(tmp_path / "late.mp4")], check=True, timeout=60)
    members["000000000.mp4"] = (tmp_path / "late.mp4").read_bytes()
    _rewrite(path, members)
    report = inspect_dataset(copy, decode=1)
    assert report.decoded == 1  # decord and PyAV decode it (PyAV counts frames from the stream's first)
    (late,) = [e for e in report.errors if "starts at" in e]
    assert late.startswith("000000.tar:000000000.mp4: the video stream starts at 1.120 s")
    assert "lead the picture by 1.120 s" in late and "rebuild" in late
