"""Caption sidecars -> `Caption`s: SRT, WebVTT, HowTo100M-style CSV, plain text and JSON.

Parsing is forgiving by design: subtitle files found next to downloaded videos are often broken
(BOMs, CRLF, Latin-1, missing SRT index lines, VTT styling). Malformed blocks are skipped and
counted; an empty or unparseable file gives no captions and a warning, never an exception.
`parse_caption_file` returns the counts as well, so callers can tell "no sidecar" from "a sidecar
with nothing usable in it" (what the builder records as `bad_captions`).

Captions that span the whole video (a `.txt` line, a manifest `caption`, an MSR-VTT sentence) end
at `WHOLE_VIDEO_END` (infinity); `clip_captions` cuts them to each chunk.
"""

from __future__ import annotations

import bisect
import csv
import html
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from data_prep.sources import CAPTION_EXTENSIONS, Caption

log = logging.getLogger(__name__)

WHOLE_VIDEO_END = math.inf
MAX_CAPTION_BYTES = 64 << 20  # a bigger "sidecar" is not a subtitle file; do not read it into memory

_TAG = re.compile(r"<[^>]*>|\{\\[^}]*\}")  # HTML-ish tags, VTT voice/class/timestamp tags, ASS {\an8}
_TIME = re.compile(r"^(?:(\d+):)?(\d{1,2}):(\d{1,2})(?:[.,](\d+))?$")
_VTT_SKIP_BLOCKS = ("WEBVTT", "NOTE", "STYLE", "REGION")


@dataclass
class CaptionParseResult:
    """What one caption file held: usable captions, how many blocks/rows were skipped, the text encoding used."""

    captions: list[Caption] = field(default_factory=list)
    skipped: int = 0
    encoding: str = "utf-8"
    label: str | None = None  # only JSON sidecars carry one
    error: str | None = None  # set when the whole file was unreadable


def parse_captions(path: str | Path) -> list[Caption]:
    """Captions of one sidecar file (.srt .vtt .csv .txt .json), sorted by start; [] if none are usable."""
    return parse_caption_file(path).captions


def parse_caption_file(path: str | Path) -> CaptionParseResult:
    """Parse a sidecar and report skipped blocks, the encoding and any label; bad content warns, never raises."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in CAPTION_EXTENSIONS:
        raise ValueError(f"{path}: unsupported caption extension {ext!r} (expected one of {CAPTION_EXTENSIONS})")
    try:
        text, encoding = _read_text(path)
    except OSError as e:
        log.warning("%s: cannot read captions: %s", path, e)
        return CaptionParseResult(error=str(e))
    parser = {".srt": _parse_cues, ".vtt": _parse_cues, ".csv": _parse_csv, ".txt": _parse_txt, ".json": _parse_json}
    try:
        result = parser[ext](text)
    except ValueError as e:
        log.warning("%s: unparseable captions (%s); using none", path, e)
        return CaptionParseResult(encoding=encoding, error=str(e))
    result.encoding = encoding
    result.captions.sort(key=lambda c: (c.start, c.end))  # stable: ties keep file order
    if result.skipped:
        log.warning("%s: skipped %d malformed caption block(s)", path, result.skipped)
    if not result.captions:
        log.warning("%s: no usable captions", path)
    return result


def clip_captions(captions: list[Caption] | tuple[Caption, ...], start: float, end: float) -> list[Caption]:
    """Captions overlapping [start, end), cut to it and re-timed relative to `start`; the rest are dropped."""
    if end <= start:
        raise ValueError(f"clip_captions: empty window [{start}, {end})")
    out = []
    for c in captions:
        if c.end <= start or c.start >= end:
            continue
        out.append(Caption(max(c.start, start) - start, min(c.end, end) - start, c.text))
    return out


def find_caption_sidecar(video: str | Path, listings: dict[Path, list[str]] | None = None) -> Path | None:
    """The caption file next to `video`: same stem (`clip.srt`), else a language variant (`clip.en.vtt`).

    `listings` caches sorted folder listings across calls, so scanning N videos in one folder lists it
    once instead of N times; pass a fresh dict per scan (it is not invalidated when files change).
    """
    video = Path(video)
    folder = video.parent
    try:
        names = listings[folder] if listings is not None and folder in listings else sorted(os.listdir(folder))
    except OSError:
        return None
    if listings is not None:
        listings[folder] = names
    stem, prefix = video.stem, video.stem + "."
    matches = []
    for i in range(bisect.bisect_left(names, stem), len(names)):  # names sharing the stem sit together
        if not names[i].startswith(stem):
            break
        if names[i].startswith(prefix) and os.path.splitext(names[i])[1].lower() in CAPTION_EXTENSIONS:
            matches.append(names[i])
    for ext in CAPTION_EXTENSIONS:
        for name in (stem + ext, stem + ext.upper()):
            if name in matches and (folder / name).is_file():
                return folder / name
    # yt-dlp writes `<id>.<lang>.vtt`; prefer English, then the first in sorted order.
    langs = [n for n in matches if _is_lang_tag(n[len(prefix) :])]
    langs.sort(key=lambda n: (not n[len(prefix) :].lower().startswith("en"), n))
    return folder / langs[0] if langs else None


def _is_lang_tag(rest: str) -> bool:
    tag = rest.rsplit(".", 1)[0]
    return re.fullmatch(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*", tag) is not None


def _read_text(path: Path) -> tuple[str, str]:
    if path.stat().st_size > MAX_CAPTION_BYTES:
        raise OSError(f"larger than {MAX_CAPTION_BYTES >> 20} MiB")
    raw = path.read_bytes()
    try:
        text, encoding = raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError:
        # Old subtitle files are often Windows/Latin-1; latin-1 decodes any byte string.
        text, encoding = raw.decode("latin-1"), "latin-1"
        log.info("%s: not valid UTF-8, read as Latin-1", path)
    return text.replace("\r\n", "\n").replace("\r", "\n"), encoding


def _clean(text: str) -> str:
    return " ".join(html.unescape(_TAG.sub("", text)).split())


def _parse_time(s: str) -> float:
    m = _TIME.match(s.strip())
    if not m:
        raise ValueError(f"bad timestamp {s!r}")
    h, mnt, sec, frac = m.groups()
    return int(h or 0) * 3600 + int(mnt) * 60 + int(sec) + (float("0." + frac) if frac else 0.0)


def _parse_timing(line: str) -> tuple[float, float]:
    left, right = line.split("-->", 1)
    right = right.split()  # VTT cue settings follow the end time
    if not left.split() or not right:
        raise ValueError(f"bad timing line {line!r}")
    return _parse_time(left.split()[-1]), _parse_time(right[0])


def _parse_cues(text: str) -> CaptionParseResult:
    """SRT and WebVTT share one line-based parser: a cue starts at a `-->` line and ends at a blank line."""
    res = CaptionParseResult()
    lines = text.split("\n")
    cue: list | None = None  # [start, end, text lines]
    orphan = False  # non-cue text seen in the current block
    skip_block = False  # inside a VTT header/NOTE/STYLE/REGION block, or after a bad timing line

    def flush():
        nonlocal cue
        if cue is not None:
            body = _clean(" ".join(cue[2]))
            if body and cue[1] > cue[0]:
                res.captions.append(Caption(cue[0], cue[1], body))
            else:
                res.skipped += 1
        cue = None

    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            flush()
            if orphan:
                res.skipped += 1
            orphan = skip_block = False
            continue
        if "-->" in line:
            flush()
            orphan = skip_block = False
            try:
                start, end = _parse_timing(line)
            except ValueError:
                res.skipped += 1
                skip_block = True
                continue
            cue = [start, end, []]
            continue
        if skip_block:
            continue
        next_is_timing = i + 1 < len(lines) and "-->" in lines[i + 1]
        if next_is_timing and (cue is None or line.isdigit()):
            continue  # an SRT index or VTT cue identifier (possibly with the blank line before it missing)
        if cue is not None:
            cue[2].append(line)
        elif line.split(" ", 1)[0].split("\t", 1)[0] in _VTT_SKIP_BLOCKS:
            skip_block = True
        else:
            orphan = True
    flush()
    if orphan:
        res.skipped += 1
    return res


def _parse_csv(text: str) -> CaptionParseResult:
    """HowTo100M-style `start,end,text` rows; the header is optional."""
    res = CaptionParseResult()
    rows = [r for r in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in r)]
    if rows and [c.strip().lower() for c in rows[0][:3]] == ["start", "end", "text"]:
        rows = rows[1:]
    for row in rows:
        try:
            start, end = float(row[0]), float(row[1])
            body = _clean(",".join(row[2:]))
        except (ValueError, IndexError):
            res.skipped += 1
            continue
        _append(res, start, end, body)
    return res


def _parse_txt(text: str) -> CaptionParseResult:
    """Every non-empty line is one caption for the whole video."""
    res = CaptionParseResult()
    for line in text.split("\n"):
        body = _clean(line)
        if body:
            res.captions.append(Caption(0.0, WHOLE_VIDEO_END, body))
    return res


def _parse_json(text: str) -> CaptionParseResult:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from e
    return captions_from_json(data)


def captions_from_json(data: object) -> CaptionParseResult:
    """Captions from parsed JSON: a list of {start, end, text} (or of strings), or {"captions": [...], "label": ...}.

    A missing `start` means 0 and a missing `end` the end of the video; bad entries are skipped and counted.
    Raises ValueError when `data` has neither shape.
    """
    res = CaptionParseResult()
    if isinstance(data, dict):
        label = data.get("label")
        res.label = None if label is None else str(label)
        data = data.get("captions", [])
    if not isinstance(data, list):
        raise ValueError(f"expected a list of captions, got {type(data).__name__}")
    for entry in data:
        if isinstance(entry, str):
            entry = {"text": entry}
        if not isinstance(entry, dict) or not isinstance(entry.get("text"), str):
            res.skipped += 1
            continue
        try:
            start = float(entry["start"]) if entry.get("start") is not None else 0.0
            end = float(entry["end"]) if entry.get("end") is not None else WHOLE_VIDEO_END
        except (TypeError, ValueError):
            res.skipped += 1
            continue
        _append(res, start, end, _clean(entry["text"]))
    return res


def _append(res: CaptionParseResult, start: float, end: float, body: str) -> None:
    if body and math.isfinite(start) and start >= 0 and end > start:
        res.captions.append(Caption(start, end, body))
    else:
        res.skipped += 1
