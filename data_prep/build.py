"""`vatp data build`: sources -> probed plan -> canonical chunks (parallel ffmpeg) -> deterministic shards.

The work is planned before anything is transcoded: sources are sorted, probed, cut into chunks, and
every chunk gets its `idx` and its shard from its position in that list. So keys and shard contents
never depend on worker timing or on which chunks fail (a failed chunk leaves a gap in `idx`), a
re-run skips finished shards, and parts of a job array split the shards by `shard % P == I`.
"""

from __future__ import annotations

import collections
import ctypes
import hashlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from data_prep import media
from data_prep.captions import clip_captions
from data_prep.readers import read_sources
from data_prep.shards import encode_sample_json, sample_key, shard_name, write_json_atomic, write_shard
from data_prep.sources import Failure, SourceItem

log = logging.getLogger(__name__)

FORMAT_NAME = "vatp-shards"
FORMAT_VERSION = 1
AUDIO_FORMATS = ("flac", "wav")
DUPLICATE = "duplicate_id"
EMPTY_WINDOW = "empty_window"
WORKER_CRASHED = "worker_crashed"
PROBE_TIMEOUT = "probe_timeout"


@dataclass(frozen=True)
class Chunk:
    """One future sample: seconds `[start, start+duration)` of source `source` (an index into the plan)."""

    idx: int
    source: int
    start: float
    duration: float


@dataclass
class Plan:
    """Sorted sources, their probes, the chunk list (position = idx) and the inputs skipped before transcoding."""

    sources: list[SourceItem]
    probes: list[dict]
    chunks: list[Chunk]
    failures: list[Failure]
    inputs: int


@dataclass
class BuildSummary:
    """What one `build_dataset` call did (this part only) and whether the dataset is now complete."""

    out_dir: str
    inputs: int = 0
    chunks: int = 0
    samples: int = 0
    failed: dict[str, int] = field(default_factory=dict)
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
        lines = [
            f"dataset      {self.out_dir}" + ("" if self.complete else "  (incomplete: other parts pending)"),
            f"part         {self.part} of {self.num_parts}",
            f"inputs       {self.inputs} sources, {self.chunks} chunks planned",
            f"samples      {self.samples} written this run, {self.seconds / 3600:.3f} h of video",
            f"failed       {sum(self.failed.values())} ({failed})",
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
    items, reader_failures = _read_sources(input, fmt, videos_root, split)
    if not items and not reader_failures:
        raise ValueError(f"no videos found in {input} (format {fmt!r}{f', split {split!r}' if split else ''})")
    if stale := media.sweep_stale_temp():
        log.info("removed %d temporary folder(s) left by killed workers", stale)
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "stats").mkdir(exist_ok=True)
    pool = CrashSafePool(workers)
    try:
        plan = _make_plan(pool, items, reader_failures, out, prep)
        n_shards = -(-len(plan.chunks) // samples_per_shard)
        mine = [s for s in range(n_shards) if s % num_parts == part]
        todo = [s for s in mine if not _shard_done(out, s)]
        summary = BuildSummary(str(out), inputs=plan.inputs, chunks=len(plan.chunks), part=part, num_parts=num_parts)
        summary.shards_total, summary.shards_skipped = n_shards, len(mine) - len(todo)
        summary.failed = dict(collections.Counter(f.reason for f in plan.failures))
        for f in plan.failures:
            log.info("skipped %s: %s %s", f.source, f.reason, f.detail)
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


def _read_sources(input, fmt, videos_root, split) -> tuple[list[SourceItem], list[Failure]]:
    sources = read_sources(input, fmt, split=split, videos=videos_root)
    return list(sources.items), list(sources.failures)


# ---- planning: sort, dedupe, probe, chunk ----------------------------------------------------------------------


def _make_plan(pool: CrashSafePool, items, reader_failures, out: Path, prep: dict) -> Plan:
    """Sorted unique sources + their probes (cached in plan.json so resumes and parts agree) -> chunks."""
    items = sorted(items, key=lambda it: (it.id, _num(it.start), _num(it.end), it.path))
    unique, failures, seen = [], list(reader_failures), set()
    for it in items:
        if (it.id, it.start, it.end) in seen:
            failures.append(Failure(it.path, DUPLICATE, f"id {it.id!r} already used by an earlier source"))
            continue
        seen.add((it.id, it.start, it.end))
        unique.append(it)
    probes = _cached_probes(out, unique, prep)
    if probes is None:
        probes = _publish_plan(out, unique, _probe_all(pool, unique, prep["timeout"]), prep)
    chunks: list[Chunk] = []
    for i, (it, probe) in enumerate(zip(unique, probes)):
        if "reason" in probe:
            failures.append(Failure(it.path, probe["reason"], probe["detail"]))
            continue
        lo = max(0.0, it.start or 0.0)
        hi = min(probe["duration"], it.end) if it.end is not None else probe["duration"]
        if hi - lo <= 0:
            detail = f"window [{lo:g}, {it.end}] s is outside the video (duration {probe['duration']:.3f} s)"
            failures.append(Failure(it.path, EMPTY_WINDOW, detail))
            continue
        for start, duration in chunk_bounds(lo, hi, prep["max_seconds"]):
            chunks.append(Chunk(len(chunks), i, start, duration))
    return Plan(unique, probes, chunks, failures, inputs=len(items) + len(reader_failures))


def chunk_bounds(lo: float, hi: float, max_seconds: float) -> list[tuple[float, float]]:
    """Cut `[lo, hi)` into consecutive (start, duration) pieces of `max_seconds`; a tail < max_seconds/4 merges."""
    n = max(1, int((hi - lo) // max_seconds))
    if (hi - lo) - n * max_seconds >= max_seconds / 4:
        n += 1
    starts = [lo + k * max_seconds for k in range(n)]
    return [(round(s, 6), round((starts[k + 1] if k + 1 < n else hi) - s, 6)) for k, s in enumerate(starts)]


def _num(x: float | None) -> float:
    return -1.0 if x is None else x


def _sources_digest(items: list[SourceItem], prep: dict) -> str:
    rows = [
        [it.id, it.path, it.start, it.end, it.label, it.split, [list(asdict(c).values()) for c in it.captions]]
        for it in items
    ]
    stable = {k: v for k, v in prep.items() if k != "timeout"}  # the timeout changes no output byte
    return hashlib.sha256(json.dumps([stable, rows], sort_keys=True).encode()).hexdigest()


def _cached_probes(out: Path, items: list[SourceItem], prep: dict) -> list[dict] | None:
    path = out / "plan.json"
    if not path.exists():
        return None
    cached = json.loads(path.read_text(encoding="utf-8"))
    stable = {k: v for k, v in prep.items() if k != "timeout"}
    old = {k: v for k, v in cached["prep"].items() if k != "timeout"}
    if old != stable:
        diff = ", ".join(f"{k} {old.get(k)!r} -> {v!r}" for k, v in stable.items() if old.get(k) != v)
        raise ValueError(f"{out} was built with other options ({diff}); use a new --out or the old options")
    if cached["digest"] != _sources_digest(items, prep):
        raise ValueError(f"{out} was built from a different source list; use a new --out to build this input")
    return cached["probes"]


def _publish_plan(out: Path, items: list[SourceItem], probes: list[dict], prep: dict) -> list[dict]:
    """Write plan.json unless another part got there first; then its probes win, so every part plans alike."""
    tmp = out / f"plan.json.{os.getpid()}.tmp"
    write_json_atomic(str(tmp), {"prep": prep, "digest": _sources_digest(items, prep), "probes": probes})
    try:
        os.link(tmp, out / "plan.json")  # fails if it exists, unlike a rename
    except FileExistsError:
        probes = _cached_probes(out, items, prep)
    except OSError:  # a filesystem without hard links: last writer wins
        os.replace(tmp, out / "plan.json")
    tmp.unlink(missing_ok=True)
    return probes


def _probe_all(pool: CrashSafePool, items: list[SourceItem], timeout: float) -> list[dict]:
    tasks = [(it.path, timeout) for it in items]
    results = pool.map_ordered(_probe_task, tasks, on_crash=_probe_crashed)
    return list(tqdm(results, total=len(items), desc="probe", unit="video", leave=False))


def _probe_task(path: str, timeout: float) -> dict:
    """Probe in a worker under two clocks: wall time raises in Python; CPU time kills a decoder spinning in C."""

    def ran_out(signum, frame):
        raise media.MediaError(PROBE_TIMEOUT, f"probing ran past {timeout:g} s")

    previous = signal.signal(signal.SIGALRM, ran_out)
    signal.setitimer(signal.ITIMER_REAL, timeout)
    signal.setitimer(signal.ITIMER_PROF, 2 * timeout)  # SIGPROF's default action ends the process
    try:
        return asdict(media.probe_media(path))
    except media.MediaError as e:
        return {"reason": e.reason, "detail": e.detail}
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGALRM, previous)


def _worker_init(parent: int) -> None:
    """Make a pool worker die with its parent: after a SIGKILLed build it would otherwise block forever."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _probe_crashed(path: str, timeout: float) -> dict:
    return {"reason": WORKER_CRASHED, "detail": "the worker process died while probing (decoder crash?)"}


class CrashSafePool:
    """Worker processes that yield results in submission order and survive a worker dying.

    A dead worker (a decoder segfault on a hostile file) breaks a ProcessPoolExecutor for every task
    in flight. Here the pool is rebuilt, the task at the head is re-run alone to find the culprit
    (which becomes `on_crash(*args)`), and the tasks behind it are resubmitted.
    """

    def __init__(self, workers: int):
        self.workers = workers
        self.pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, initializer=_worker_init, initargs=(os.getpid(),))

    def map_ordered(self, fn: Callable, args: Iterable[tuple], on_crash: Callable) -> Iterator:
        pending, window = iter(args), collections.deque()
        while True:
            while len(window) < 4 * self.workers and (a := next(pending, None)) is not None:
                window.append((a, self.pool.submit(fn, *a)))
            if not window:
                return
            a, fut = window.popleft()
            try:
                yield fut.result()
            except BrokenProcessPool:
                self._restart()
                yield self._alone(fn, a, on_crash)
                window = collections.deque((b, self.pool.submit(fn, *b)) for b, _ in window)

    def _alone(self, fn: Callable, a: tuple, on_crash: Callable):
        try:
            return self.pool.submit(fn, *a).result()
        except BrokenProcessPool:
            log.warning("a worker process died on %s", a[0])
            self._restart()
            return on_crash(*a)

    def _restart(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.pool = self._new_pool()

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# ---- transcoding and shard writing --------------------------------------------------------------------------------


def _shard_done(out: Path, s: int) -> bool:
    return (out / "shards" / shard_name(s)).exists() and (out / "stats" / f"{s:06d}.json").exists()


def _remove_stale_tmp(out: Path, shards: list[int]) -> None:
    for s in shards:
        for stale in [out / "shards" / f"{shard_name(s)}.tmp", *(out / "stats").glob(f"{s:06d}.json.*tmp")]:
            stale.unlink(missing_ok=True)


def _write_shards(pool: CrashSafePool, plan: Plan, todo: list[int], out: Path, prep: dict, summary) -> None:
    """Transcode the chunks of shards `todo` in parallel; write each shard, in order, once all its chunks are back."""
    sps = prep["samples_per_shard"]
    chunks = [c for s in todo for c in plan.chunks[s * sps : (s + 1) * sps]]
    tasks = [(plan.sources[c.source].path, c, plan.probes[c.source], prep) for c in chunks]
    results = pool.map_ordered(_chunk_task, tasks, on_crash=_chunk_crashed)
    bar = tqdm(total=len(chunks), desc="chunks", unit="chunk")
    shard_started, samples, failures, source_seconds = time.perf_counter(), [], [], 0.0
    for chunk, result in zip(chunks, results):
        source_seconds += chunk.duration
        if isinstance(result, Failure):
            failures.append(result)
            log.info("skipped %s: %s %s", result.source, result.reason, result.detail)
        else:
            samples.append(_sample(plan.sources[chunk.source], chunk, result, prep))
        bar.update(1)
        s = chunk.idx // sps
        if chunk.idx == min(len(plan.chunks), (s + 1) * sps) - 1:  # last chunk of shard s
            _finish_shard(out, s, samples, failures, source_seconds, time.perf_counter() - shard_started, summary)
            shard_started, samples, failures, source_seconds = time.perf_counter(), [], [], 0.0
    bar.close()


def _chunk_task(path: str, chunk: Chunk, probe: dict, prep: dict) -> media.ChunkMedia | Failure:
    options = {k: prep[k] for k in ("fps", "short_side", "sample_rate", "audio_format", "timeout")}
    try:
        return media.transcode_chunk(path, chunk.start, chunk.duration, has_audio=probe["has_audio"], **options)
    except media.MediaError as e:
        if e.reason == media.TRANSCODE_FAILED and probe["has_audio"]:
            try:  # a broken audio track should not cost the video: keep the chunk without audio
                got = media.transcode_chunk(path, chunk.start, chunk.duration, has_audio=False, **options)
                log.warning("%s: chunk idx %d kept without audio (%s)", path, chunk.idx, e.detail)
                return got
            except media.MediaError:
                pass
        return Failure(path, e.reason, f"chunk idx {chunk.idx} at {chunk.start:g} s: {e.detail}")


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


def _finish_shard(out: Path, s: int, samples, failures: list[Failure], source_seconds, elapsed, summary) -> None:
    size = write_shard(str(out / "shards" / shard_name(s)), [(key, files) for key, files, _ in samples])
    by_reason = collections.Counter(f.reason for f in failures)
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
    }
    write_json_atomic(str(out / "stats" / f"{s:06d}.json"), stats)  # written last: its presence marks the shard done
    summary.samples += len(samples)
    summary.seconds += seconds
    summary.source_seconds += source_seconds
    summary.shards_written += 1
    for reason, n in by_reason.items():
        summary.failed[reason] = summary.failed.get(reason, 0) + n


# ---- finalisation: dataset.json + failures.jsonl once every shard is done ----------------------------------------


def _finalize(out: Path, plan: Plan, n_shards: int, prep: dict) -> bool:
    """Write dataset.json and failures.jsonl if all shards exist (whichever part gets here last does it)."""
    if not all(_shard_done(out, s) for s in range(n_shards)):
        return False
    stats = [json.loads((out / "stats" / f"{s:06d}.json").read_text(encoding="utf-8")) for s in range(n_shards)]
    failures = [f.to_json() for f in plan.failures] + [f for st in stats for f in st["failures"]]
    tmp = out / f"failures.jsonl.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in failures:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "failures.jsonl")
    shards = [{"name": st["shard"], "samples": st["written"], "seconds": st["seconds"]} for st in stats]
    shards = [s for s in shards if s["samples"]]  # a shard whose chunks all failed holds nothing to read
    dataset = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "shards": shards,
        "samples": sum(s["samples"] for s in shards),
        "seconds": round(sum(s["seconds"] for s in shards), 6),
        "video": {"fps": prep["fps"], "short_side": prep["short_side"], "codec": "h264"},
        "audio": {"sample_rate": prep["sample_rate"], "format": prep["audio_format"]},
        "prep": prep,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_json_atomic(str(out / "dataset.json"), dataset)
    return True
