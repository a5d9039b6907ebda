"""`vatp data build`: sources -> probed plan -> canonical chunks (parallel ffmpeg) -> deterministic shards.

The work is planned before anything is transcoded: sources are sorted, probed, cut into chunks, and
every chunk gets its `idx` and its shard from its position in that list. So keys and shard contents
never depend on worker timing or on which chunks fail (a failed chunk leaves a gap in `idx`), a
re-run skips finished shards, and parts of a job array split the shards by `shard % P == I`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from tqdm import tqdm

from data_prep import media
from data_prep.captions import clip_captions
from data_prep.plan import WORKER_CRASHED, Chunk, Plan, make_plan
from data_prep.pool import CrashSafePool
from data_prep.readers import read_sources
from data_prep.shards import encode_sample_json, write_shard
from data_prep.sources import Failure, SourceItem
from pipeline.dataset import (
    AUDIO_MEMBERS,
    DATASET_JSON,
    FAILURES_JSONL,
    SHARDS_DIR,
    STATS_DIR,
    dataset_json,
    sample_key,
    shard_name,
    stats_name,
)
from pipeline.files import atomic_write, output_lock, stale_temporaries, write_json_atomic

log = logging.getLogger(__name__)

AUDIO_FORMATS = AUDIO_MEMBERS
AUDIO_MISALIGNED = "audio_misaligned"  # kept: the chunk's audio did not cover its video, so it was dropped
BAD_AUDIO = "bad_audio"  # kept: the audio track failed to transcode, so the chunk has none
AUDIO_TOLERANCE_S = 0.1  # |audio - video| seconds allowed, + 1.5 frames (the video ends on a frame boundary)


@dataclass
class BuildSummary:
    """What one `build_dataset` call did (this part only) and whether the dataset is now complete."""

    out_dir: str
    inputs: int = 0
    chunks: int = 0
    samples: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    kept: dict[str, int] = field(default_factory=dict)  # converted despite a problem, by reason
    seconds: float = 0.0
    source_seconds: float = 0.0
    shards_written: int = 0
    shards_skipped: int = 0
    shards_total: int = 0
    part: int = 0
    num_parts: int = 1
    elapsed: float = 0.0
    complete: bool = False

    def format(self) -> str:
        """The one-screen summary the CLI prints."""
        rate = self.source_seconds / self.elapsed if self.elapsed > 0 else 0.0
        failed = ", ".join(f"{k} {v}" for k, v in sorted(self.failed.items())) or "none"
        kept = ", ".join(f"{k} {v}" for k, v in sorted(self.kept.items())) or "none"
        lines = [
            f"dataset      {self.out_dir}" + ("" if self.complete else "  (incomplete: other parts pending)"),
            f"part         {self.part} of {self.num_parts}",
            f"inputs       {self.inputs} sources, {self.chunks} chunks planned",
            f"samples      {self.samples} written this run, {self.seconds / 3600:.3f} h of video",
            f"failed       {sum(self.failed.values())} ({failed})",
            f"kept         {sum(self.kept.values())} converted despite a problem ({kept})",
            f"shards       {self.shards_written} written, {self.shards_skipped} already done, "
            f"{self.shards_total} in the dataset",
            f"throughput   {rate:.1f} source-seconds/s",
            f"elapsed      {self.elapsed:.1f} s",
        ]
        return "\n".join(lines)


def build_dataset(
    input: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    fmt: str = "auto",
    videos_root: str | os.PathLike | None = None,
    fps: float = 16.0,
    short_side: int = 160,
    max_seconds: float = 30.0,
    sample_rate: int = 16000,
    audio_format: str = "flac",
    samples_per_shard: int = 64,
    workers: int | None = None,
    num_parts: int = 1,
    part: int = 0,
    split: str | None = None,
    timeout: float = 120.0,
) -> BuildSummary:
    """Build (or resume) the dataset at `out_dir` from the videos described by `input` (see docs/data-prep.md)."""
    prep = _check_options(fps, short_side, max_seconds, sample_rate, audio_format, samples_per_shard, timeout)
    if num_parts < 1 or not 0 <= part < num_parts:
        raise ValueError(f"part {part} of {num_parts}: need num_parts >= 1 and 0 <= part < num_parts")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    sources = read_sources(input, fmt, split=split, videos=videos_root)
    if not sources.items and not sources.failures:
        raise ValueError(f"no videos found in {input} (format {fmt!r}{f', split {split!r}' if split else ''})")
    if stale := media.sweep_stale_temp():
        log.info("removed %d temporary folder(s) left by killed workers", stale)
    with output_lock(out, part=part if num_parts > 1 else None):
        (out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        (out / STATS_DIR).mkdir(exist_ok=True)
        pool = CrashSafePool(workers)
        try:
            plan = make_plan(pool, sources, out, prep, may_reprobe=num_parts == 1)
            n_shards = -(-len(plan.chunks) // samples_per_shard)
            mine = [s for s in range(n_shards) if s % num_parts == part]
            todo = [s for s in mine if not _shard_done(out, s)]
            summary = BuildSummary(
                str(out), inputs=plan.inputs, chunks=len(plan.chunks), part=part, num_parts=num_parts
            )
            summary.shards_total, summary.shards_skipped = n_shards, len(mine) - len(todo)
            summary.failed = dict(collections.Counter(f.reason for f in plan.failures))
            summary.kept = dict(collections.Counter(f.reason for f in plan.warnings))
            for f in plan.failures:
                log.info("skipped %s: %s %s", f.source, f.reason, f.detail)
            for f in plan.warnings:
                log.info("kept %s: %s %s", f.source, f.reason, f.detail)
            _remove_stale_tmp(out, mine)
            _write_shards(pool, plan, todo, out, prep, summary)
        finally:
            pool.close()
        summary.complete = _finalize(out, plan, n_shards, prep)
    summary.elapsed = time.perf_counter() - t0
    return summary


def _check_options(fps, short_side, max_seconds, sample_rate, audio_format, samples_per_shard, timeout) -> dict:
    if not fps > 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    if short_side < 2 or short_side % 2:
        raise ValueError(f"short_side must be an even number >= 2 (yuv420p), got {short_side}")
    if not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")
    if sample_rate < 1000:
        raise ValueError(f"sample_rate must be >= 1000 Hz, got {sample_rate}")
    if audio_format not in AUDIO_FORMATS:
        raise ValueError(f"audio_format must be one of {AUDIO_FORMATS}, got {audio_format!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 s, got {timeout}")
    return dict(
        fps=float(fps),
        short_side=int(short_side),
        max_seconds=float(max_seconds),
        sample_rate=int(sample_rate),
        audio_format=audio_format,
        samples_per_shard=int(samples_per_shard),
        timeout=float(timeout),
    )


# ---- transcoding and shard writing --------------------------------------------------------------------------------


def _shard_done(out: Path, s: int) -> bool:
    return (out / SHARDS_DIR / shard_name(s)).exists() and (out / STATS_DIR / stats_name(s)).exists()


def _remove_stale_tmp(out: Path, shards: list[int]) -> None:
    for s in shards:
        for target in (out / SHARDS_DIR / shard_name(s), out / STATS_DIR / stats_name(s)):
            for stale in stale_temporaries(target):
                stale.unlink(missing_ok=True)


def _write_shards(pool: CrashSafePool, plan: Plan, todo: list[int], out: Path, prep: dict, summary) -> None:
    """Transcode the chunks of shards `todo` in parallel; write each shard, in order, once all its chunks are back."""
    sps = prep["samples_per_shard"]
    chunks = [c for s in todo for c in plan.chunks[s * sps : (s + 1) * sps]]
    tasks = [(plan.sources[c.source].path, c, plan.probes[c.source], prep) for c in chunks]
    results = pool.map_ordered(_chunk_task, tasks, on_crash=_chunk_crashed)
    bar = tqdm(total=len(chunks), desc="chunks", unit="chunk")
    shard_started, samples, failures, source_seconds = time.perf_counter(), [], [], 0.0
    try:  # the bar is closed before an error is printed
        for chunk, result in zip(chunks, results):
            source_seconds += chunk.duration
            if isinstance(result, Failure):
                failures.append(result)
                log.info(
                    "%s %s: %s %s", "kept" if result.kept else "skipped", result.source, result.reason, result.detail
                )
            else:
                samples.append(_sample(plan.sources[chunk.source], chunk, result, prep))
                if result.dropped is not None:
                    failures.append(Failure(plan.sources[chunk.source].path, *result.dropped, kept=True))
                    log.info("kept %s without audio: %s", failures[-1].source, failures[-1].detail)
            bar.update(1)
            s = chunk.idx // sps
            if chunk.idx == min(len(plan.chunks), (s + 1) * sps) - 1:  # last chunk of shard s
                _finish_shard(out, s, samples, failures, source_seconds, time.perf_counter() - shard_started, summary)
                shard_started, samples, failures, source_seconds = time.perf_counter(), [], [], 0.0
    finally:
        bar.close()


def _chunk_task(path: str, chunk: Chunk, probe: dict, prep: dict) -> media.ChunkMedia | Failure:
    options = {k: prep[k] for k in ("fps", "short_side", "sample_rate", "audio_format", "timeout")}
    where = f"chunk idx {chunk.idx} at {chunk.start:g} s"
    try:
        got = media.transcode_chunk(path, chunk.start, chunk.duration, has_audio=probe["has_audio"], **options)
    except media.MediaError as e:
        if e.reason == media.TRANSCODE_FAILED and probe["has_audio"]:
            try:  # a broken audio track should not cost the video: keep the chunk without audio
                got = media.transcode_chunk(path, chunk.start, chunk.duration, has_audio=False, **options)
                return replace(got, dropped=(BAD_AUDIO, f"{where}: kept without audio ({e.detail})"))
            except media.MediaError:
                pass
        return Failure(path, e.reason, f"{where}: {e.detail}")
    return _aligned_audio(got, where, prep["audio_format"])


def _aligned_audio(got: media.ChunkMedia, where: str, audio_format: str) -> media.ChunkMedia:
    """Audio that spans the chunk's video: a longer track is cut to the video; a shorter one is dropped and noted.

    The video can end early (a source whose data stops before its header says) while ffmpeg pads the
    audio to the planned length; audio shorter than the video means it was not aligned at all.
    """
    if got.audio is None:
        return got
    video_seconds = got.num_frames / got.fps
    slack = AUDIO_TOLERANCE_S + 1.5 / got.fps
    if got.audio_seconds > video_seconds + slack:
        audio = media.trim_audio(got.audio, video_seconds, audio_format)
        return replace(got, audio=audio, audio_seconds=video_seconds)
    if got.audio_seconds < video_seconds - slack:
        detail = f"{where}: {got.audio_seconds:.3f} s of audio for {video_seconds:.3f} s of video; kept without audio"
        return replace(got, audio=None, audio_seconds=0.0, dropped=(AUDIO_MISALIGNED, detail))
    return got


def _chunk_crashed(path: str, chunk: Chunk, probe: dict, prep: dict) -> Failure:
    return Failure(path, WORKER_CRASHED, f"chunk idx {chunk.idx} at {chunk.start:g} s: the worker process died")


def _sample(item: SourceItem, chunk: Chunk, got: media.ChunkMedia, prep: dict) -> tuple[str, dict[str, bytes], float]:
    duration = round(got.num_frames / got.fps, 6)
    # Clip to what was stored, not to the plan: a source whose data ends early gives a shorter chunk.
    captions = clip_captions(list(item.captions), chunk.start, chunk.start + duration)
    meta = {
        "id": item.id,
        "idx": chunk.idx,
        "source": item.path,
        "start": chunk.start,
        "duration": duration,
        "fps": got.fps,
        "num_frames": got.num_frames,
        "width": got.width,
        "height": got.height,
        "has_audio": got.audio is not None,
        "sample_rate": prep["sample_rate"] if got.audio is not None else None,
        "captions": [{"start": round(c.start, 3), "end": round(c.end, 3), "text": c.text} for c in captions],
        "label": item.label,
        "split": item.split,
    }
    files = {"mp4": got.video, "json": encode_sample_json(meta)}
    if got.audio is not None:
        files[prep["audio_format"]] = got.audio
    return sample_key(chunk.idx), files, duration


def _finish_shard(out: Path, s: int, samples, problems: list[Failure], source_seconds, elapsed, summary) -> None:
    size = write_shard(str(out / SHARDS_DIR / shard_name(s)), [(key, files) for key, files, _ in samples])
    failures = [f for f in problems if not f.kept]
    by_reason = collections.Counter(f.reason for f in failures)
    kept = collections.Counter(f.reason for f in problems if f.kept)
    seconds = round(sum(sec for _, _, sec in samples), 6)
    stats = {
        "shard": shard_name(s),
        "inputs": len(samples) + len(failures),
        "written": len(samples),
        "failed": dict(sorted(by_reason.items())),
        "seconds": seconds,
        "source_seconds": round(source_seconds, 6),
        "bytes": size,
        "elapsed": round(elapsed, 3),
        "failures": [f.to_json() for f in failures],
        "kept": dict(sorted(kept.items())),
        "warnings": [f.to_json() for f in problems if f.kept],
    }
    write_json_atomic(out / STATS_DIR / stats_name(s), stats)  # written last: its presence marks the shard done
    summary.samples += len(samples)
    summary.seconds += seconds
    summary.source_seconds += source_seconds
    summary.shards_written += 1
    for reason, n in by_reason.items():
        summary.failed[reason] = summary.failed.get(reason, 0) + n
    for reason, n in kept.items():
        summary.kept[reason] = summary.kept.get(reason, 0) + n


# ---- finalisation: dataset.json + failures.jsonl once every shard is done ----------------------------------------


def _finalize(out: Path, plan: Plan, n_shards: int, prep: dict) -> bool:
    """Write dataset.json and failures.jsonl if all shards exist (whichever part gets here last does it).

    failures.jsonl lists every skipped input or chunk, then (with `"kept": true`) every one converted
    despite a problem (`bad_captions`, `audio_misaligned`, `bad_audio`).
    """
    if not all(_shard_done(out, s) for s in range(n_shards)):
        return False
    stats = [json.loads((out / STATS_DIR / stats_name(s)).read_text(encoding="utf-8")) for s in range(n_shards)]
    failures = [f.to_json() for f in plan.failures + plan.warnings]
    failures += [f for st in stats for f in st["failures"] + st.get("warnings", [])]
    with atomic_write(out / FAILURES_JSONL) as f:
        for row in failures:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    shards = [{"name": st["shard"], "samples": st["written"], "seconds": st["seconds"]} for st in stats]
    shards = [s for s in shards if s["samples"]]  # a shard whose chunks all failed holds nothing to read
    video = {
        "fps": prep["fps"],
        "short_side": prep["short_side"],
        "codec": "h264",
        "color": media.CANONICAL_COLOR,  # every clip BT.601 limited range, whatever its source's tags
    }
    audio = {"sample_rate": prep["sample_rate"], "format": prep["audio_format"]}
    write_json_atomic(out / DATASET_JSON, dataset_json(shards, video=video, audio=audio, prep=prep))
    return True
