"""Typed settings of the evaluation commands: one dataclass per command, each knob with its default.

`vatp embed`, `vatp eval retrieval|cluster`, `vatp report` and `vatp search` keep their inputs and outputs
(paths, `--space`, `--k`, `--device`) as flags; every other knob is a field here, set with `--set key=value`.
`eval_config` builds one with pipeline/config.py's machinery, so an unknown key or a wrongly typed value is a
ConfigError (a ValueError) that names it. The comment after each field documents it; `describe` shows those
comments in the commands' `--help`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

from pipeline.config import apply_overrides, from_dict, to_dict

C = TypeVar("C")


@dataclass(frozen=True, kw_only=True)
class WordListConfig:
    """How the released S3D's word-list text tower reads captions (exported vatp models use the tokenizer)."""

    dict_path: str | None = None  # released S3D: its word list s3d_dict.npy, which adds the word2vec text tower
    max_words: int = 16  # released S3D: words per caption (16 as released; MIL-NCE's evaluators use 30)
    lowercase: bool = True  # released S3D: lowercase captions, as released

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_words")


@dataclass(frozen=True, kw_only=True)
class EmbedConfig(WordListConfig):
    """`vatp embed`."""

    windows: int = 4  # evenly spaced clips per video, averaged (0: one clip spread over the whole video)
    batch_size: int = 8  # videos per batch and rank
    workers: int = 2  # loader worker processes per rank (at most the shards each rank reads)

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, 0, "windows", "workers")
        _at_least(self, 1, "batch_size")


@dataclass(frozen=True, kw_only=True)
class RetrievalConfig:
    """`vatp eval retrieval`."""

    method: Literal["exact", "flat", "ivf"] = "exact"  # exact: every rank counted; flat/ivf: FAISS top-k search
    k: int = 100  # flat/ivf: neighbours searched per query (ranks beyond are censored)
    nlist: int | None = None  # ivf: inverted lists (null: about 4 sqrt(N))
    nprobe: int = 16  # ivf: lists visited per query
    directions: tuple[str, ...] | None = None  # only these, e.g. [text->video@vt] (null: every direction)
    classes: bool = True  # class retrieval, kNN and linear probe, when at least two videos are labelled
    class_space: str = "auto"  # array for class retrieval and probes (auto: video@vt, another video space, video_feat)
    gallery: str | None = None  # train-split embedding dir for class retrieval and probes (null: a 70/30 split)

    def __post_init__(self) -> None:
        _at_least(self, 1, "k", "nlist", "nprobe")


@dataclass(frozen=True, kw_only=True)
class ClusterConfig:
    """`vatp eval cluster`."""

    method: Literal["kmeans", "heads"] = "kmeans"  # kmeans: FAISS k-means of --space; heads: self-label heads
    spherical: bool = True  # k-means on the unit sphere (false: plain Euclidean k-means)
    niter: int = 25  # k-means iterations
    nredo: int = 1  # k-means restarts; the best objective wins
    seed: int = 1234  # k-means and k-shot sampling seed
    max_points_per_centroid: int | None = None  # FAISS subsampling to k x this many points (null: every point)
    shots: tuple[int, ...] = (1, 10)  # labelled videos per class for the k-shot cluster naming evaluated

    def __post_init__(self) -> None:
        _at_least(self, 1, "niter", "nredo", "max_points_per_centroid")
        if any(s < 1 for s in self.shots):
            raise ValueError(f"shots must all be >= 1, got {list(self.shots)}")


@dataclass(frozen=True, kw_only=True)
class ReportConfig:
    """`vatp report`."""

    per_cluster: int = 8  # videos shown per cluster
    max_clusters: int = 100  # clusters shown, largest first
    preview: Literal["gif", "jpg"] = "gif"  # gif: animated 8-frame preview; jpg: one frame
    metrics: str | None = None  # retrieval.json to plot (null: <embeddings>/retrieval.json when there is one)
    method: Literal["kmeans", "heads"] = "kmeans"  # without --clusters: k-means of --space, or the self-label heads

    def __post_init__(self) -> None:
        _at_least(self, 1, "per_cluster", "max_clusters")


@dataclass(frozen=True, kw_only=True)
class SearchConfig(WordListConfig):
    """`vatp search`: only the word-list settings; the tokenizer and the embedding's windows are found for it."""


@dataclass(frozen=True, kw_only=True)
class ZeroShotConfig(WordListConfig):
    """`vatp eval zeroshot`."""

    templates: tuple[str, ...] = ("{}", "a video of {}.", "a person {}.", "how to {}.")  # prompts, {} = class words
    ks: tuple[int, ...] = (1, 5)  # top-k accuracies reported

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError(f"templates must each hold exactly one '{{}}', got {list(self.templates)!r}")
        if not self.ks or min(self.ks) < 1:
            raise ValueError(f"ks must be positive, got {list(self.ks)!r}")


@dataclass(frozen=True, kw_only=True)
class BenchmarkConfig:
    """`vatp eval benchmark`: each setting left null takes the benchmark's official protocol (docs/evaluation.md)."""

    clip: Literal["official", "model"] = "official"  # official: the paper's frames/rate/size; model: the checkpoint's
    num_frames: int | None = None  # frames per window (null: the clip setting's)
    fps: float | None = None  # frames per second of a window (null: the clip setting's)
    size: int | None = None  # pixels of the centre crop (null: the clip setting's)
    windows: int | None = None  # clips per video, evenly spaced (null: the protocol's, 10 for MIL-NCE's)
    max_words: int | None = None  # released S3D: words per caption (null: 30, as MIL-NCE's evaluators)
    split: str | None = None  # the split scored (null: test; train for the clustering benchmarks, as SeLaVi)
    folds: int | None = None  # UCF101/HMDB51 splits averaged, 1 or 3 (null: 3, the papers' three-split mean)
    templates: tuple[str, ...] | None = None  # zero-shot prompts, {} = the class words (null: vatp's four)
    workers: int = 2  # build and loader worker processes (fitted to the shards)

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_frames", "size", "max_words", "workers")
        _at_least(self, 0, "windows")
        if self.fps is not None and self.fps <= 0:
            raise ValueError(f"fps must be > 0, got {self.fps}")
        if self.folds not in (None, 1, 3):
            raise ValueError(f"folds must be 1 or 3 (the mean of UCF101/HMDB51's three splits), got {self.folds}")
        if self.templates is not None and (not self.templates or any(t.count("{}") != 1 for t in self.templates)):
            raise ValueError(f"templates must each hold exactly one '{{}}', got {list(self.templates)!r}")


def eval_config(cls: type[C], overrides: Sequence[str] = ()) -> C:
    """`cls` at its defaults with each `key=value` of `overrides` applied (values parsed as YAML)."""
    return from_dict(cls, apply_overrides({}, list(overrides)))


def describe(cls: type) -> list[str]:
    """One line per field of `cls`: `key=default` and the comment that documents it in this module."""
    comments = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            for line in inspect.getsource(klass).splitlines():
                if m := re.match(r"\s+(\w+): [^#]*#\s*(.*)", line):
                    comments[m[1]] = m[2]
    defaults = to_dict(cls())
    keys = {name: f"{name}={_yaml(value)}" for name, value in defaults.items()}
    width = max(map(len, keys.values()))
    return [f"{key:<{width}}  {comments.get(name, '')}".rstrip() for name, key in keys.items()]


def _at_least(cfg, minimum: int, *keys: str) -> None:
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and value < minimum:  # None: the field's automatic choice
            raise ValueError(f"{key} must be >= {minimum}, got {value}")


def _yaml(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)  # true, null, [1, 10]: YAML as --set reads it
