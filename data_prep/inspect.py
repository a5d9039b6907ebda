"""`vatp data inspect`: check a built dataset against the on-disk format (schema, integrity, decodability)."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import soundfile
from tqdm import tqdm

from data_prep.build import AUDIO_TOLERANCE_S
from pipeline.dataset import (
    AUDIO_MEMBERS,
    FAILURES_JSONL,
    SAMPLE_FIELDS,
    SHARDS_DIR,
    iter_tar_members,
    read_dataset_json,
    sample_key,
    split_member,
)

FRAME_TOLERANCE = 1  # decoded frames may differ from num_frames by this much


@dataclass
class InspectReport:
    """The result of `inspect_dataset`: counts, and every problem found (empty when the dataset is valid)."""

    path: str
    shards: int = 0
    samples: int = 0
    seconds: float = 0.0
    with_audio: int = 0
    captions: int = 0
    decoded: int = 0
    failures: int = 0
    kept: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def format(self, max_errors: int = 20) -> str:
        """The one-screen summary the CLI prints."""
        lines = [
            f"dataset      {self.path}",
            f"status       {'OK' if self.ok else f'INVALID ({len(self.errors)} problems)'}",
            f"shards       {self.shards}",
            f"samples      {self.samples} ({self.with_audio} with audio), {self.seconds / 3600:.3f} h",
            f"captions     {self.captions}",
            f"decoded      {self.decoded} samples checked with decord and PyAV (YUV, the training decoder)",
            f"failures     {self.failures} inputs skipped at build time, {self.kept} kept despite a problem "
            "(failures.jsonl)",
        ]
        lines += [f"  error: {e}" for e in self.errors[:max_errors]]
        if len(self.errors) > max_errors:
            lines.append(f"  ... and {len(self.errors) - max_errors} more")
        return "\n".join(lines)


def inspect_dataset(dir: str | os.PathLike, *, decode: int = 8) -> InspectReport:
    """Validate the dataset at `dir`; decode `decode` samples spread evenly over it. Never raises on bad data.

    The decoded samples are those at positions `k * total // n` (k < n = min(decode, total)) in dataset.json's
    shard order, so every shard gets its share and the same dataset is always checked the same way.
    """
    root = Path(dir)
    report = InspectReport(str(root))
    meta = _read_dataset_json(root, report)
    if meta is None:
        return report
    report.failures, report.kept = _count_failures(root / FAILURES_JSONL)
    keys: set[str] = set()
    total = sum(entry["samples"] for entry in meta["shards"])
    n = max(0, min(decode, total))  # more than there are: decode every sample
    picked = {k * total // n for k in range(n)}
    offset = 0
    for entry in tqdm(meta["shards"], desc="inspect", unit="shard", leave=False):
        first, offset = offset, offset + entry["samples"]
        samples = _read_shard(root / SHARDS_DIR / entry["name"], report)
        if samples is None:
            continue
        report.shards += 1
        if len(samples) != entry["samples"]:
            report.errors.append(f"{entry['name']}: {len(samples)} samples, dataset.json says {entry['samples']}")
        for position, (key, files) in enumerate(samples.items(), start=first):
            where = f"{entry['name']}:{key}"
            if key in keys:
                report.errors.append(f"{where}: key appears in more than one shard")
            keys.add(key)
            sample = _check_sample(where, key, files, report, meta)
            if sample is not None and position in picked:
                _decode_sample(where, files, sample, report)
    if not meta["shards"]:
        report.errors.append("dataset.json lists no shards (every input failed? see failures.jsonl)")
    if report.samples != meta["samples"]:
        report.errors.append(f"{report.samples} samples in shards, dataset.json says {meta['samples']}")
    return report


def _read_dataset_json(root: Path, report: InspectReport) -> dict | None:
    try:
        meta = read_dataset_json(root)
    except (ValueError, OSError) as e:
        report.errors.append(str(e))
        return None
    missing = [k for k in ("shards", "samples", "seconds", "video", "audio", "prep") if k not in meta]
    if missing:
        report.errors.append(f"dataset.json lacks {missing}")
        return None
    bad = [
        e
        for e in meta["shards"]
        if not (isinstance(e, dict) and isinstance(e.get("name"), str) and _is_int(e.get("samples")))
        or e["samples"] < 0
    ]
    if bad:
        report.errors.append(f"dataset.json: shard entries need a name and a sample count, got {bad[0]!r}")
        return None
    if not isinstance(meta["audio"], dict) or not _is_int(meta["samples"]):
        report.errors.append(f"dataset.json: bad 'audio' {meta['audio']!r} or 'samples' {meta['samples']!r}")
        return None
    return meta


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _count_failures(path: Path) -> tuple[int, int]:
    """(skipped, kept) rows of failures.jsonl; a line that is not a JSON object counts as skipped."""
    skipped = kept = 0
    if not path.exists():
        return 0, 0
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if isinstance(row, dict) and row.get("kept") is True:
                kept += 1
            else:
                skipped += 1
    return skipped, kept


def _read_shard(path: Path, report: InspectReport) -> dict[str, dict[str, bytes]] | None:
    """{key: {extension: bytes}} of one tar, or None (with an error) when it is missing or unreadable."""
    if not path.is_file():
        report.errors.append(f"{path.name}: listed in dataset.json but missing")
        return None
    samples: dict[str, dict[str, bytes]] = {}

    def format_member(name: str) -> bool:  # the reader the loader uses; a foreign member is reported, not read
        if split_member(name) is None:
            report.errors.append(f"{path.name}: member {name!r} is not part of the format (no reader opens it)")
            return False
        return True

    try:
        with open(path, "rb") as stream:
            for name, data in iter_tar_members(stream, format_member):
                key, ext = split_member(name)
                samples.setdefault(key, {})[ext] = data
    except (ValueError, OSError) as e:
        report.errors.append(f"{path.name}: unreadable tar ({e})")
        return None
    return samples


def _check_sample(where: str, key: str, files: dict[str, bytes], report, meta: dict) -> dict | None:
    if "mp4" not in files or "json" not in files:
        report.errors.append(f"{where}: needs .mp4 and .json, has {sorted(files)}")
        return None
    try:
        sample = json.loads(files["json"])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        report.errors.append(f"{where}.json: invalid JSON ({e})")
        return None
    if not isinstance(sample, dict):
        report.errors.append(f"{where}.json: expected a JSON object, got {type(sample).__name__} {sample!r:.80}")
        return None
    problems = [f"{k} missing" for k in SAMPLE_FIELDS if k not in sample]
    problems += [
        f"{k}={sample[k]!r} has the wrong type"
        for k, t in SAMPLE_FIELDS.items()
        if k in sample and (not isinstance(sample[k], t) or (t is int and isinstance(sample[k], bool)))
    ]
    if not problems:
        problems += _semantic_problems(key, files, sample, meta)
    if problems:
        report.errors.append(f"{where}: " + "; ".join(problems))
        return None
    report.samples += 1
    report.seconds += sample["duration"]
    report.with_audio += sample["has_audio"]
    report.captions += len(sample["captions"])
    return sample


def _semantic_problems(key: str, files: dict[str, bytes], sample: dict, meta: dict) -> list[str]:
    problems = []
    if key != sample_key(sample["idx"]):
        problems.append(f"key {key} does not match idx {sample['idx']}")
    audio = [ext for ext in AUDIO_MEMBERS if ext in files]
    if sample["has_audio"] and not audio:
        problems.append("has_audio is true but there is no audio member")
    if not sample["has_audio"] and audio:
        problems.append(f"has_audio is false but there is a .{audio[0]} member")
    if sample["has_audio"] and sample["sample_rate"] != meta["audio"].get("sample_rate"):
        problems.append(f"sample_rate {sample['sample_rate']} != dataset {meta['audio'].get('sample_rate')}")
    if sample["num_frames"] < 1 or sample["width"] < 2 or sample["height"] < 2:
        problems.append(f"empty video ({sample['num_frames']} frames, {sample['width']}x{sample['height']})")
    for c in sample["captions"]:
        timed = isinstance(c, dict) and _is_number(c.get("start")) and _is_number(c.get("end"))
        if not (timed and isinstance(c.get("text"), str) and 0 <= c["start"] <= c["end"]):
            problems.append(f"bad caption {c!r:.120} (needs numbers 0 <= start <= end and a text string)")
        elif c["end"] > sample["duration"] + 1e-3:
            problems.append(f"caption ends at {c['end']} s, after the chunk ({sample['duration']} s)")
    return problems


def _decode_sample(where: str, files: dict[str, bytes], sample: dict, report: InspectReport) -> None:
    import decord

    try:
        reader = decord.VideoReader(io.BytesIO(files["mp4"]), num_threads=1)
        n = len(reader)
        height, width = reader[n - 1].shape[:2]  # the last frame: proves the stream decodes to the end
    except Exception as e:  # decord raises its own untyped errors on broken streams
        report.errors.append(f"{where}.mp4: decord cannot decode it ({e})")
        return
    if abs(n - sample["num_frames"]) > FRAME_TOLERANCE:
        report.errors.append(f"{where}.mp4: {n} frames, json says {sample['num_frames']}")
    if (width, height) != (sample["width"], sample["height"]):
        report.errors.append(f"{where}.mp4: {width}x{height}, json says {sample['width']}x{sample['height']}")
    if not _pyav_decodes(where, files["mp4"], report):
        return
    for ext in AUDIO_MEMBERS:
        if ext in files:
            try:
                audio, rate = soundfile.read(io.BytesIO(files[ext]), dtype="int16")
            except (soundfile.LibsndfileError, RuntimeError) as e:
                report.errors.append(f"{where}.{ext}: cannot decode ({e})")
                return
            seconds = len(audio) / rate
            if audio.ndim != 1 or rate != sample["sample_rate"]:
                report.errors.append(f"{where}.{ext}: shape {audio.shape} at {rate} Hz, expected mono")
            elif abs(seconds - sample["duration"]) > AUDIO_TOLERANCE_S + 1.5 / sample["fps"]:
                report.errors.append(f"{where}.{ext}: {seconds:.3f} s of audio for {sample['duration']:.3f} s of video")
    report.decoded += 1


def _pyav_decodes(where: str, mp4: bytes, report: InspectReport) -> bool:
    """Decode the first and last frames the way training does (PyAV, YUV planes), and check that the video starts
    where the chunk does: a stream stored with a late start (older builds, from sources whose first frames did
    not decode) shows its first picture at 0 in every decoder while its audio and captions start earlier."""
    import av

    from pipeline.video import open_video

    try:
        with av.open(io.BytesIO(mp4)) as container:
            stream = container.streams.video[0]
            late = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        video = open_video(mp4, "pyav", pixels="yuv420")
        video.get_frames(list(range(min(3, video.num_frames))))
        video.get_frames([video.num_frames - 1])
    except Exception as e:  # PyAV's errors, and the source's ValueError for frames it could not find
        report.errors.append(f"{where}.mp4: PyAV (the training decoder) cannot decode it ({e})")
        return False
    if late > 0:
        report.errors.append(
            f"{where}.mp4: the video stream starts at {late:.3f} s, so its audio and captions lead the picture by "
            f"{late:.3f} s (written by an older vatp): rebuild the dataset"
        )
    return True
