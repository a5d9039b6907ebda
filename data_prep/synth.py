"""The built-in synthetic corpus: real mp4 files (H.264 + AAC) with narration sidecars, written like a user's.

```
<out>/videos/<id>.mp4   H.264 yuv420p video + AAC audio (mono or stereo)
<out>/videos/<id>.srt   narration captions (UTF-8 SRT)
<out>/manifest.csv      id,path,label,split
<out>/classes.json      the classes and their factors (shape, colour, motion, sound)
<out>/events.jsonl      per-video ground truth (segments, contact frames, caption kinds), for docs and tests
```

Each class is a shape + colour + motion with a sound signature (pitch, timbre, rhythm). A video has
2-3 segments; the object appears with a tone onset and every contact with the floor or a wall makes
a click at the contact frame. Motions have a direction, so time-reversed clips differ from forward
ones. Captions name the factors with varied templates; about a third are filler and some are mistimed.
Every draw comes from `np.random.default_rng([seed, index, stream])`: a video depends only on the seed
and its index, never on the worker count or on how many videos the corpus has.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.synth_audio import render_audio, write_wav
from data_prep.synth_captions import plan_captions, srt_text
from data_prep.synth_classes import CLASSES, SynthClass
from pipeline.files import atomic_path, write_text_atomic

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
NOISE_BANK = 8
SPLITS = {"train": 0.70, "val": 0.15, "test": 0.15}
COLOURS = {
    "red": (220, 40, 40),
    "blue": (40, 80, 230),
    "green": (40, 190, 60),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
}


@dataclass
class Segment:
    """One appearance of the object: frames `[start, end)`, its centre and radius per frame, contact frames."""

    start: int
    end: int
    cx: np.ndarray  # (end - start,) pixels
    cy: np.ndarray  # (end - start,)
    radius: np.ndarray  # (end - start,)
    contacts: list[int] = field(default_factory=list)  # global frame indices


@dataclass
class VideoPlan:
    """Everything needed to render one video, drawn from the seed before any pixel is made."""

    id: str
    seed: int
    index: int
    cls: SynthClass
    seconds: float
    width: int
    height: int
    fps: int
    sample_rate: int
    channels: int
    segments: list[Segment]
    captions: list[dict]
    look: dict  # per-video visual nuisance: background, object colour, pixel noise
    sound: dict  # per-video audio nuisance: loudness, noise, timing jitter, detune
    stamp: str  # fingerprint of the draws' inputs, stored in the mp4 so re-runs skip finished files


def make_synth_corpus(
    out_dir: str | Path,
    *,
    videos: int,
    seed: int = 0,
    seconds: float = 10.0,
    width: int = 160,
    height: int = 120,
    fps: int = 25,
    sample_rate: int = 16000,
    workers: int | None = None,
) -> dict:
    """Write a synthetic raw corpus (mp4 + srt per video, manifest.csv, classes.json) into `out_dir`.

    Idempotent: a video whose mp4 already carries this run's fingerprint is skipped; everything else is
    (re)written through a temporary name. Returns a summary dict (counts, splits, seconds, elapsed).
    """
    _check_args(videos, seconds, width, height, fps, sample_rate, workers)
    seconds = float(seconds)  # 10 and 10.0 must give the same files
    t0 = time.perf_counter()
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    workers = min(workers or os.cpu_count() or 1, videos)
    geometry = dict(seed=seed, seconds=seconds, width=width, height=height, fps=fps, sample_rate=sample_rate)
    plans = [plan_video(i, **geometry) for i in range(videos)]
    splits = assign_splits([CLASSES.index(p.cls) for p in plans], seed)
    for p in plans:
        write_text_atomic(out / "videos" / f"{p.id}.srt", srt_text(p.captions))

    written = 0
    with tqdm(total=videos, desc="synth", unit="video") as bar:
        if workers == 1:
            for p in plans:
                written += render_video(p, out)
                bar.update()
        else:
            ctx = mp.get_context("spawn")  # the caller may hold torch/OpenMP threads, which fork would copy badly
            with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                futures = [pool.submit(render_video, p, out) for p in plans]
                try:
                    for fut in as_completed(futures):
                        written += fut.result()
                        bar.update()
                except BaseException:
                    pool.shutdown(cancel_futures=True)  # fail fast: don't render the rest of the corpus first
                    raise

    rows = [{"id": p.id, "path": f"videos/{p.id}.mp4", "label": p.cls.label, "split": s} for p, s in zip(plans, splits)]
    write_text_atomic(out / "manifest.csv", _csv_text(rows))
    classes = {"format": "vatp-synth", "version": FORMAT_VERSION, "classes": [c.to_json() for c in CLASSES]}
    write_text_atomic(out / "classes.json", json.dumps(classes, indent=2) + "\n")
    write_text_atomic(out / "events.jsonl", "".join(json.dumps(_events(p)) + "\n" for p in plans))
    summary = _summary(out, plans, splits, written, workers, time.perf_counter() - t0)
    _log_summary(summary)
    return summary


def plan_video(
    index: int, *, seed: int, seconds: float, width: int, height: int, fps: int, sample_rate: int
) -> VideoPlan:
    """Draw the class, segments, trajectories, captions and nuisances of video `index` (no rendering)."""
    block = index // len(CLASSES)  # every block of len(CLASSES) consecutive videos holds each class once
    cls = CLASSES[np.random.default_rng([seed, block, 7]).permutation(len(CLASSES))[index % len(CLASSES)]]
    rng = np.random.default_rng([seed, index, 0])
    n_frames = int(round(seconds * fps))
    bounds = _segment_bounds(n_frames, fps, rng)
    segments = [_segment(cls.motion, a, b, fps, width, height, rng) for a, b in bounds]
    base = np.array(COLOURS[cls.colour], np.float32) + rng.uniform(-15, 15, 3)
    tint = rng.uniform(70, 170) + rng.uniform(-25, 25, 3)
    look = {
        "object_rgb": np.clip(base, 0, 255).round().tolist(),
        "background": str(rng.choice(["flat", "gradient", "checker", "stripes", "blotches"])),
        "bg_rgb": np.clip(tint, 0, 255).round().tolist(),
        "bg_rgb2": np.clip(tint + rng.uniform(-40, 40, 3), 0, 255).round().tolist(),
        "bg_scale": float(rng.uniform(4, 16)),
        "pixel_noise": float(rng.uniform(0.0, 4.0)),
    }
    sound = {
        "loudness": float(rng.uniform(0.3, 0.9)),
        "noise_level": float(10 ** rng.uniform(-3.0, -1.8)),
        "jitter_s": float(rng.uniform(0.0, 0.015)),
        "detune": float(rng.uniform(-0.02, 0.02)),
    }
    channels = int(rng.choice([1, 2]))
    spans = [(a / fps, b / fps) for a, b in bounds]
    captions = plan_captions(cls, spans, seconds, np.random.default_rng([seed, index, 1]))
    key = json.dumps([FORMAT_VERSION, seed, index, seconds, width, height, fps, sample_rate])
    return VideoPlan(
        id=f"synth_{index:06d}",
        seed=seed,
        index=index,
        cls=cls,
        seconds=seconds,
        width=width,
        height=height,
        fps=fps,
        sample_rate=sample_rate,
        channels=channels,
        segments=segments,
        captions=captions,
        look=look,
        sound=sound,
        stamp="vatp-synth:" + hashlib.sha1(key.encode()).hexdigest()[:16],
    )


def render_video(plan: VideoPlan, out_dir: str | Path) -> bool:
    """Render and encode one planned video; returns False (skipped) when a finished file with its stamp exists."""
    final = Path(out_dir) / "videos" / f"{plan.id}.mp4"
    if final.exists() and _read_stamp(final) == plan.stamp:
        return False
    fps = plan.fps
    audio = render_audio(
        seconds=plan.seconds,
        sample_rate=plan.sample_rate,
        channels=plan.channels,
        segments=[(s.start / fps, s.end / fps) for s in plan.segments],
        contacts=[c / fps for s in plan.segments for c in s.contacts],
        pan_times=np.concatenate([np.arange(s.start, s.end) / fps for s in plan.segments]),
        pan_x=np.concatenate([s.cx / plan.width for s in plan.segments]),
        pitch_hz=plan.cls.pitch_hz * (1 + plan.sound["detune"]),
        timbre=plan.cls.timbre,
        rhythm=plan.cls.rhythm,
        loudness=plan.sound["loudness"],
        noise_level=plan.sound["noise_level"],
        jitter_s=plan.sound["jitter_s"],
        rng=np.random.default_rng([plan.seed, plan.index, 2]),
    )
    _encode(plan, final, audio)
    return True


def _check_args(videos, seconds, width, height, fps, sample_rate, workers) -> None:
    if not isinstance(videos, int) or videos < 1:
        raise ValueError(f"videos must be a positive integer, got {videos!r}")
    if not isinstance(seconds, (int, float)) or not seconds >= 1.0:
        raise ValueError(f"seconds must be at least 1.0, got {seconds!r}")
    for name, value in (("width", width), ("height", height)):
        if not isinstance(value, int) or value < 32 or value % 2:
            raise ValueError(f"{name} must be an even number of pixels >= 32 (yuv420p), got {value!r}")
    if not isinstance(fps, int) or not 1 <= fps <= 120:
        raise ValueError(f"fps must be an integer in [1, 120], got {fps!r}")
    if not isinstance(sample_rate, int) or not 8000 <= sample_rate <= 96000:
        raise ValueError(f"sample_rate must be an integer in [8000, 96000] Hz, got {sample_rate!r}")
    if workers is not None and (not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer or None, got {workers!r}")


# ----------------------------------------------------------------------------- events and motion


def _segment_bounds(n_frames: int, fps: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """2-3 segments (1 below 2 s) filling ~80% of the video, with gaps of background-only frames between."""
    seconds = n_frames / fps
    k = 1 if seconds < 2 else (int(rng.choice([2, 3])) if seconds >= 6 else 2)
    gaps = rng.dirichlet(np.full(k + 1, 2.0)) * 0.2 * n_frames
    lengths = rng.dirichlet(np.full(k, 6.0)) * 0.8 * n_frames
    bounds, t = [], 0.0
    for g, length in zip(gaps, lengths):
        a = int(round(t + g))
        b = max(a + 2, int(round(t + g + length)))
        bounds.append((a, min(b, n_frames)))
        t = float(b)
    return bounds


def _segment(motion: str, a: int, b: int, fps: int, w: int, h: int, rng: np.random.Generator) -> Segment:
    """The object's path over frames `[a, b)`. Every motion has a direction: reversed in time it looks different."""
    n, dur = b - a, (b - a) / fps
    t = np.arange(n) / fps
    m = _border(w, h)
    r0 = rng.uniform(0.07, 0.12) * min(w, h)
    lo_x, hi_x, lo_y, hi_y = m + r0, w - m - r0, m + r0, h - m - r0
    radius, contacts = np.full(n, r0), []
    if motion == "bounce":  # dropped under gravity, damped bounces on the floor while drifting right
        y0 = rng.uniform(lo_y, lo_y + 0.25 * (hi_y - lo_y))
        t1 = dur * rng.uniform(0.15, 0.3)
        g, e = 2 * (hi_y - y0) / t1**2, rng.uniform(0.65, 0.8)
        cy = np.where(t < t1, y0 + 0.5 * g * t**2, hi_y)
        hit, v, contacts = t1, e * g * t1, [t1]
        while hit < dur and 2 * v / g > 1.5 / fps:
            arc = (t >= hit) & (t < hit + 2 * v / g)
            cy[arc] = hi_y - (v * (t[arc] - hit) - 0.5 * g * (t[arc] - hit) ** 2)
            hit, v = hit + 2 * v / g, v * e
            contacts.append(hit)
        x0 = rng.uniform(lo_x, lo_x + 0.3 * (hi_x - lo_x))
        cx = x0 + rng.uniform(0.3, 0.7) * (hi_x - x0) * t / dur
    elif motion == "wallbounce":  # constant speed between the side walls, a click at each wall
        span = hi_x - lo_x
        p0, speed = rng.uniform(0, span), span / rng.uniform(0.5, 1.2) * rng.choice([-1.0, 1.0])
        p = p0 + speed * t
        cx = lo_x + span - np.abs(np.mod(p, 2 * span) - span)
        cy = np.full(n, rng.uniform(lo_y, hi_y))
        ks = np.arange(np.floor(min(p0, p[-1]) / span), np.ceil(max(p0, p[-1]) / span) + 1)
        contacts = [tc for tc in (ks * span - p0) / speed if 0 < tc < dur]
    elif motion in ("rightward", "leftward"):
        frac = rng.uniform(0.5, 1.0)
        cx = lo_x + (hi_x - lo_x) * (rng.uniform(0, 1 - frac) + frac * t / dur)
        cx = cx if motion == "rightward" else lo_x + hi_x - cx
        wobble = rng.uniform(0, 0.05 * h) * np.sin(2 * np.pi * rng.uniform(0.5, 1.5) * t + rng.uniform(0, 6.3))
        cy = np.clip(rng.uniform(lo_y, hi_y) + wobble, lo_y, hi_y)
    elif motion in ("grow", "shrink"):
        s0, s1 = rng.uniform(0.3, 0.5), rng.uniform(1.3, 1.7)
        scale = s0 + (s1 - s0) * t / dur
        radius = r0 * (scale if motion == "grow" else scale[::-1])
        big = r0 * s1 + m
        cx = np.full(n, rng.uniform(big, w - big)) + rng.uniform(-2, 2) * t / dur
        cy = np.full(n, rng.uniform(big, h - big)) + rng.uniform(-2, 2) * t / dur
    elif motion == "orbit":  # clockwise on screen (y points down)
        orbit = rng.uniform(0.15, 0.28) * min(w, h)
        angle = rng.uniform(0, 2 * np.pi) + 2 * np.pi * rng.uniform(0.5, 1.0) * t
        cx = rng.uniform(lo_x + orbit, hi_x - orbit) + orbit * np.cos(angle)
        cy = rng.uniform(lo_y + orbit, hi_y - orbit) + orbit * np.sin(angle)
    else:
        raise ValueError(f"unknown motion {motion!r}")
    frames = sorted({a + int(round(tc * fps)) for tc in contacts if int(round(tc * fps)) < n})
    if motion == "bounce":
        cy[[f - a for f in frames]] = hi_y  # the contact frame shows the object on the floor
    return Segment(a, b, cx.astype(np.float32), cy.astype(np.float32), radius.astype(np.float32), frames)


# ----------------------------------------------------------------------------- pixels


def _border(w: int, h: int) -> int:
    return max(2, int(round(0.04 * min(w, h))))


def _background(look: dict, w: int, h: int) -> np.ndarray:
    """A static textured stage `(H, W, 3)` float32 with darker walls and floor."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    s = look["bg_scale"]
    weight = {
        "flat": np.zeros_like(xx),
        "gradient": (xx + yy) / (w + h),
        "checker": ((xx // s + yy // s) % 2) * 0.5,
        "stripes": 0.3 + 0.3 * np.sin((xx + yy) / s),
        "blotches": 0.5 + 0.25 * (np.sin(xx / s) * np.cos(yy / (1.3 * s)) + np.sin((xx - yy) / (2.1 * s))),
    }[look["background"]][..., None]
    c1, c2 = np.array(look["bg_rgb"], np.float32), np.array(look["bg_rgb2"], np.float32)
    bg = c1 * (1 - weight) + c2 * weight  # (H, W, 3)
    m = _border(w, h)
    bg[:, :m] *= 0.6
    bg[:, w - m :] *= 0.6
    bg[h - m :] *= 0.45
    return bg


def _distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to a shape of radius `r` centred at the origin."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.85 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - 1.1 * r) / np.sqrt(2)
    if shape == "ring":
        return np.abs(np.hypot(dx, dy) - 0.72 * r) - 0.28 * r
    if shape == "triangle":  # pointing up: its three edges are at distance r/2 from the centre
        return np.maximum(dy, 0.866 * np.abs(dx) - 0.5 * dy) - 0.5 * r
    if shape == "cross":
        bar = 0.3 * r
        return np.minimum(np.maximum(np.abs(dx) - r, np.abs(dy) - bar), np.maximum(np.abs(dx) - bar, np.abs(dy) - r))
    raise ValueError(f"unknown shape {shape!r}")


def _frames(plan: VideoPlan):
    """Yield the video's frames as `(H, W, 3)` uint8, one at a time."""
    w, h = plan.width, plan.height
    bg = _background(plan.look, w, h)
    colour = np.array(plan.look["object_rgb"], np.float32)
    rng = np.random.default_rng([plan.seed, plan.index, 3])
    # Pixel noise cycles through a few pre-drawn noisy backgrounds: fresh noise every frame costs more than the rest.
    noise = plan.look["pixel_noise"] * rng.standard_normal((NOISE_BANK, h, w, 1), dtype=np.float32)
    bank = np.clip(bg + noise, 0, 255).astype(np.uint8)  # (NOISE_BANK, H, W, 3)
    owner = {f: (s, f - s.start) for s in plan.segments for f in range(s.start, s.end)}
    for f in range(int(round(plan.seconds * plan.fps))):
        frame = bank[rng.integers(NOISE_BANK)].copy()
        if f in owner:
            seg, k = owner[f]
            cx, cy, r = float(seg.cx[k]), float(seg.cy[k]), float(seg.radius[k])
            x0, x1 = max(int(cx - r) - 2, 0), min(int(cx + r) + 3, w)
            y0, y1 = max(int(cy - r) - 2, 0), min(int(cy + r) + 3, h)
            dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx  # (1, x1 - x0)
            dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy  # (y1 - y0, 1)
            alpha = np.clip(0.5 - _distance(plan.cls.shape, dx, dy, r), 0, 1)[..., None]  # anti-aliased edge
            region = frame[y0:y1, x0:x1]
            region[:] = (region * (1 - alpha) + colour * alpha + 0.5).astype(np.uint8)
        yield frame


# ----------------------------------------------------------------------------- encoding


def _encode(plan: VideoPlan, final: Path, audio: np.ndarray) -> None:
    """Render `plan` to `final` with ffmpeg, through a temporary name and a temp WAV of its audio."""
    wav = final.with_name(final.stem + ".tmp.wav")
    write_wav(wav, audio, plan.sample_rate)
    try:
        with atomic_path(final) as tmp:
            _ffmpeg(plan, wav, tmp)
    finally:
        wav.unlink(missing_ok=True)


def _ffmpeg(plan: VideoPlan, wav: Path, out: Path) -> None:
    """Pipe raw RGB frames into ffmpeg (libx264, one thread, bit-exact flags) with the audio of `wav`, to `out`."""
    import imageio_ffmpeg

    # -threads 1 and +bitexact make the bytes a function of the inputs: same seed, same mp4.
    cmd = [
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-filter_threads", "1",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{plan.width}x{plan.height}", "-framerate", str(plan.fps),
        "-i", "-", "-i", str(wav), "-map", "0:v:0", "-map", "1:a:0",
        "-c:v", "libx264", "-preset", "veryfast", "-crf", "23", "-pix_fmt", "yuv420p", "-g", str(2 * plan.fps),
        "-c:a", "aac", "-aac_coder", "fast", "-b:a", f"{48 * plan.channels}k", "-threads", "1",
        "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact",
        "-map_metadata", "-1", "-metadata", f"comment={plan.stamp}", "-f", "mp4", str(out),
    ]  # fmt: skip
    timeout = 60.0 + 6.0 * plan.seconds
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err)
    watchdog = threading.Timer(timeout, proc.kill)  # a stuck ffmpeg must not block stdin writes forever
    watchdog.start()
    try:
        try:
            for frame in _frames(plan):
                proc.stdin.write(frame.tobytes())
            proc.stdin.close()
        except BrokenPipeError:
            pass  # ffmpeg died; its exit code and stderr below say why
        rc = proc.wait(timeout=timeout)
        if rc != 0:
            err.seek(0)
            detail = err.read().decode(errors="replace").strip()[-2000:]
            killed = "" if watchdog.is_alive() else f" (killed after {timeout:.0f} s)"
            raise RuntimeError(f"ffmpeg failed on {plan.id} with exit code {rc}{killed}: {detail}")
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        err.close()


def _read_stamp(path: Path) -> str | None:
    import av

    try:
        with av.open(str(path)) as container:
            return container.metadata.get("comment")
    except (av.FFmpegError, OSError):
        return None  # unreadable or truncated: render it again


# ----------------------------------------------------------------------------- splits, files, summary


def assign_splits(class_ids: list[int], seed: int) -> list[str]:
    """Stratified train/val/test: walk the videos grouped by class and give each the split furthest below its share.

    Each class is a contiguous run of that walk, so every class gets its share up to one video.
    """
    names, shares = list(SPLITS), np.array(list(SPLITS.values()))
    rng = np.random.default_rng([seed, 5])
    order = np.lexsort((rng.random(len(class_ids)), np.asarray(class_ids)))
    counts, out = np.zeros(len(names)), [""] * len(class_ids)
    for k, i in enumerate(order):
        j = int(np.argmax(shares * (k + 1) - counts))
        counts[j] += 1
        out[i] = names[j]
    return out


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["id", "path", "label", "split"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _events(plan: VideoPlan) -> dict:
    fps = plan.fps
    segments = [
        {
            "start": s.start / fps,
            "end": s.end / fps,
            "contact_frames": s.contacts,
            "contacts": [c / fps for c in s.contacts],
        }
        for s in plan.segments
    ]
    return {
        "id": plan.id,
        "label": plan.cls.label,
        "fps": fps,
        "seconds": plan.seconds,
        "channels": plan.channels,
        "segments": segments,
        "captions": plan.captions,
        "look": plan.look,
        "sound": plan.sound,
    }


def _summary(out: Path, plans: list[VideoPlan], splits: list[str], written: int, workers: int, elapsed: float) -> dict:
    captions = [c for p in plans for c in p.captions]
    return {
        "out": str(out),
        "videos": len(plans),
        "written": written,
        "skipped": len(plans) - written,
        "classes": len({p.cls.label for p in plans}),
        "seconds": float(sum(p.seconds for p in plans)),
        "elapsed": elapsed,
        "videos_per_s": len(plans) / max(elapsed, 1e-9),
        "workers": workers,
        "splits": {name: splits.count(name) for name in SPLITS},
        "captions": len(captions),
        "filler": sum(c["kind"] == "filler" for c in captions),
        "mistimed": sum(c["kind"] == "mistimed" for c in captions),
    }


def format_summary(s: dict) -> str:
    """The one-screen summary of a `make_synth_corpus` result (what `vatp data synth` prints)."""
    lines = [
        f"synth corpus {s['out']}",
        f"videos       {s['videos']} ({s['written']} written, {s['skipped']} already there), {s['classes']} classes",
        f"seconds      {s['seconds']:.0f} s of video",
        f"splits       {' / '.join(f'{k} {v}' for k, v in s['splits'].items())}",
        f"captions     {s['captions']} ({s['filler']} filler, {s['mistimed']} mistimed)",
        f"elapsed      {s['elapsed']:.1f} s, {s['videos_per_s']:.2f} videos/s on {s['workers']} worker(s)",
    ]
    return "\n".join(lines)


def _log_summary(s: dict) -> None:
    # Debug level: the CLI prints the same summary on stdout, and a library caller has the returned dict.
    log.debug("%s", format_summary(s))
