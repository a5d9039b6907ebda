"""Standard benchmarks in one command: `vatp eval benchmark NAME --root DIR --checkpoint PATH`.

`DIR` holds the benchmark as its authors distribute it (videos and their own annotation files); the run builds
the shards it needs (cached and resumable, through the `data_prep` adapters), embeds them with the protocol of
the paper's own evaluation code, scores, and prints each metric beside the paper's number. Every stage is
reused on a re-run. The protocols and where each choice comes from: docs/evaluation.md, "Benchmarks".

    msrvtt   MSR-VTT 1k-A (JSFusion's 1000 test pairs): zero-shot text->video R@1/5/10, MedR
    youcook2 YouCook2 validation steps (MIL-NCE's 3350 clips): the same
    ucf101   UCF101 split 1: linear SVM (C = 100) on backbone features, kNN, zero-shot from class names
    hmdb51   HMDB51 split 1: the same
    vggsound VGGSound test split: clustering with k = the number of classes (SeLaVi: NMI, aNMI, ARI, purity, acc)
    ave      AVE test split: the same
    kinetics400  Kinetics-400 validation: zero-shot classification from the class names (top-1 / top-5)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """One benchmark: where its files are under `--root`, how to build and embed it, and the paper's numbers."""

    kind: Literal["retrieval", "classification", "clustering", "zeroshot"]
    fmt: str  # the data_prep adapter reading its annotation
    annotation: str  # under --root, as distributed
    videos: str  # the video folder under --root (absent: the videos are looked for anywhere under --root)
    source: str  # the evaluation code the protocol follows
    build: dict = field(default_factory=dict)  # data_prep.build.build_dataset options
    clip: dict = field(default_factory=dict)  # eval-view overrides (num_frames, fps, size); empty: the model's
    windows: int = 10  # clips per video, evenly spaced over it
    max_words: int = 30  # words per caption for the released S3D's word-list text tower
    test_split: str = "test"  # the split scored (retrieval: the only one built)
    templates: tuple[str, ...] = ()  # zero-shot prompts (empty: eval.zeroshot.DEFAULT_TEMPLATES)
    paper: dict[str, float] = field(default_factory=dict)  # the published numbers, by our metric names
    elsewhere: tuple[str, ...] = ()  # other places under --root where a distribution puts the annotation


MILNCE = "MIL-NCE_HowTo100M eval_msrvtt.py / eval_hmdb.py (released S3D-G; README numbers)"
PROTOCOLS = {
    "msrvtt": Protocol(
        "retrieval",
        "msrvtt_1ka",
        "MSRVTT_JSFUSION_test.csv",
        "videos",
        MILNCE,
        build=dict(fps=10.0, short_side=256, max_seconds=60.0),
        clip=dict(num_frames=16, fps=5.0),
        paper={"t2v_R@1": 9.9, "t2v_R@5": 24.0, "t2v_R@10": 32.4, "t2v_MedR": 29.5},
    ),
    "youcook2": Protocol(
        "retrieval",
        "youcook2_clips",
        "youcookii_annotations_trainval.json",
        ".",
        "MIL-NCE_HowTo100M eval_youcook.py (validation_youcook.csv: the validation steps; released S3D-G)",
        build=dict(fps=10.0, short_side=256, max_seconds=600.0),  # one sample per step, however long
        clip=dict(num_frames=16, fps=5.0),
        paper={"t2v_R@1": 15.1, "t2v_R@5": 38.0, "t2v_R@10": 51.2, "t2v_MedR": 10.0},
        test_split="val",
    ),
    "ucf101": Protocol(
        "classification",
        "ucf101",
        "ucfTrainTestlist",
        "UCF-101",
        "MIL-NCE eval_hmdb.py's linear SVM protocol (the paper reports UCF101 with it; the repository has no UCF code)",
        build=dict(fps=25.0, short_side=256, max_seconds=60.0),
        clip=dict(num_frames=16, fps=25.0),
        paper={"svm_top1": 82.7},
    ),
    "hmdb51": Protocol(
        "classification",
        "hmdb51",
        "testTrainMulti_7030_splits",
        "hmdb51",
        MILNCE,
        build=dict(fps=30.0, short_side=256, max_seconds=60.0),
        clip=dict(num_frames=16, fps=30.0),
        paper={"svm_top1": 53.1},
    ),
}


PROTOCOLS["vggsound"] = Protocol(
    "clustering",
    "vggsound",
    "vggsound.csv",
    ".",
    "SeLaVi get_clusters.py / clustering_metrics.py: the heads' argmax of softmax(video) x softmax(audio), the head "
    "that best matches the labels (k-means with k = the classes for a model without heads); metrics in percent",
    build=dict(fps=30.0, short_side=128, max_seconds=10.0),
    clip=dict(num_frames=30, fps=30.0),
    windows=1,  # one clip per video (the first; SeLaVi takes the middle one)
    paper={"NMI": 55.9, "aNMI": 52.0, "ARI": 20.6, "purity": 36.2, "acc": 31.0},
)
PROTOCOLS["ave"] = dataclasses.replace(
    PROTOCOLS["vggsound"],
    fmt="ave",
    annotation="testSet.txt",
    videos="AVE",
    paper={"NMI": 66.2, "acc": 57.9},
)
PROTOCOLS["kinetics400"] = Protocol(
    "zeroshot",
    "kinetics",
    "kinetics400/validate.csv",
    ".",
    "zero-shot classification from class-name prompts (no paper of this family reports it; CLIP-style ensembling)",
    build=dict(fps=10.0, short_side=256, max_seconds=10.0),
    test_split="val",
    elsewhere=("annotations/val.csv",),  # the CVDF download (k400/annotations/val.csv)
)
MIN_VIDEOS = 10  # a split scored on fewer videos is flagged: its numbers say little and compare with nothing


def run_benchmark(
    name: str,
    root: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path | None = None,
    dict_path: str | Path | None = None,
    overrides: dict | None = None,
    workers: int = 2,
    device: str = "cpu",
) -> dict:
    """Build, embed and score benchmark `name`; returns (and writes to `<out>/<name>.json`) its metrics.

    `overrides` replaces protocol fields (`windows`, `max_words`) and clip settings (`num_frames`, `fps`,
    `size`; None: the model's own), e.g. for a quick run. `videos` in the result gives each split's coverage:
    listed, built, scored, failed (at build) and skipped (at embed); `warnings` what makes the numbers partial.
    """
    from eval.embed import find_tokenizer, load_model

    if name not in PROTOCOLS:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(PROTOCOLS)})")
    p = _apply(PROTOCOLS[name], overrides or {})
    folds = (overrides or {}).get("folds", 1)
    if folds not in (1, 3) or (folds == 3 and p.kind != "classification"):
        raise ValueError(f"folds={folds!r}: 1, or 3 for the classification benchmarks (the mean of splits 1-3)")
    root, out = Path(root), Path(out)
    found = [root / a for a in (p.annotation, *p.elsewhere) if (root / a).exists()]
    if not found:
        where = " or ".join(str(root / a) for a in (p.annotation, *p.elsewhere))
        raise ValueError(f"{where} not found: {name} expects its files as distributed under --root")
    tok = find_tokenizer(str(tokenizer) if tokenizer else None, str(checkpoint), None)
    model = load_model(checkpoint, tokenizer=tok, dict_path=dict_path, max_words=p.max_words)
    space = _check_model(name, p, model)  # before anything is built
    videos = root / p.videos if (root / p.videos).is_dir() else root
    per_fold, coverage, warnings, t0 = [], {}, [], time.perf_counter()
    for fold in range(1, folds + 1):
        tag = "" if fold == 1 else f"_split{fold}"
        annotation = _fold_annotation(found[0], p.fmt, fold)
        emb = _build_and_embed(
            p, annotation, videos, out / name, tag, model, coverage, warnings, workers=workers, device=device
        )
        test = emb[p.test_split]
        if p.kind == "retrieval":
            per_fold.append(score_retrieval(test, space))
        elif p.kind == "classification":
            per_fold.append(score_classes(emb["train"], test, model, space, templates=p.templates))
        elif p.kind == "clustering":
            per_fold.append(score_clusters(test))
        else:
            per_fold.append(score_zero_shot(test, model, space, templates=p.templates))
    metrics = per_fold[0] if folds == 1 else _mean_of_folds(per_fold)
    result = {
        "benchmark": name,
        "metrics": metrics,
        **({"splits": per_fold} if folds > 1 else {}),
        "paper": p.paper,
        "protocol": {"source": p.source, "windows": p.windows, "clip": p.clip, "build": p.build},
        "checkpoint": str(checkpoint),
        "fingerprint": model.fingerprint,
        "videos": coverage,
        "comparable": not any(v.get("too_few") for v in coverage.values()),
        "warnings": warnings,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    return result


def _check_model(name: str, p: Protocol, model) -> str | None:
    """Refuse, in one line and before anything is built, a model that `p` cannot score; returns the space where it
    embeds both video and text (`vt` when it has one), or None."""
    from eval.embed import spaces_holding

    both = spaces_holding(model, "video", "text")
    space = "vt" if "vt" in both else (both[0] if both else None)
    if "video" not in model.contracts:
        towers = ", ".join(sorted(model.contracts)) or "none"
        raise ValueError(f"{name} embeds videos, and {model.path} has no video tower (its towers: {towers})")
    if p.kind in ("retrieval", "zeroshot"):
        what = "text->video retrieval" if p.kind == "retrieval" else "zero-shot classification from the class names"
        if space is None:
            spaces = getattr(model.module, "spaces", ())
            have = ", ".join(f"{s.name} ({'+'.join(s.modalities)})" for s in spaces) or "none"
            hint = (
                "; the released S3D's text tower needs --dict s3d_dict.npy" if model.source == "s3d_howto100m" else ""
            )
            raise ValueError(
                f"{name} scores {what}: {model.path} has no space of video and text (its spaces: {have}){hint}"
            )
        if model.tokenize is None:
            raise ValueError(f"{name} scores {what}: {model.path} has a text tower but no tokenizer (give --tokenizer)")
    return space


def _build_and_embed(
    p: Protocol,
    annotation: Path,
    videos: Path,
    work: Path,
    tag: str,
    model,
    coverage: dict,
    warnings: list,
    *,
    workers: int,
    device: str,
) -> dict:
    """The splits' shards (`_build_split`) and embeddings, the latter in a folder named by the checkpoint's content,
    the protocol and the build (`emb_<split>-<key>`), so another checkpoint, protocol or build never reuses them.
    `coverage` gets each split's counts and `warnings` what the numbers do not cover."""
    from eval.embed import embed_dataset, read_embeddings
    from pipeline.dataset import DATASET_JSON

    splits = ("train", p.test_split) if p.kind == "classification" else (p.test_split,)
    emb = {}
    for split in splits:
        data = work / f"data_{split}{tag}"
        counts = _build_split(p, annotation, videos, data, split, workers, stale=f"emb_{split}{tag}-*")
        built = hashlib.sha1((data / DATASET_JSON).read_bytes()).hexdigest()
        what = [model.fingerprint, model.tokenization, p.windows, p.clip, p.max_words, p.kind, built]
        key = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
        embed_dataset(
            model,
            data,
            work / f"emb_{split}{tag}-{key}",
            windows=p.windows,
            num_workers=workers,
            device=device,
            data_overrides=p.clip,
            feature_windows=p.kind == "classification",
        )
        emb[split] = read_embeddings(work / f"emb_{split}{tag}-{key}")
        counts["scored"] = len(emb[split].meta)
        counts["skipped"] = counts["built"] - counts["scored"]
        name = f"{split}{tag}"
        coverage[name] = counts
        notes = []
        if counts["failed"]:
            notes.append(
                f"{name}: {counts['failed']} of the {counts['listed']} listed videos could not be used "
                f"({data / 'failures.jsonl'}): the numbers cover the rest"
            )
        if counts["skipped"]:
            why = emb[split].info.get("skipped") or {}
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(why.items())) or "see the embed log"
            notes.append(
                f"{name}: {counts['scored']} of the {counts['built']} built samples were scored ({counts['skipped']} "
                f"skipped at embed: {reasons}): the numbers cover those {counts['scored']}"
            )
        notes += _check_scorable(p, name, emb[split], counts, scored=split == p.test_split)
        for line in notes:
            log.warning("%s", line)
        warnings += notes
    return emb


def _build_split(p: Protocol, annotation: Path, videos: Path, data: Path, split: str, workers: int, stale: str) -> dict:
    """Build split `split` into `data`, or reuse its finished build, unless some listed videos that were missing
    then are there now (it is built again, and its embeddings `stale` go). A build of no sample is not kept.
    Returns the split's counts: listed (rows of the annotation), built (samples), failed (inputs not built)."""
    from data_prep.build import build_dataset
    from data_prep.readers import read_sources
    from pipeline.dataset import DATASET_JSON, read_dataset_json

    listed = None
    if (data / DATASET_JSON).is_file():
        sources = read_sources(annotation, p.fmt, split=split, videos=videos)
        listed = len(sources.items) + len(sources.failures)
        was_missing = {f["source"] for f in _failures(data) if f.get("reason") == "missing_file"}
        back = sorted(was_missing & {item.id for item in sources.items})
        if back:
            log.warning(
                "%s: %d listed video(s) missing when it was built are under %s now (e.g. %s): building the split again",
                data, len(back), videos, back[0],
            )  # fmt: skip
            shutil.rmtree(data)
            for old in data.parent.glob(stale):
                shutil.rmtree(old)
    if not (data / DATASET_JSON).is_file():
        build = build_dataset(annotation, data, fmt=p.fmt, videos_root=videos, split=split, workers=workers, **p.build)
        listed = build.inputs
    samples = int(read_dataset_json(data)["samples"])
    failures = [f for f in _failures(data) if not f.get("kept")]
    if samples == 0:
        shutil.rmtree(data)  # an empty build would be reused and fail every later run
        missing = [f["source"] for f in failures if f.get("reason") == "missing_file"]
        if len(missing) == len(failures):
            raise ValueError(
                f"{videos} holds none of the {listed} videos that {annotation.name} lists for its {split} split "
                f"(e.g. {missing[0] if missing else '?'}.*, looked for anywhere below it)"
            )
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(collections.Counter(f["reason"] for f in failures).items()))
        raise ValueError(
            f"none of the {listed} listed videos of the {split} split under {videos} could be built ({reasons})"
        )
    return {"listed": listed, "built": samples, "failed": len(failures)}


def _failures(data: Path) -> list[dict]:
    path = data / "failures.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _check_scorable(p: Protocol, name: str, emb, counts: dict, *, scored: bool) -> list[str]:
    """Refuse a split that cannot be scored at all (one class; one video); flag a `scored` (test) split too small
    to compare with the paper (`too_few` in its counts, and the warning returned)."""
    labels, names = emb.labels()
    classes = sorted({names[i] for i in labels[labels >= 0]})
    if p.kind != "retrieval" and len(classes) < 2:
        raise ValueError(
            f"the {name} split has videos of {len(classes)} class(es) ({', '.join(classes) or 'no labels'}): "
            "there is nothing to tell apart (are the other classes' videos in place?)"
        )
    if counts["scored"] < 2:
        raise ValueError(f"the {name} split has {counts['scored']} video(s) scored: too few to rank anything")
    if not scored or counts["scored"] >= MIN_VIDEOS:
        return []
    counts["too_few"] = True
    return [f"{name}: {counts['scored']} videos scored (fewer than {MIN_VIDEOS}): not comparable with the paper's"]


def score_retrieval(emb, space: str = "vt") -> dict[str, float]:
    """Zero-shot text->video R@1/5/10 and MedR in `space` (each caption's own video is the answer)."""
    from eval.retrieval import retrieval_metrics

    m = retrieval_metrics(emb.get(f"text@{space}") @ emb.get(f"video@{space}").T, [[int(v)] for v in emb.caption_video])
    return {f"t2v_R@{k}": m[f"R@{k}"] for k in (1, 5, 10)} | {"t2v_MedR": m["MedR"], "queries": len(emb.caption_video)}


def score_classes(train, test, model, space: str | None = "vt", templates: tuple[str, ...] = ()) -> dict[str, float]:
    """MIL-NCE's linear SVM (C = 100) fitted on every window's raw backbone features of the training split (the
    video's label on each), a test video's decision values summed over its windows; kNN on the unit window-mean
    features; zero-shot from the class names when the model has a text tower with `space` (None: no zero-shot)."""
    from eval.probe import knn_classifier, linear_svm_scores, row_array
    from eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings, class_prompts, zero_shot_accuracy

    names = sorted(set(train.labels()[1]) | set(test.labels()[1]))
    y_train, y_test = train.labels(names)[0], test.labels(names)[0]
    keep_tr, keep_te = y_train >= 0, y_test >= 0
    y_train, y_test = y_train[keep_tr], y_test[keep_te]
    win_train, win_test = train.get("video_feat.windows")[keep_tr], test.get("video_feat.windows")[keep_te]  # (N, W, F)
    w = win_train.shape[1]
    scores = linear_svm_scores(
        win_train.reshape(-1, win_train.shape[-1]),
        np.repeat(y_train, w),
        win_test.reshape(-1, win_test.shape[-1]),
        C=100.0,
    )
    scores = scores.reshape(len(y_test), win_test.shape[1], -1).sum(1)  # (N_test, classes)
    out = {"svm_top1": float(100.0 * np.mean(scores.argmax(1) == y_test))}
    unit_train, unit_test = row_array(train, "video_feat")[keep_tr], row_array(test, "video_feat")[keep_te]
    out["knn_top1"] = knn_classifier(unit_train, y_train, unit_test, y_test, k=20)
    if f"video@{space}" in test.arrays and model.tokenize is not None:
        classes = class_embeddings(model, class_prompts(names, templates or DEFAULT_TEMPLATES), space=space)
        video = row_array(test, f"video@{space}")[keep_te]
        zs = zero_shot_accuracy(video @ classes.T, y_test)
        out.update({f"zeroshot_{k}": v for k, v in zs.items()})
    out.update(classes=len(names), train=int(len(y_train)), test=int(len(y_test)))
    return out


def score_clusters(emb) -> dict[str, float]:
    """SeLaVi's clustering protocol, in percent: the self-label heads when the model has them, else k-means with
    k = the number of classes on the default array (a space, else the backbone features)."""
    from eval.clustering import cluster_embeddings

    labels, names = emb.labels()
    if "video_logits" in emb.arrays or "audio_logits" in emb.arrays:
        summary, _ = cluster_embeddings(emb, method="heads", shots=())
    else:
        summary, _ = cluster_embeddings(emb, method="kmeans", k=len(names), shots=(), nredo=3)
    m = summary["metrics"]
    out = {"NMI": 100 * m["nmi"], "aNMI": 100 * m["anmi"], "ARI": 100 * m["ari"]}
    out.update(purity=100 * m["purity_avg"], acc=m["acc"], classes=len(names), videos=int((labels >= 0).sum()))
    out["method"] = summary["method"]
    return out


def score_zero_shot(emb, model, space: str = "vt", templates: tuple[str, ...] = ()) -> dict[str, float]:
    """Top-1 / top-5 zero-shot accuracy from the class names (`eval.zeroshot`, default prompts)."""
    from eval.probe import row_array
    from eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings, class_prompts, zero_shot_accuracy

    if model.tokenize is None:
        raise ValueError("zero-shot classification needs a model with a text tower and its tokenizer")
    labels, names = emb.labels()
    keep = labels >= 0
    classes = class_embeddings(model, class_prompts(names, templates or DEFAULT_TEMPLATES), space=space)
    out = zero_shot_accuracy(row_array(emb, f"video@{space}")[keep] @ classes.T, labels[keep])
    out.update(classes=len(names), videos=int(keep.sum()))
    return out


def format_benchmark(result: dict) -> str:
    """One table: each metric, ours beside the paper's number where it has one (flagged `!` when the split is too
    small to compare); each split's coverage; the warnings."""
    flag = "  !" if not result.get("comparable", True) else ""
    lines = [f"== {result['benchmark']} ==", f"{'metric':<16}{'ours':>10}{'paper':>10}"]
    for key, value in result["metrics"].items():
        paper = result["paper"].get(key)
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        mark = flag if isinstance(value, float) else ""
        lines.append(f"{key:<16}{shown:>10}{'' if paper is None else f'{paper:.1f}':>10}{mark}")
    lines.append(f"protocol: {result['protocol']['source']}")
    for split, v in result["videos"].items():
        counts = f"{v['listed']} listed, {v['built']} built, {v['scored']} scored"
        lines.append(f"videos {split}: {counts} ({v['failed']} failed at build, {v['skipped']} skipped at embed)")
    lines += [f"! {line}" for line in result.get("warnings", [])]
    lines.append(f"{result['seconds']:.0f} s")
    return "\n".join(lines)


def _fold_annotation(annotation: Path, fmt: str, fold: int) -> Path:
    """The annotation that selects split `fold` (1-3) for the UCF101 / HMDB51 adapters: a list file of that split."""
    if fold == 1:
        return annotation
    if fmt == "ucf101":
        return annotation / f"trainlist0{fold}.txt"
    found = sorted(annotation.glob(f"*_test_split{fold}.txt"))
    if not found:
        raise ValueError(f"{annotation}: no *_test_split{fold}.txt files")
    return found[0]


def _mean_of_folds(per_fold: list[dict]) -> dict:
    """The mean of every accuracy over the splits (counts of the first split kept as they are)."""
    mean = {k: float(np.mean([m[k] for m in per_fold])) for k, v in per_fold[0].items() if isinstance(v, float)}
    return mean | {k: v for k, v in per_fold[0].items() if not isinstance(v, float)} | {"folds": len(per_fold)}


def _apply(p: Protocol, overrides: dict) -> Protocol:
    clip = dict(p.clip)
    fields = {}
    for key, value in overrides.items():
        if key in ("num_frames", "fps", "size"):
            clip[key] = value
        elif key in ("windows", "max_words"):
            fields[key] = value
        elif key == "templates":
            fields[key] = tuple(value)
        elif key == "folds":
            continue  # read by run_benchmark
        else:
            raise ValueError(
                f"unknown benchmark setting {key!r} "
                "(known: num_frames, fps, size, windows, max_words, folds, templates)"
            )
    clip = {k: v for k, v in clip.items() if v is not None}
    return dataclasses.replace(p, clip=clip, **fields)
