"""What `vatp data build` consumes: one `SourceItem` per input video, read from a directory or a manifest.

Readers (directory scan, CSV/JSONL manifest, public-corpus adapters) turn user inputs into
`SourceItem`s plus `Failure`s for inputs they had to skip; the builder turns items into shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    """An input that was skipped, with a short machine-readable reason and a human-readable detail."""

    source: str
    reason: str
    detail: str = ""

    def to_json(self) -> dict:
        return {"source": self.source, "reason": self.reason, "detail": self.detail}


@dataclass
class SourceList:
    """Everything a reader produced: the usable items and the inputs it skipped."""

    items: list[SourceItem] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
