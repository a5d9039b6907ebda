"""What `vatp data build` consumes: one `SourceItem` per input video, read from a directory or a manifest.

Readers (directory scan, CSV/JSONL manifest, public-corpus adapters) turn user inputs into
`SourceItem`s plus `Failure`s for inputs they had to skip; the builder turns items into shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Caption:
    """A timed caption, in seconds from the start of the source video (or of its clip bounds)."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class SourceItem:
    """One input video and what is known about it.

    `start`/`end` bound the part of the file to use (None: from the beginning / to the end);
    caption times are relative to the file, like the sidecars they came from.
    """

    id: str
    path: str
    start: float | None = None
    end: float | None = None
    captions: tuple[Caption, ...] = ()
    label: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Failure:
    """An input that was skipped (or, with `kept`, converted despite a problem), with a reason and a detail.

    `reason` is short and machine-readable; `detail` is for people. A kept one (e.g. `bad_captions`: the
    video became a sample without its unusable captions) is listed in failures.jsonl with `"kept": true`.
    """

    source: str
    reason: str
    detail: str = ""
    kept: bool = False

    def to_json(self) -> dict:
        row = {"source": self.source, "reason": self.reason, "detail": self.detail}
        if self.kept:
            row["kept"] = True
        return row


@dataclass
class SourceList:
    """Everything a reader produced: the usable items, the inputs it skipped, and problems with kept items.

    `warnings` are kept `Failure`s about an item that is still used (a caption sidecar with nothing
    usable in it: reason `bad_captions`); their `source` is the item's `path`.
    """

    items: list[SourceItem] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    warnings: list[Failure] = field(default_factory=list)


# Containers a folder scan takes (ffmpeg reads them all); a file with another extension is left out, counted and
# listed (a manifest row can still name any file ffmpeg reads).
VIDEO_EXTENSIONS = (
    ".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".flv", ".3gp", ".3g2", ".ogv",
    ".ts", ".mts", ".m2ts", ".wmv", ".asf", ".vob", ".f4v", ".mxf", ".dv", ".m2v", ".rm", ".rmvb",
)  # fmt: skip
CAPTION_EXTENSIONS = (".srt", ".vtt", ".json", ".csv", ".txt")  # caption sidecars, in their lookup order

# Public corpora spell their splits differently; readers store and compare the short form.
_SPLIT_ALIASES = {"training": "train", "validation": "val", "validate": "val", "valid": "val", "testing": "test"}


def normalize_split(split: str | None) -> str | None:
    """`training`/`validation`/`validate`/`testing` -> `train`/`val`/`test`; other names pass through stripped."""
    if split is None:
        return None
    split = str(split).strip()
    return _SPLIT_ALIASES.get(split.lower(), split) if split else None


def scan_videos(root: Path) -> tuple[list[Path], int, list[Path]]:
    """Video files under `root` (recursive, extension case-insensitive, sorted), how many hidden files and folders
    were skipped, and the other files left out (neither a video container nor a caption sidecar), sorted.

    Hidden files and folders are skipped: macOS `._clip.mp4` resource forks look like videos but are not.
    """
    found, others, hidden = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        hidden += sum(1 for d in dirnames if d.startswith("."))
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith("."):
                hidden += os.path.splitext(name)[1].lower() in VIDEO_EXTENSIONS
                continue
            ext = os.path.splitext(name)[1].lower()
            if ext in CAPTION_EXTENSIONS:
                continue
            (found if ext in VIDEO_EXTENSIONS else others).append(name if rel == "." else f"{rel}/{name}")
    found.sort()  # by relative path: the same order on every filesystem
    return [root / rel for rel in found], hidden, [root / rel for rel in sorted(others)]
