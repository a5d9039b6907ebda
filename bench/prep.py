"""Data-prep throughput: `build_dataset` vs plain ffmpeg with the same settings, measured in the same run.

Prints source-seconds per second per worker for (a) a plain sequential ffmpeg loop running exactly the
argv `build_dataset` uses (the ceiling: the videos are probed before its clock starts, and it writes no
tar and runs no Python per chunk), (b) `build_dataset` with 1 worker (its clock includes probing, planning,
measuring the output and writing shards) and (c) with 2 workers; then (b)/(a) (target >= 0.8) and (c)/(b)
(scaling from 1 to 2 workers).

    .venv/bin/python bench/prep.py [--videos 8 --seconds 10 --width 320 --height 240]
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import tempfile
import time
from pathlib import Path

from data_prep.build import build_dataset
from data_prep.media import ffmpeg_argv, probe_media
from data_prep.synth import make_synth_corpus

PREP = dict(fps=16.0, short_side=160, sample_rate=16000, audio_format="flac")


def cpu_seconds() -> float:
    """User+system CPU of this process and every finished child (pool workers and their ffmpegs included)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def plain_ffmpeg(videos: list[Path], tmp: Path) -> tuple[float, float, float]:
    """(source seconds, wall seconds, CPU seconds) of transcoding every video once, one ffmpeg at a time.

    Bare ffmpeg: the durations are probed before the clock starts.
    """
    durations = [probe_media(str(path)).duration for path in videos]
    argvs = [
        ffmpeg_argv(str(p), 0.0, d, str(tmp / "v.mp4"), str(tmp / "a.flac"), **PREP) for p, d in zip(videos, durations)
    ]
    t0, c0 = time.perf_counter(), cpu_seconds()
    for argv in argvs:
        subprocess.run(argv, check=True, capture_output=True, timeout=600)
    return sum(durations), time.perf_counter() - t0, cpu_seconds() - c0


def timed_build(corpus: Path, out: Path, workers: int) -> tuple[float, float, float]:
    c0 = cpu_seconds()
    summary = build_dataset(corpus, out, **PREP, max_seconds=30.0, samples_per_shard=4, workers=workers)
    assert summary.samples == summary.chunks, summary.format()
    return summary.source_seconds, summary.elapsed, cpu_seconds() - c0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--height", type=int, default=240)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vatp-bench-prep-") as tmp:
        tmp = Path(tmp)
        make_synth_corpus(
            tmp / "raw", videos=args.videos, seconds=args.seconds, width=args.width, height=args.height, fps=25
        )
        videos = sorted((tmp / "raw" / "videos").glob("*.mp4"))
        load = os.getloadavg()[0]
        plain_ffmpeg(videos[:1], tmp)  # warm the page cache and the binary
        src, wall, cpu = plain_ffmpeg(videos, tmp)
        src1, wall1, cpu1 = timed_build(tmp / "raw", tmp / "ds1", workers=1)
        src2, wall2, cpu2 = timed_build(tmp / "raw", tmp / "ds2", workers=2)
        base, one, two = src / wall, src1 / wall1, src2 / wall2
    print(
        f"corpus: {args.videos} x {args.seconds:g} s, {args.width}x{args.height} @ 25 fps H.264+AAC -> "
        f"{PREP['short_side']} px short side, {PREP['fps']:g} fps, {PREP['audio_format']} {PREP['sample_rate']} Hz"
    )
    print(f"load average at start: {load:.2f} on {os.cpu_count()} cores")
    print(f"plain ffmpeg, 1 process     {base:8.1f} source-s/s")
    print(f"build_dataset, 1 worker     {one:8.1f} source-s/s per worker")
    print(f"build_dataset, 2 workers    {two / 2:8.1f} source-s/s per worker ({two:.1f} total)")
    print(f"ratio build(1) / ffmpeg     {one / base:8.2f}   (target >= 0.8)")
    print(f"scaling 1 -> 2 workers      {two / one:8.2f}x")
    print(
        f"per CPU-second (load-proof) ffmpeg {src / cpu:.1f}, build(1) {src1 / cpu1:.1f}, build(2) {src2 / cpu2:.1f} "
        f"source-s/CPU-s; ratio build(1) / ffmpeg {src1 / cpu1 / (src / cpu):.2f}"
    )


if __name__ == "__main__":
    main()
