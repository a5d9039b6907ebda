"""Public-corpus annotation files -> `SourceList`: HowTo100M, Kinetics, VGGSound, MSR-VTT, YouCook2, UCF101, HMDB51.

Each adapter reads the corpus's own annotation file as published and looks the videos up by file
stem anywhere under a video root (recursive, so `<root>/<split>/<class>/<id>.mp4` layouts work too).
Every function returns `(sources, left_out)`: the items and failures, and how many rows the `split`
filter left out. Splits are stored in short form (`train`/`val`/`test`, see `normalize_split`).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from data_prep.captions import captions_from_json
from data_prep.sources import Caption, Failure, SourceItem, SourceList, normalize_split, scan_videos

log = logging.getLogger(__name__)

VGGSOUND_CLIP_SECONDS = 10.0


class _Collector:
    """Video files under a root, by stem, and the `SourceList` being filled from annotation rows.

    When a stem occurs twice under the root, the first path in sorted order wins (logged).
    """

    def __init__(self, root: Path):
        if not root.is_dir():
            raise ValueError(f"video root is not a directory: {root}")
        self.root, self.sources, self.seen = root, SourceList(), set()
        self.by_stem: dict[str, Path] = {}
        paths, _, _ = scan_videos(root)
        clashes = 0
        for path in paths:
            if path.stem in self.by_stem:
                clashes += 1
                continue
            self.by_stem[path.stem] = Path(os.path.abspath(path))
        if clashes:
            log.warning("%s: %d video file(s) share a stem with another one and are ignored", root, clashes)

    def fail(self, source: str, reason: str, detail: str) -> None:
        self.sources.failures.append(Failure(source, reason, detail))

    def add(
        self,
        vid: str,
        stems: list[str],
        *,
        bounds: tuple[float, float] | None = None,
        captions: list[Caption] | None = None,
        label: str | None = None,
        split: str | None = None,
    ) -> None:
        """Add an item for the first of `stems` with a video; the last stem is the uncut video, cut to `bounds`."""
        if not vid:
            return self.fail(str(self.root), "bad_row", "empty video id")
        if vid in self.seen:
            return self.fail(vid, "duplicate_id", f"id {vid!r} appears more than once")
        self.seen.add(vid)
        stem = next((s for s in stems if s in self.by_stem), None)
        if stem is None:
            tried = ", ".join(f"{s}.*" for s in dict.fromkeys(stems))
            return self.fail(vid, "missing_file", f"none of {tried} under {self.root}")
        path = self.by_stem[stem]
        start, end = bounds if bounds is not None and stem == stems[-1] else (None, None)
        item = SourceItem(vid, str(path), start, end, tuple(captions or ()), label, split)
        self.sources.items.append(item)


def read_howto100m(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """HowTo100M `caption.json`: {video_id: {"start": [...], "end": [...], "text": [...]}}; no labels, no splits."""
    _no_split("howto100m", split)
    data = _load_json(annotation, dict)
    out, skipped = _Collector(videos), 0
    for vid, entry in tqdm(data.items(), desc="howto100m", unit="video", leave=False, disable=None):
        fields = [entry.get(k) if isinstance(entry, dict) else None for k in ("start", "end", "text")]
        if not all(isinstance(f, list) for f in fields) or len({len(f) for f in fields}) != 1:
            out.fail(vid, "bad_row", "start/end/text must be lists of the same length")
            continue
        parsed = captions_from_json([{"start": s, "end": e, "text": t} for s, e, t in zip(*fields)])
        skipped += parsed.skipped
        out.add(vid, [vid], captions=parsed.captions)
    if skipped:
        log.warning("%s: skipped %d empty or mistimed caption(s)", annotation, skipped)
    return out.sources, 0


def read_kinetics(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """Kinetics CSV (label,youtube_id,time_start,time_end,split[,is_cc]); clips `<ytid>_<s:06d>_<e:06d>` or `<ytid>`.

    A pre-cut clip is used whole; a full `<ytid>` video is bounded to [time_start, time_end].
    """
    out, wanted, left_out = _Collector(videos), normalize_split(split), 0
    with open(annotation, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"youtube_id", "time_start", "time_end"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{annotation}: not a Kinetics CSV, missing column(s) {sorted(missing)}")
        for row in tqdm(reader, desc="kinetics", unit="clip", leave=False, disable=None):
            row_split = normalize_split(row.get("split"))
            if wanted is not None and row_split != wanted:
                left_out += 1
                continue
            ytid = (row["youtube_id"] or "").strip()
            try:
                if not ytid:
                    raise ValueError("empty youtube_id")
                t0, t1 = float(row["time_start"]), float(row["time_end"])
            except (TypeError, ValueError):
                where = f"{annotation.name} line {reader.line_num}"
                out.fail(ytid or where, "bad_row", f"{where}: bad youtube_id/time_start/time_end")
                continue
            clip = f"{ytid}_{int(t0):06d}_{int(t1):06d}"
            label = (row.get("label") or "").strip() or None
            out.add(clip, [clip, ytid], bounds=(t0, t1), label=label, split=row_split)
    return out.sources, left_out


def read_vggsound(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """VGGSound CSV, no header: youtube_id,start_seconds,label,split; 10 s clips `<ytid>_<start:06d>` or `<ytid>`."""
    out, wanted, left_out = _Collector(videos), normalize_split(split), 0
    with open(annotation, newline="", encoding="utf-8-sig") as f:
        for line, row in enumerate(tqdm(csv.reader(f), desc="vggsound", unit="clip", leave=False, disable=None), 1):
            if not row or not any(cell.strip() for cell in row):
                continue
            row = [cell.strip() for cell in row] + [""] * (4 - len(row))
            ytid, start_text, label, row_split = row[:4]
            try:
                start = float(start_text)
            except ValueError:
                if line == 1:
                    continue  # a header some re-distributions add
                out.fail(ytid, "bad_row", f"{annotation.name} line {line}: bad start")
                continue
            row_split = normalize_split(row_split)
            if wanted is not None and row_split != wanted:
                left_out += 1
                continue
            s, e = int(start), int(start + VGGSOUND_CLIP_SECONDS)
            clip = f"{ytid}_{s:06d}"
            stems = [clip, f"{clip}_{e:06d}", f"{ytid}_{s}", ytid]
            bounds = (start, start + VGGSOUND_CLIP_SECONDS)
            out.add(clip, stems, bounds=bounds, label=label or None, split=row_split)
    return out.sources, left_out


def read_msrvtt(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """MSR-VTT videodatainfo JSON ({"videos": [...], "sentences": [...]}): one item per video, all its captions.

    Captions span the whole clip; the JSON's "start time"/"end time" refer to the YouTube source and are
    not used, since the distributed `videoN.mp4` files are already cut. The label is the category number.
    """
    data = _load_json(annotation, dict)
    if not isinstance(data.get("videos"), list) or not isinstance(data.get("sentences"), list):
        raise ValueError(f"{annotation}: not an MSR-VTT file (expected 'videos' and 'sentences' lists)")
    texts: dict[str, list[str]] = defaultdict(list)
    for sentence in data["sentences"]:
        if isinstance(sentence, dict) and isinstance(sentence.get("caption"), str):
            texts[str(sentence.get("video_id"))].append(sentence["caption"])
    out, wanted, left_out = _Collector(videos), normalize_split(split), 0
    for video in tqdm(data["videos"], desc="msrvtt", unit="video", leave=False, disable=None):
        if not isinstance(video, dict):
            out.fail(str(annotation), "bad_row", f"a 'videos' entry is not an object: {video!r:.80}")
            continue
        vid, row_split = str(video.get("video_id", "")), normalize_split(video.get("split"))
        if wanted is not None and row_split != wanted:
            left_out += 1
            continue
        captions = captions_from_json([{"text": t} for t in texts.get(vid, [])]).captions
        category = video.get("category")
        label = None if category is None else str(category)
        out.add(vid, [vid], captions=captions, label=label, split=row_split)
    orphans = len(set(texts) - {str(v.get("video_id")) for v in data["videos"] if isinstance(v, dict)})
    if orphans:
        log.warning("%s: sentences for %d video id(s) not in 'videos' are ignored", annotation, orphans)
    return out.sources, left_out


def read_msrvtt_1ka(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """The MSR-VTT 1k-A test list (JSFusion's `MSRVTT_JSFUSION_test.csv`: key,vid_key,video_id,sentence), the test
    set of JSFusion, CLIP4Clip and MIL-NCE's evaluation: one item per row, its one sentence over the whole clip."""
    if split is not None and normalize_split(split) != "test":
        raise ValueError(f"split={split!r}: the 1k-A list is a test set")
    out = _Collector(videos)
    with open(annotation, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"video_id", "sentence"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{annotation}: not the MSR-VTT 1k-A list, missing column(s) {sorted(missing)}")
        for row in reader:
            vid = (row["video_id"] or "").strip()
            captions = captions_from_json([{"text": row["sentence"] or ""}]).captions
            out.add(vid, [vid], captions=captions, split="test")
    return out.sources, 0


def read_youcook2(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """YouCook2 `youcookii_annotations_*.json`: {"database": {vid: {subset, recipe_type, annotations}}}.

    One item per video; each annotation's `segment` [start, end] and `sentence` is a timed caption
    (the test file has segments without sentences: those give no captions). Label = recipe_type.
    """
    data = _load_json(annotation, dict)
    if not isinstance(data.get("database"), dict):
        raise ValueError(f"{annotation}: not a YouCook2 file (expected a 'database' mapping)")
    out, wanted, left_out = _Collector(videos), normalize_split(split), 0
    untexted = 0
    for vid, entry in tqdm(data["database"].items(), desc="youcook2", unit="video", leave=False, disable=None):
        if not isinstance(entry, dict):
            out.fail(vid, "bad_row", "database entry is not an object")
            continue
        row_split = normalize_split(entry.get("subset"))
        if wanted is not None and row_split != wanted:
            left_out += 1
            continue
        timed = []
        for ann in entry.get("annotations") or []:
            segment = ann.get("segment") if isinstance(ann, dict) else None
            if isinstance(segment, list) and len(segment) == 2 and isinstance(ann.get("sentence"), str):
                timed.append({"start": segment[0], "end": segment[1], "text": ann["sentence"]})
            else:
                untexted += 1
        captions = captions_from_json(timed).captions
        recipe = entry.get("recipe_type")
        label = None if recipe is None else str(recipe)
        out.add(vid, [vid], captions=captions, label=label, split=row_split)
    if untexted:
        log.info("%s: %d segment(s) without a sentence give no caption", annotation, untexted)
    return out.sources, left_out


def read_youcook2_clips(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """YouCook2 as its retrieval benchmark: one item per annotated step (`segment` [start, end] of the full video,
    its `sentence` the one caption over the whole clip), id `<vid>_<annotation id>`, label = recipe_type. The
    3350 validation clips of MIL-NCE's `validation_youcook.csv` are the `val` split of this reading."""
    data = _load_json(annotation, dict)
    if not isinstance(data.get("database"), dict):
        raise ValueError(f"{annotation}: not a YouCook2 file (expected a 'database' mapping)")
    out, wanted, left_out = _Collector(videos), normalize_split(split), 0
    for vid, entry in data["database"].items():
        row_split = normalize_split(entry.get("subset")) if isinstance(entry, dict) else None
        if wanted is not None and row_split != wanted:
            left_out += 1
            continue
        for ann in entry.get("annotations") or [] if isinstance(entry, dict) else []:
            segment = ann.get("segment") if isinstance(ann, dict) else None
            if not (isinstance(segment, list) and len(segment) == 2 and isinstance(ann.get("sentence"), str)):
                out.fail(f"{vid}_{ann.get('id') if isinstance(ann, dict) else '?'}", "bad_row", "no segment/sentence")
                continue
            start, end = float(segment[0]), float(segment[1])
            captions = captions_from_json([{"text": ann["sentence"]}]).captions
            label = None if entry.get("recipe_type") is None else str(entry["recipe_type"])
            out.add(
                f"{vid}_{ann.get('id')}", [vid], bounds=(start, end), captions=captions, label=label, split=row_split
            )
    return out.sources, left_out


YOUCOOK2_WINDOW_SECONDS = 3.3  # eval_youcook.py decodes 16 frames at 5 fps from `t = 3.2 + 0.1` s of video


def read_youcook2_milnce(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """MIL-NCE's `validation_youcook.csv` (columns end,start,task,text,video_id; 3,350 validation steps of YouCook2
    not in HowTo100M): one item per row, id `<video_id>_<row>`, the step `[start, end]` of the full video with its
    caption timed over it, label = task (the recipe type), split `val`.

    The clip runs on to `start + 3.3` s where the step is shorter: MIL-NCE's evaluator decodes each 3.3-s window
    from the whole video, so a short step's windows show the frames that follow it."""
    out, wanted = _Collector(videos), normalize_split(split)
    if wanted not in (None, "val"):
        raise ValueError(f"split={split!r}: {annotation.name} lists validation steps only")
    with open(annotation, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"start", "end", "task", "text", "video_id"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{annotation}: not MIL-NCE's validation_youcook.csv (no column {sorted(missing)[0]!r})")
        for row_number, row in enumerate(reader):
            vid = (row["video_id"] or "").strip()
            try:
                start, end = float(row["start"]), float(row["end"])
            except ValueError:
                out.fail(f"{vid}_{row_number:04d}", "bad_row", f"{annotation.name} row {row_number}: bad start/end")
                continue
            if not vid or end < start or not (row["text"] or "").strip():
                out.fail(f"{vid}_{row_number:04d}", "bad_row", f"{annotation.name} row {row_number}: {row!r:.80}")
                continue
            caption = Caption(start, end, row["text"].strip())
            bounds = (start, max(end, start + YOUCOOK2_WINDOW_SECONDS))
            task = (row["task"] or "").strip() or None
            out.add(f"{vid}_{row_number:04d}", [vid], bounds=bounds, captions=[caption], label=task, split="val")
    return out.sources, 0


def read_ave(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """AVE's `Annotations.txt` or one of its split files (`trainSet.txt`, `valSet.txt`, `testSet.txt`), lines
    `Category&VideoID&Quality&StartTime&EndTime` (a header line starting `Category&` is skipped): one item per
    video (the whole 10 s; the event bounds are not used), label = Category, split = the file's."""
    file_split = {"trainset": "train", "valset": "val", "testset": "test"}.get(Path(annotation).stem.lower())
    out, wanted, left_out = _Collector(videos), normalize_split(split), 0
    for number, line in enumerate(_lines(Path(annotation)), 1):
        fields = [f.strip() for f in line.split("&")]
        if number == 1 and fields[0].lower() == "category":
            continue
        if len(fields) != 5 or not fields[1]:
            out.fail(f"{Path(annotation).name}:{number}", "bad_row", f"expected 5 '&'-separated fields: {line!r:.80}")
            continue
        if wanted is not None and file_split != wanted:
            left_out += 1
            continue
        out.add(fields[1], [fields[1]], label=fields[0], split=file_split)
    return out.sources, left_out


def read_ucf101(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """UCF101's `ucfTrainTestlist/`: `classInd.txt` ("1 ApplyEyeMakeup"), `trainlist0N.txt`
    ("ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1") and `testlist0N.txt` (the path only).

    `annotation` is the folder (split 1) or one of its list files (that file's split N, both lists read).
    The label is the class name; a class that `classInd.txt` does not list is a failed row.
    """
    folder, fold = _split_folder(annotation, "list0", ".txt")
    classes = {}
    for line in _lines(folder / "classInd.txt"):
        number, _, name = line.partition(" ")
        classes[name.strip()] = number
    out, wanted, left_out = _Collector(videos), normalize_split(split), 0
    for row_split, name in (("train", f"trainlist0{fold}.txt"), ("test", f"testlist0{fold}.txt")):
        for line in _lines(folder / name):
            if wanted is not None and row_split != wanted:
                left_out += 1
                continue
            rel = line.split()[0]
            label, _, file = rel.rpartition("/")
            stem = Path(file).stem
            if label not in classes:
                out.fail(stem or line, "bad_row", f"{name}: class {label!r} is not in classInd.txt")
                continue
            out.add(stem, [stem], label=label, split=row_split)
    return out.sources, left_out


def read_hmdb51(annotation: Path, *, videos: Path, split: str | None = None) -> tuple[SourceList, int]:
    """HMDB51's `testTrainMulti_7030_splits/`: one `<class>_test_split<N>.txt` per class and split, lines
    "<video>.avi <k>" with k = 1 train, 2 test, 0 not used (left out, counted).

    `annotation` is the folder (split 1) or one of its files (that file's split N, every class read).
    """
    folder, fold = _split_folder(annotation, "_test_split", ".txt")
    files = sorted(folder.glob(f"*_test_split{fold}.txt"))
    if not files:
        raise ValueError(f"{folder}: no *_test_split{fold}.txt files (not HMDB51's testTrainMulti_7030_splits)")
    out, wanted, left_out = _Collector(videos), normalize_split(split), 0
    for path in files:
        label = path.name[: -len(f"_test_split{fold}.txt")]
        for line in _lines(path):
            file, _, kind = line.rpartition(" ")
            row_split = {"1": "train", "2": "test"}.get(kind.strip())
            if row_split is None or (wanted is not None and row_split != wanted):
                left_out += 1
                continue
            stem = Path(file.strip()).stem
            out.add(stem, [stem], label=label, split=row_split)
    return out.sources, left_out


def _split_folder(annotation: Path, marker: str, suffix: str) -> tuple[Path, int]:
    """The split-list folder and split number of an `annotation` that is the folder (split 1) or a list file."""
    annotation = Path(annotation)
    if annotation.is_dir():
        return annotation, 1
    name = annotation.name
    at = name.rfind(marker)
    digit = name[at + len(marker) : -len(suffix)] if at >= 0 and name.endswith(suffix) else ""
    if not digit.isdigit() or not 1 <= int(digit) <= 3:
        raise ValueError(f"{annotation}: expected the split-list folder or one of its split files (split 1-3)")
    return annotation.parent, int(digit)


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise ValueError(f"{path} not found")
    return [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]


FOLDER_FORMATS = ("ucf101", "hmdb51")  # their annotation is a folder of split lists

ADAPTERS: dict[str, Callable[..., tuple[SourceList, int]]] = {
    "howto100m": read_howto100m,
    "kinetics": read_kinetics,
    "vggsound": read_vggsound,
    "msrvtt": read_msrvtt,
    "msrvtt_1ka": read_msrvtt_1ka,
    "youcook2": read_youcook2,
    "youcook2_clips": read_youcook2_clips,
    "youcook2_milnce": read_youcook2_milnce,
    "ave": read_ave,
    "ucf101": read_ucf101,
    "hmdb51": read_hmdb51,
}


def guess_format(columns: list[str]) -> str | None:
    """The corpus a CSV header/JSONL key set most likely comes from (for error hints), or None."""
    if {"youtube_id", "time_start", "time_end"} <= set(columns):
        return "kinetics"
    return None


def _no_split(fmt: str, split: str | None) -> None:
    if split is not None:
        raise ValueError(f"split={split!r}: {fmt} has no splits in its annotation file")


def _load_json(path: Path, kind: type) -> dict:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, kind):
        raise ValueError(f"{path}: expected a JSON {kind.__name__} at the top level, got {type(data).__name__}")
    return data
