"""Planning for `vatp data build`: sort and de-duplicate sources, probe them (cached in plan.json), cut chunks.

Every chunk gets its `idx` from its position in the plan, before anything is transcoded; plan.json
keeps the probes so that resumes and the other parts of a job array plan exactly alike.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from data_prep import media
from data_prep.pool import CrashSafePool
from data_prep.sources import Failure, SourceItem, SourceList
from pipeline.dataset import PLAN_JSON, SHARDS_DIR, STATS_DIR
from pipeline.files import write_json_atomic

log = logging.getLogger(__name__)

DUPLICATE = "duplicate_id"
EMPTY_WINDOW = "empty_window"
WORKER_CRASHED = "worker_crashed"
PROBE_TIMEOUT = "probe_timeout"
TRANSIENT = (PROBE_TIMEOUT, WORKER_CRASHED)  # probe failures worth a retry on a re-run


@dataclass(frozen=True)
class Chunk:
    """One future sample: seconds `[start, start+duration)` of source `source` (an index into the plan)."""

    idx: int
    source: int
    start: float
    duration: float


@dataclass
class Plan:
    """Sorted sources, their probes, the chunk list (position = idx), the inputs skipped before transcoding
    and the kept problems found so far (`bad_captions`)."""

    sources: list[SourceItem]
    probes: list[dict]
    chunks: list[Chunk]
    failures: list[Failure]
    inputs: int
    warnings: list[Failure] = field(default_factory=list)


def make_plan(pool: CrashSafePool, sources: SourceList, out: Path, prep: dict, *, may_reprobe: bool) -> Plan:
    """Sorted unique sources + their probes (cached in plan.json so resumes and parts agree) -> chunks."""
    items = sorted(sources.items, key=lambda it: (it.id, _num(it.start), _num(it.end), it.path))
    unique, failures, seen = [], list(sources.failures), set()
    for it in items:
        if (it.id, it.start, it.end) in seen:
            failures.append(Failure(it.path, DUPLICATE, f"id {it.id!r} already used by an earlier source"))
            continue
        seen.add((it.id, it.start, it.end))
        unique.append(it)
    probes = _cached_probes(out, unique, prep)
    if probes is None:
        probes = _publish_plan(out, unique, _probe_all(pool, unique, prep["timeout"]), prep)
    elif any(p.get("reason") in TRANSIENT for p in probes):
        probes = _reprobe_transient(pool, out, unique, probes, prep, may_reprobe)
    chunks: list[Chunk] = []
    for i, (it, probe) in enumerate(zip(unique, probes)):
        if "reason" in probe:
            failures.append(Failure(it.path, probe["reason"], probe["detail"]))
            continue
        # The first decodable frame may come after the container starts (audio first, or a stream cut mid-GOP
        # whose frames before its first keyframe do not decode): chunks start at that frame, so the audio of
        # every chunk is cut from the same instant as its video. `duration` counts from that frame too.
        first = probe.get("video_start", 0.0)
        lo = max(first, it.start or 0.0)
        hi = min(first + probe["duration"], it.end) if it.end is not None else first + probe["duration"]
        if hi - lo <= 0:
            detail = f"window [{lo:g}, {it.end}] s is outside the video (duration {probe['duration']:.3f} s)"
            failures.append(Failure(it.path, EMPTY_WINDOW, detail))
            continue
        for start, duration in chunk_bounds(lo, hi, prep["max_seconds"]):
            chunks.append(Chunk(len(chunks), i, start, duration))
    failed = {f.source for f in failures}  # a bad_captions warning only stands for a video that is kept
    warnings = [w for w in sources.warnings if w.source not in failed]
    return Plan(unique, probes, chunks, failures, inputs=len(items) + len(sources.failures), warnings=warnings)


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
    path = out / PLAN_JSON
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
    plan = {"prep": prep, "digest": _sources_digest(items, prep), "probes": probes}
    try:
        write_json_atomic(out / PLAN_JSON, plan, exclusive=True)
    except FileExistsError:
        probes = _cached_probes(out, items, prep)
    return probes


def _reprobe_transient(pool, out: Path, items: list[SourceItem], probes: list[dict], prep: dict, may: bool):
    """Probe again the sources an earlier run lost to a timeout or a crashed worker, if that cannot move an idx.

    A success adds chunks, which shifts the idx of every later chunk; that is safe only while no shard
    holds an idx yet and no other part is planning from the same plan.json (so: one part only).
    """
    again = [i for i, p in enumerate(probes) if p.get("reason") in TRANSIENT]
    written = any((out / SHARDS_DIR).glob("*.tar")) or any((out / STATS_DIR).glob("*.json"))
    if not may or written:
        why = "shards are already written" if written else "the build is split into parts"
        log.warning(
            "%d source(s) failed to probe in an earlier run (%s); not retried because %s (idx must not move): "
            "build into a new --out to retry them",
            len(again),
            ", ".join(sorted({probes[i]["reason"] for i in again})),
            why,
        )
        return probes
    probes = list(probes)
    for i, probe in zip(again, _probe_all(pool, [items[i] for i in again], prep["timeout"])):
        probes[i] = probe
    write_json_atomic(out / PLAN_JSON, {"prep": prep, "digest": _sources_digest(items, prep), "probes": probes})
    fixed = sum(1 for i in again if "reason" not in probes[i])
    log.info("re-probed %d source(s) that failed transiently before: %d now usable", len(again), fixed)
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


def _probe_crashed(path: str, timeout: float) -> dict:
    return {"reason": WORKER_CRASHED, "detail": "the worker process died while probing (decoder crash?)"}
