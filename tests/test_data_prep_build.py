"""build_dataset on real mp4s: layout, idx/shard assignment, chunking, determinism, resume, parts."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import tarfile
from pathlib import Path

import imageio_ffmpeg
import pytest

from data_prep.build import build_dataset
from data_prep.plan import chunk_bounds

SMALL = dict(fps=8, short_side=32, max_seconds=30.0, sample_rate=16000, samples_per_shard=2, workers=2)


def _ffmpeg(*args: str) -> None:
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    subprocess.run(argv, check=True, timeout=60, capture_output=True)


def _video(path: Path, seconds: float, *extra: str) -> Path:
    _ffmpeg(
        "-f",
        "lavfi",
        "-i",
        f"testsrc=size=48x32:rate=10:duration={seconds}",
        "-f",
        "lavfi",
        "-i",
        f"sine=sample_rate=16000:duration={seconds}",
        "-c:a",
        "aac",
        "-pix_fmt",
        "yuv420p",
        *extra,
        str(path),
    )
    return path


def _samples(out: Path) -> list[dict]:
    metas = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            metas += [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    return metas


def _tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def test_tiny_dataset_layout(tiny_dataset, synth_corpus):
    meta = json.loads((tiny_dataset / "dataset.json").read_text())
    assert (meta["format"], meta["version"], meta["samples"]) == ("vatp-shards", 1, 8)
    assert [s["name"] for s in meta["shards"]] == [f"{i:06d}.tar" for i in range(4)]
    assert all(s["samples"] == 2 for s in meta["shards"])
    assert meta["seconds"] == pytest.approx(sum(s["seconds"] for s in meta["shards"])) == pytest.approx(32.0, abs=0.5)
    assert meta["video"] == {"fps": 10.0, "short_side": 64, "codec": "h264", "color": "bt601-tv"}
    assert meta["audio"] == {"sample_rate": 16000, "format": "flac"}
    assert meta["prep"]["samples_per_shard"] == 2
    assert sorted(p.name for p in (tiny_dataset / "stats").iterdir()) == [f"{i:06d}.json" for i in range(4)]
    stats = json.loads((tiny_dataset / "stats" / "000001.json").read_text())
    assert (stats["inputs"], stats["written"], stats["failed"]) == (2, 2, {})
    assert stats["bytes"] == (tiny_dataset / "shards" / "000001.tar").stat().st_size
    assert (tiny_dataset / "failures.jsonl").read_text() == ""


def test_sample_json_carries_manifest_fields_and_relative_captions(tiny_dataset, synth_corpus):
    with open(synth_corpus / "manifest.csv", newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    samples = _samples(tiny_dataset)
    assert [s["idx"] for s in samples] == list(range(8))  # dense keys, in shard order
    assert [s["id"] for s in samples] == sorted(rows)  # idx follows the sorted source list
    for s in samples:
        assert (s["label"], s["split"]) == (rows[s["id"]]["label"], rows[s["id"]]["split"])
        assert s["start"] == 0.0 and s["has_audio"] and s["sample_rate"] == 16000
        assert s["num_frames"] == pytest.approx(s["duration"] * 10, abs=0.01)
        assert min(s["width"], s["height"]) == 64
        assert all(0 <= c["start"] <= c["end"] <= s["duration"] + 1e-3 for c in s["captions"])


def test_tar_members_are_sorted_with_fixed_metadata(tiny_dataset):
    with tarfile.open(tiny_dataset / "shards" / "000000.tar") as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) == [f"00000000{i}.{e}" for i in (0, 1) for e in ("flac", "json", "mp4")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(946684800, 0, 0, "", 0o444)}


def test_rebuild_is_byte_identical(synth_corpus, tiny_dataset, tmp_path):
    from conftest import TINY_BUILD

    build_dataset(synth_corpus, tmp_path / "again", **TINY_BUILD)
    assert _tar_bytes(tmp_path / "again") == _tar_bytes(tiny_dataset)


def test_parts_build_disjoint_shards_and_the_last_part_finalizes(synth_corpus, tiny_dataset, tmp_path):
    from conftest import TINY_BUILD

    out = tmp_path / "parts"
    first = build_dataset(synth_corpus, out, **TINY_BUILD, num_parts=2, part=1)
    assert (first.shards_written, first.complete) == (2, False)
    assert sorted(_tar_bytes(out)) == ["000001.tar", "000003.tar"] and not (out / "dataset.json").exists()
    second = build_dataset(synth_corpus, out, **TINY_BUILD, num_parts=2, part=0)
    assert (second.shards_written, second.complete) == (2, True)
    assert _tar_bytes(out) == _tar_bytes(tiny_dataset)
    shards = [json.loads((d / "dataset.json").read_text())["shards"] for d in (out, tiny_dataset)]
    assert shards[0] == shards[1]


def test_rerun_skips_done_shards_and_redoes_missing_ones(synth_corpus, tiny_dataset, tmp_path):
    from conftest import TINY_BUILD

    out = tmp_path / "copy"
    shutil.copytree(tiny_dataset, out)
    summary = build_dataset(synth_corpus, out, **TINY_BUILD)
    assert (summary.shards_written, summary.shards_skipped, summary.samples) == (0, 4, 0)
    (out / "shards" / "000002.tar").unlink()
    (out / "shards" / "000003.tar.tmp").write_bytes(b"half a tar from a crash")
    summary = build_dataset(synth_corpus, out, **TINY_BUILD)
    assert (summary.shards_written, summary.shards_skipped, summary.complete) == (1, 3, True)
    assert _tar_bytes(out) == _tar_bytes(tiny_dataset)
    assert not list(out.rglob("*.tmp"))


def test_rerun_with_other_options_is_refused(synth_corpus, tiny_dataset, tmp_path):
    from conftest import TINY_BUILD

    out = tmp_path / "copy"
    shutil.copytree(tiny_dataset, out)
    with pytest.raises(ValueError, match="short_side 64 -> 96"):
        build_dataset(synth_corpus, out, **{**TINY_BUILD, "short_side": 96})


@pytest.mark.parametrize(
    "bad", [{"fps": 0}, {"short_side": 33}, {"max_seconds": -1}, {"audio_format": "mp3"}, {"samples_per_shard": 0}]
)
def test_bad_options_are_value_errors(synth_corpus, tmp_path, bad):
    with pytest.raises(ValueError, match=str(next(iter(bad.values())))):
        build_dataset(synth_corpus, tmp_path / "out", **{**SMALL, **bad})


def test_bad_part_is_a_value_error(synth_corpus, tmp_path):
    with pytest.raises(ValueError, match="part 2 of 2"):
        build_dataset(synth_corpus, tmp_path / "out", **SMALL, num_parts=2, part=2)


def test_chunk_bounds_cut_and_merge_a_tiny_tail():
    assert chunk_bounds(0.0, 10.0, 30.0) == [(0.0, 10.0)]
    assert chunk_bounds(0.0, 70.0, 30.0) == [(0.0, 30.0), (30.0, 30.0), (60.0, 10.0)]
    assert chunk_bounds(0.0, 65.0, 30.0) == [(0.0, 30.0), (30.0, 35.0)]  # 5 s tail < 30/4: merged
    assert chunk_bounds(0.0, 61.0, 30.0) == [(0.0, 30.0), (30.0, 31.0)]  # 1 s tail < 30/4: merged
    assert chunk_bounds(5.0, 11.5, 3.0) == [(5.0, 3.0), (8.0, 3.5)]
    assert chunk_bounds(5.0, 12.0, 3.0) == [(5.0, 3.0), (8.0, 3.0), (11.0, 1.0)]


def test_long_video_is_chunked_with_retimed_captions_and_manifest_bounds(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _video(d / "long.mp4", 4)
    _video(d / "short.mp4", 3)
    (d / "long.srt").write_text("1\n00:00:00,500 --> 00:00:01,000\nfirst\n\n2\n00:00:01,800 --> 00:00:02,600\nacross\n")
    (d / "manifest.csv").write_text("id,path,start,end\nlong,long.mp4,,\nshort,short.mp4,1.0,2.5\n")
    summary = build_dataset(d / "manifest.csv", tmp_path / "out", **{**SMALL, "max_seconds": 2.0})
    samples = _samples(tmp_path / "out")
    got = [(s["id"], s["idx"], s["start"], s["duration"], s["num_frames"]) for s in samples]
    assert got == [("long", 0, 0.0, 2.0, 16), ("long", 1, 2.0, 2.0, 16), ("short", 2, 1.0, 1.5, 12)]
    assert samples[0]["captions"] == [
        {"start": 0.5, "end": 1.0, "text": "first"},
        {"start": 1.8, "end": 2.0, "text": "across"},
    ]
    assert samples[1]["captions"] == [{"start": 0.0, "end": pytest.approx(0.6), "text": "across"}]
    assert summary.chunks == 3 and summary.source_seconds == pytest.approx(5.5)


def test_failed_chunk_leaves_an_idx_gap_and_is_recorded_in_its_shard(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    whole = _video(d / "whole.mp4", 4, "-movflags", "+faststart").read_bytes()
    (d / "a_cut.mp4").write_bytes(whole[: len(whole) // 2])  # header says 4 s, the data stops early
    (d / "whole.mp4").unlink()
    _video(d / "b_good.mp4", 1)
    summary = build_dataset(d, tmp_path / "out", **{**SMALL, "max_seconds": 1.0})
    idx = {s["id"]: [] for s in _samples(tmp_path / "out")}
    for s in _samples(tmp_path / "out"):
        idx[s["id"]].append(s["idx"])
    assert summary.chunks == 5 and idx["b_good"] == [4]  # planned before transcoding: failures shift nothing
    assert 3 not in idx.get("a_cut", []) and summary.failed.get("no_frames", 0) >= 1
    stats = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "stats").iterdir())]
    assert sum(len(st["failures"]) for st in stats) == sum(summary.failed.values())
    failures = (tmp_path / "out" / "failures.jsonl").read_text().splitlines()
    assert len(failures) == sum(summary.failed.values()) and all("a_cut.mp4" in line for line in failures)


def test_plan_json_probes_are_authoritative(synth_corpus, tiny_dataset, tmp_path):
    from conftest import TINY_BUILD

    out = tmp_path / "replan"
    out.mkdir()
    plan = json.loads((tiny_dataset / "plan.json").read_text())
    plan["probes"][0] = {"reason": "unreadable", "detail": "as another part saw it"}
    (out / "plan.json").write_text(json.dumps(plan))
    summary = build_dataset(synth_corpus, out, **TINY_BUILD)
    assert summary.chunks == 7 and summary.failed == {"unreadable": 1}  # not re-probed


def test_first_published_plan_wins(tmp_path):
    from data_prep.plan import _publish_plan, _sources_digest
    from data_prep.sources import SourceItem

    items = [SourceItem("a", "/x/a.mp4")]
    prep = dict(
        fps=8.0,
        short_side=32,
        max_seconds=30.0,
        sample_rate=16000,
        audio_format="flac",
        samples_per_shard=2,
        timeout=60.0,
    )
    first = [{"duration": 1.0, "has_audio": False}]
    assert _publish_plan(tmp_path, items, first, prep) == first
    assert _publish_plan(tmp_path, items, [{"reason": "probe_timeout", "detail": ""}], prep) == first
    assert json.loads((tmp_path / "plan.json").read_text())["digest"] == _sources_digest(items, prep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]


@pytest.mark.parametrize("reason", ["probe_timeout", "worker_crashed"])
def test_transient_probe_failure_is_retried_while_no_shard_exists(synth_corpus, tiny_dataset, tmp_path, reason):
    from conftest import TINY_BUILD

    out = tmp_path / "retry"
    out.mkdir()
    plan = json.loads((tiny_dataset / "plan.json").read_text())
    good = plan["probes"][0]
    plan["probes"][0] = {"reason": reason, "detail": "an earlier run lost it"}
    (out / "plan.json").write_text(json.dumps(plan))
    summary = build_dataset(synth_corpus, out, **TINY_BUILD)
    assert summary.chunks == 8 and summary.failed == {} and summary.samples == 8
    assert json.loads((out / "plan.json").read_text())["probes"][0] == good  # the plan now says so too
    assert [s["idx"] for s in _samples(out)] == list(range(8))


def test_transient_probe_failure_is_kept_once_a_shard_exists(synth_corpus, tiny_dataset, tmp_path):
    from conftest import TINY_BUILD

    out = tmp_path / "kept"
    (out / "shards").mkdir(parents=True)
    shutil.copy(tiny_dataset / "shards" / "000000.tar", out / "shards" / "000000.tar")  # an idx is on disk
    plan = json.loads((tiny_dataset / "plan.json").read_text())
    plan["probes"][0] = {"reason": "probe_timeout", "detail": "an earlier run lost it"}
    (out / "plan.json").write_text(json.dumps(plan))
    summary = build_dataset(synth_corpus, out, **TINY_BUILD)
    assert summary.chunks == 7 and summary.failed == {"probe_timeout": 1}  # retrying would move every idx
    assert json.loads((out / "plan.json").read_text())["probes"][0]["reason"] == "probe_timeout"


def test_chunk_audio_is_cut_to_its_video_or_dropped_when_short():
    import io

    import numpy as np
    import soundfile

    from data_prep import media
    from data_prep.build import _aligned_audio

    def flac(seconds: float) -> bytes:
        buf = io.BytesIO()
        soundfile.write(buf, np.ones(int(seconds * 16000), dtype=np.int16), 16000, format="FLAC")
        return buf.getvalue()

    def chunk(audio_seconds: float) -> media.ChunkMedia:  # 16 frames at 8 fps: 2 s of video
        return media.ChunkMedia(b"mp4", flac(audio_seconds), 8.0, 16, 32, 32, audio_seconds)

    longer = _aligned_audio(chunk(3.0), "chunk idx 0 at 0 s", "flac")  # the video data ended early
    assert soundfile.info(io.BytesIO(longer.audio)).frames == 32000 and longer.dropped is None
    assert _aligned_audio(chunk(2.1), "", "flac").audio == flac(2.1)  # within tolerance: untouched
    short = _aligned_audio(chunk(1.0), "chunk idx 0 at 0 s", "flac")
    assert short.audio is None and short.dropped[0] == "audio_misaligned" and "1.000 s of audio" in short.dropped[1]


def test_the_output_lock_refuses_a_second_writer_and_lets_job_array_parts_share(tmp_path):
    from pipeline.files import output_lock

    out = tmp_path / "new" / "ds"
    held = f"{out} is being written by another vatp process (pid {os.getpid()}): wait for it or choose another --out"
    with output_lock(out):
        assert (out / ".lock").read_text().strip() == str(os.getpid())
        for part in (None, 0):
            with pytest.raises(ValueError, match=re.escape(held)):
                with output_lock(out, part=part):
                    pass
    assert (out / ".lock").read_text() == ""  # released, and no pid left behind
    with output_lock(out, part=0), output_lock(out, part=1):  # two parts of a job array at once
        with pytest.raises(ValueError, match=re.escape(held)):  # a whole build meanwhile
            with output_lock(out):
                pass
        with pytest.raises(ValueError, match=re.escape(held)):  # the same part twice
            with output_lock(out, part=1):
                pass
    with output_lock(out):  # every lock went with its holder
        pass


@pytest.mark.timeout(300)
def test_two_builds_into_one_folder_at_once_the_second_is_refused_the_first_finishes(
    synth_corpus, tiny_dataset, tmp_path
):
    """Two real `vatp data build` processes: the second finds the output locked (the first is held still while it
    tries), exits 2 with one line naming the first's pid, and the first's dataset is the one a lone build makes."""
    import signal
    import sys
    import time

    from conftest import TINY_BUILD

    out = tmp_path / "ds"
    cmd = [sys.executable, "-m", "launch.cli", "data", "build", str(synth_corpus), "--out", str(out)]
    cmd += [a for k, v in TINY_BUILD.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    first = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        t0 = time.monotonic()
        while not ((out / ".lock").is_file() and (out / ".lock").read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()[0].decode()
            assert time.monotonic() - t0 < 120, "the first build never took the lock"
            time.sleep(0.02)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    output = first.communicate(timeout=240)[0].decode()
    assert second.returncode == 2 and first.returncode == 0, output
    assert second.stderr.decode().strip().splitlines()[-1] == (
        f"vatp data build: error: {out} is being written by another vatp process (pid {first.pid}): "
        "wait for it or choose another --out"
    )
    assert _tar_bytes(out) == _tar_bytes(tiny_dataset)
    shards = [json.loads((d / "dataset.json").read_text())["shards"] for d in (out, tiny_dataset)]
    assert shards[0] == shards[1]
