"""User inputs -> `SourceList`: a folder of videos with caption sidecars, a CSV/JSONL manifest, or a public corpus.

`read_sources` is the one entry point the builder calls. Readers only check that files exist; probing
and decoding happen in the builder. Inputs that cannot be used become `Failure`s with a short reason:
`missing_file`, `duplicate_id`, `bad_row`. A caption sidecar with nothing usable in it keeps its video
(without those captions) and adds a kept `bad_captions` entry to `SourceList.warnings`. Rows of other
splits (the `split` filter) are left out, counted and logged, not failed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import unicodedata
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from data_prep import adapters
from data_prep.captions import WHOLE_VIDEO_END, captions_from_json, find_caption_sidecar, parse_caption_file
from data_prep.sources import (
    VIDEO_EXTENSIONS,
    Caption,
    Failure,
    SourceItem,
    SourceList,
    normalize_split,
    scan_videos,
)

log = logging.getLogger(__name__)

MANIFEST_NAMES = ("manifest.csv", "manifest.jsonl")
MANIFEST_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
MANIFEST_COLUMNS = ("id", "path", "start", "end", "label", "caption", "split")
JSONL_ONLY_KEYS = ("captions",)
FORMATS = ("auto", "dir", "manifest", *adapters.ADAPTERS)
BAD_CAPTIONS = "bad_captions"


def read_sources(
    input: str | Path, fmt: str = "auto", *, split: str | None = None, videos: str | Path | None = None
) -> SourceList:
    """Read a video directory, a manifest (.csv/.jsonl) or a public-corpus annotation file into a `SourceList`.

    fmt: auto | dir | manifest | howto100m | kinetics | vggsound | msrvtt | youcook2 | ucf101 | hmdb51 (these
    two take their split-list folder or one of its files). `split` keeps only
    items of that split (`training`/`validation`/`testing` match `train`/`val`/`test`). `videos` is the
    folder that manifest paths and corpus video ids resolve against (default: the manifest's or
    annotation file's folder).
    """
    input = Path(input).expanduser()
    if fmt not in FORMATS:
        raise ValueError(f"unknown source format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not input.exists():
        raise ValueError(f"source input not found: {input}")
    root = Path(videos).expanduser() if videos is not None else None
    if root is not None and not root.is_dir():
        raise ValueError(f"videos root is not a directory: {root}")
    if fmt in adapters.ADAPTERS:
        if not input.is_file() and fmt not in adapters.FOLDER_FORMATS:
            raise ValueError(
                f"--format {fmt} (fmt={fmt!r}) expects the corpus annotation file, got a directory: {input}"
            )
        sources, left_out = adapters.ADAPTERS[fmt](input, videos=root or input.parent, split=split)
    else:
        manifest = _find_manifest(input, fmt)
        if manifest is not None:
            sources, left_out = read_manifest(manifest, split=split, videos=root)
        elif root is not None:
            raise ValueError(
                f"--videos-root (videos={str(videos)!r}) only applies to a manifest or a corpus file, not a folder scan"
            )
        else:
            sources, left_out = read_directory(input, split=split)
    _log_summary(input, sources, left_out, split)
    return sources


def _find_manifest(input: Path, fmt: str) -> Path | None:
    if input.is_file():
        if fmt == "dir":
            raise ValueError(f"--format dir expects a directory, got a file: {input}")
        if input.suffix.lower() not in MANIFEST_SUFFIXES:
            raise ValueError(
                f"cannot tell the format of {input}: a manifest is {'/'.join(MANIFEST_SUFFIXES)}; for a corpus "
                f"annotation file pass --format (fmt=) one of {', '.join(adapters.ADAPTERS)}"
            )
        return input
    if fmt == "dir":
        return None
    found = [input / name for name in MANIFEST_NAMES if (input / name).is_file()]
    if len(found) > 1:
        raise ValueError(f"{input} has both {MANIFEST_NAMES[0]} and {MANIFEST_NAMES[1]}: pass the one to use")
    if not found and fmt == "manifest":
        raise ValueError(f"--format manifest but {input} has no {' or '.join(MANIFEST_NAMES)}")
    return found[0] if found else None


def read_directory(root: Path, *, split: str | None = None) -> tuple[SourceList, int]:
    """Every video under `root` (recursive, sorted) with its caption sidecar; id = relative path without suffix."""
    if split is not None:
        raise ValueError(f"split={split!r} needs a manifest or a corpus annotation file: a folder scan has no splits")
    paths, hidden, others = scan_videos(root)
    if hidden:
        log.warning("%s: skipped %d hidden file(s)/folder(s) (names starting with '.')", root, hidden)
    if not paths:
        log.warning("%s: no video files found (extensions: %s)", root, ", ".join(VIDEO_EXTENSIONS))
    sources, seen, listings = SourceList(), set(), {}
    for path in others:  # counted and listed, never silently dropped
        ext = path.suffix.lower() or "(none)"
        detail = f"extension {ext} is not a video container the folder scan takes; name it in a manifest to try it"
        sources.failures.append(Failure(str(path), "not_a_video_file", detail))
    for path in tqdm(paths, desc="scan", unit="video", leave=False, disable=None):
        vid = path.relative_to(root).with_suffix("").as_posix()
        if vid in seen:
            sources.failures.append(Failure(str(path), "duplicate_id", f"id {vid!r} is taken by a same-stem file"))
            continue
        seen.add(vid)
        captions, label = _with_sidecar(path, [], None, listings, sources.warnings)
        sources.items.append(SourceItem(id=vid, path=os.path.abspath(path), captions=captions, label=label))
    return sources, 0


def read_manifest(manifest: Path, *, split: str | None = None, videos: Path | None = None) -> tuple[SourceList, int]:
    """Rows of a CSV/TSV/JSONL/JSON manifest -> items; relative paths resolve against `videos`, else its folder."""
    rows, sources = _load_rows(manifest)
    wanted = normalize_split(split)
    base, seen, left_out, listings = videos or manifest.parent, set(), 0, {}
    for line, row in tqdm(rows, desc="manifest", unit="row", leave=False, disable=None):
        if wanted is not None and normalize_split(row.get("split")) != wanted:
            left_out += 1
            continue
        unit = "row" if manifest.suffix.lower() == ".json" else "line"
        result = _manifest_item(row, f"{manifest.name} {unit} {line}", base, seen, listings, sources.warnings)
        (sources.items if isinstance(result, SourceItem) else sources.failures).append(result)
    return sources, left_out


def _load_rows(manifest: Path) -> tuple[list[tuple[int, dict]], SourceList]:
    """All rows with their line numbers; unknown columns fail here, before any row is used."""
    sources, rows = SourceList(), []
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{manifest}: manifest is not UTF-8 ({e})") from e
    suffix = manifest.suffix.lower()
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")
        if reader.fieldnames is None:
            raise ValueError(f"{manifest}: empty manifest (expected a header with columns id,path,...)")
        reader.fieldnames = [name.strip() for name in reader.fieldnames]
        _check_columns(manifest, reader.fieldnames, MANIFEST_COLUMNS)
        for row in reader:
            if None in row:  # more cells than header columns
                where = f"{manifest.name} line {reader.line_num}"
                sources.failures.append(Failure(where, "bad_row", f"{where}: more cells than columns"))
                continue
            rows.append((reader.line_num, row))
        return rows, sources
    keys: dict[str, int] = {}
    unit = "row" if suffix == ".json" else "line"
    for line, row in _json_rows(manifest, text, sources):
        where = f"{manifest.name} {unit} {line}"
        if not isinstance(row, dict):
            sources.failures.append(Failure(where, "bad_row", f"{where}: expected a JSON object"))
            continue
        for key in row:
            keys.setdefault(key, line)
        rows.append((line, row))
    _check_columns(manifest, list(keys), MANIFEST_COLUMNS + JSONL_ONLY_KEYS, keys)
    return rows, sources


def _json_rows(manifest: Path, text: str, sources: SourceList) -> list[tuple[int, object]]:
    """JSONL: one object per line (bad lines become failures); JSON: one list of objects, numbered from 1."""
    if manifest.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest}: not valid JSON: {e}") from e
        if not isinstance(data, list):
            raise ValueError(
                f"{manifest}: a JSON manifest is a list of rows; for a corpus annotation file pass --format "
                f"(fmt=) one of {', '.join(adapters.ADAPTERS)}"
            )
        return list(enumerate(data, start=1))
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            rows.append((line, json.loads(raw)))
        except json.JSONDecodeError as e:
            where = f"{manifest.name} line {line}"
            sources.failures.append(Failure(where, "bad_row", f"{where}: not valid JSON: {e}"))
    return rows


def _check_columns(manifest: Path, names: list[str], allowed: tuple[str, ...], lines: dict | None = None) -> None:
    for name in names:
        if name not in allowed:
            where = f" (first in row/line {lines[name]})" if lines else ""
            hint = adapters.guess_format(names)
            hint = f"; this looks like a {hint} file: pass --format {hint} (fmt={hint!r})" if hint else ""
            raise ValueError(
                f"{manifest}: unknown manifest column {name!r}{where}; allowed: {', '.join(allowed)}{hint}"
            )
    for name in ("id", "path"):
        if lines is None and name not in names:
            raise ValueError(f"{manifest}: manifest has no {name!r} column (columns: {', '.join(names)})")


def _manifest_item(
    row: dict, where: str, base: Path, seen: set[str], listings: dict, warnings: list[Failure]
) -> SourceItem | Failure:
    vid, rel = _text(row.get("id")), _text(row.get("path"))
    if not vid or not rel:
        return Failure(rel or where, "bad_row", f"{where}: empty {'id' if not vid else 'path'}")
    if vid in seen:
        return Failure(rel, "duplicate_id", f"{where}: id {vid!r} already used by an earlier row")
    seen.add(vid)
    try:
        start, end = _bound(row.get("start"), "start"), _bound(row.get("end"), "end")
        if start is not None and end is not None and end <= start:
            raise ValueError(f"end {end} <= start {start}")
        inline = captions_from_json(row.get("captions") or [])
    except ValueError as e:
        return Failure(rel, "bad_row", f"{where}: {e}")
    if inline.skipped:
        log.warning("%s: skipped %d malformed caption(s) in 'captions'", where, inline.skipped)
    path = _resolve(base, rel)
    if path is None:
        return Failure(rel, "missing_file", f"{where}: no file at {base / rel}")
    captions = list(inline.captions)
    caption = _text(row.get("caption"))
    if caption:
        captions.append(Caption(start or 0.0, WHOLE_VIDEO_END if end is None else end, " ".join(caption.split())))
    captions, label = _with_sidecar(path, captions, _text(row.get("label")) or None, listings, warnings)
    split = normalize_split(_text(row.get("split")) or None)
    return SourceItem(id=vid, path=str(path), start=start, end=end, captions=captions, label=label, split=split)


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _bound(value: object, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number of seconds") from None
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"{name} {value!r} must be a finite, non-negative number of seconds")
    return t


def _resolve(base: Path, rel: str) -> Path | None:
    """Absolute path of an existing file, also trying the other Unicode normalisation (macOS writes NFD names)."""
    for form in (rel, unicodedata.normalize("NFC", rel), unicodedata.normalize("NFD", rel)):
        path = Path(form).expanduser()
        path = path if path.is_absolute() else base / path
        if path.is_file():
            return Path(os.path.abspath(path))
    return None


def _with_sidecar(
    video: Path, captions: list[Caption], label: str | None, listings: dict, warnings: list[Failure]
) -> tuple[tuple[Caption, ...], str | None]:
    """Add the captions (and JSON label, unless one is given) of the sidecar next to `video`.

    A sidecar with nothing usable (empty, unreadable, every block malformed) adds a kept `bad_captions`
    warning; a Latin-1 file that decodes is fine (the fallback is only logged).
    """
    sidecar = find_caption_sidecar(video, listings)
    if sidecar is not None:
        parsed = parse_caption_file(sidecar)
        captions = captions + parsed.captions
        label = label if label is not None else parsed.label
        if not parsed.captions:
            why = parsed.error or (f"{parsed.skipped} malformed block(s)" if parsed.skipped else "no caption in it")
            detail = f"caption sidecar {sidecar.name}: {why}; the video was kept without those captions"
            warnings.append(Failure(os.path.abspath(video), BAD_CAPTIONS, detail, kept=True))
    captions.sort(key=lambda c: (c.start, c.end))
    return tuple(captions), label


def _log_summary(input: Path, sources: SourceList, left_out: int, split: str | None) -> None:
    reasons = Counter(f.reason for f in sources.failures)
    captioned = sum(1 for item in sources.items if item.captions)
    log.info(
        "%s: %d item(s) (%d with captions), %d failure(s)%s%s%s",
        input,
        len(sources.items),
        captioned,
        len(sources.failures),
        f" {dict(reasons)}" if reasons else "",
        f", {left_out} left out (split != {split!r})" if left_out else "",
        f", {len(sources.warnings)} unusable caption sidecar(s)" if sources.warnings else "",
    )
    for failure in sources.failures[:5]:
        log.warning("skipped %s: %s (%s)", failure.source, failure.reason, failure.detail)
    if len(sources.failures) > 5:
        log.warning("... and %d more skipped input(s)", len(sources.failures) - 5)
