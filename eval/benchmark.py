"""The standard benchmarks' protocols and scoring: what `vatp eval benchmark NAME` builds, embeds and computes.

Each `Protocol` says where the benchmark's files are under `--root` as its authors distribute them, how to build
and embed them to follow the evaluation code of the paper that reports it, and the published numbers with where
each comes from (`Reference`). The orchestration (build the shards, embed, score) is `launch/benchmark.py`; this
module only resolves a protocol for a checkpoint and scores embeddings. The protocols and how they match the
official scripts: docs/evaluation.md, "Benchmarks".

    msrvtt   MSR-VTT 1k-A (JSFusion's 1000 test pairs): zero-shot text->video R@1/5/10, MedR
    youcook2 YouCook2: MIL-NCE's 3,350 validation steps (validation_youcook.csv): the same
    ucf101   UCF101, mean of the three splits: linear SVM (C = 100) on backbone features, kNN, zero-shot
    hmdb51   HMDB51, mean of the three splits: the same
    vggsound VGGSound train split (SeLaVi's): clustering, k = the classes; NMI, aNMI, ARI, purity, acc + chance
    ave      AVE train split: the same
    kinetics400  Kinetics-400 validation: zero-shot classification from the class names (top-1 / top-5)
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    """A published number set: `short` heads its column, `source` says exactly which evaluation produced it."""

    short: str
    source: str
    values: dict[str, float]


@dataclass(frozen=True)
class Protocol:
    """One benchmark: its files under `--root`, how to build and embed them, and the published numbers."""

    kind: Literal["retrieval", "classification", "clustering", "zeroshot"]
    annotations: tuple[tuple[str, str], ...]  # (path under --root, data_prep adapter): the first found is read;
    # "{split}" in a path is the split scored (AVE's per-split list files)
    videos: str  # the video folder under --root (absent: looked for anywhere under --root)
    source: str  # the evaluation code the protocol follows
    build: dict = field(default_factory=dict)  # data_prep.build.build_dataset options
    clip: dict = field(default_factory=dict)  # the official eval-view clip (num_frames, fps, size)
    windows: int = 10  # clips per video
    placement: str = "spread"  # DataConfig.eval_placement: spread over the video, its middle, or the captions' span
    end_gap: float = 0.0  # DataConfig.eval_end_gap: the last window ends this long before the span (MIL-NCE: 0.4)
    max_words: int = 30  # words per caption for the released S3D's word-list text tower
    split: str = "test"  # the split scored (retrieval: the only one built)
    folds: int = 1  # splits averaged (UCF101 / HMDB51: their three official splits)
    templates: tuple[str, ...] = ()  # zero-shot prompts (empty: eval.zeroshot.DEFAULT_TEMPLATES)
    references: tuple[Reference, ...] = ()
    departures: tuple[str, ...] = ()  # where vatp's protocol differs from the official script's


MILNCE_TF = "TF eval"
MILNCE_TF_SOURCE = "MIL-NCE paper / README: DeepMind's TensorFlow evaluation of the released S3D-G"
MILNCE_CLIP = {"num_frames": 16, "fps": 5.0}  # eval_msrvtt.py / eval_youcook.py: 16 frames at 5 fps
RETRIEVAL_DEPARTURES = (
    "clips re-encoded at the build (libx264 CRF 23, short side 256) and scaled by decord (bilinear) where the "
    "official script crops the original file and scales it bicubic (pixel mean |diff| 5.6-8.0 levels; expected "
    "< 1 point)",
    "window span from the stored frame count, not ffprobe's container duration",
)
SELAVI_DEPARTURES = ("one clip per video from its middle second, re-encoded at 30 fps and short side 128",)
PROTOCOLS = {
    "msrvtt": Protocol(
        "retrieval",
        (("MSRVTT_JSFUSION_test.csv", "msrvtt_1ka"),),
        "videos",
        "MIL-NCE_HowTo100M eval_msrvtt.py (released S3D-G)",
        build=dict(fps=10.0, short_side=256, max_seconds=60.0),
        clip=MILNCE_CLIP,
        end_gap=0.4,
        references=(
            Reference(
                MILNCE_TF, MILNCE_TF_SOURCE, {"t2v_R@1": 9.9, "t2v_R@5": 24.0, "t2v_R@10": 32.4, "t2v_MedR": 29.5}
            ),
            Reference(
                "PyTorch",
                "the official PyTorch eval_msrvtt.py on the released S3D-G, as a user reported it in MIL-NCE issue 17 "
                "(rounded: R@1 0.10, R@5 0.25, R@10 0.35, MedR 31)",
                {"t2v_R@1": 10.0, "t2v_R@5": 25.0, "t2v_R@10": 35.0, "t2v_MedR": 31.0},
            ),
        ),
        departures=RETRIEVAL_DEPARTURES,
    ),
    "youcook2": Protocol(
        "retrieval",
        (("validation_youcook.csv", "youcook2_milnce"), ("youcookii_annotations_trainval.json", "youcook2_clips")),
        ".",
        "MIL-NCE_HowTo100M eval_youcook.py (validation_youcook.csv's 3,350 steps; released S3D-G)",
        build=dict(fps=10.0, short_side=256, max_seconds=600.0),  # one sample per step, however long
        clip=MILNCE_CLIP,
        placement="captions",  # windows over the step; a short step's last frames are the video's next ones
        end_gap=0.4,
        split="val",
        references=(
            Reference(
                MILNCE_TF,
                MILNCE_TF_SOURCE + " (the README notes the TF run had fewer videos)",
                {"t2v_R@1": 15.1, "t2v_R@5": 38.0, "t2v_R@10": 51.2, "t2v_MedR": 10.0},
            ),
        ),
        departures=RETRIEVAL_DEPARTURES
        + ("without validation_youcook.csv: every validation step present (a larger gallery, about -1 R@10)",),
    ),
    "ucf101": Protocol(
        "classification",
        (("ucfTrainTestlist", "ucf101"),),
        "UCF-101",
        "MIL-NCE eval_hmdb.py's linear SVM protocol (the paper reports UCF101 with it; the repository has no UCF code)",
        build=dict(fps=25.0, short_side=256, max_seconds=60.0),
        clip=dict(num_frames=16, fps=25.0),
        folds=3,
        references=(Reference("paper", "MIL-NCE paper, linear SVM on the frozen S3D-G", {"svm_top1": 82.7}),),
        departures=("29.97-fps videos resampled to 25 fps: 16 frames span 0.64 s instead of 0.53 s",),
    ),
    "hmdb51": Protocol(
        "classification",
        (("testTrainMulti_7030_splits", "hmdb51"),),
        "hmdb51",
        "MIL-NCE_HowTo100M eval_hmdb.py (released S3D-G)",
        build=dict(fps=30.0, short_side=256, max_seconds=60.0),
        clip=dict(num_frames=16, fps=30.0),
        folds=3,
        references=(Reference("paper", "MIL-NCE paper, linear SVM on the frozen S3D-G", {"svm_top1": 53.1}),),
        departures=("clips re-encoded at 30 fps (HMDB's native rate) where the official script reads every frame",),
    ),
    "vggsound": Protocol(
        "clustering",
        (("vggsound.csv", "vggsound"),),
        ".",
        "SeLaVi get_clusters.py / clustering_metrics.py (--mode train): the heads' argmax of softmax(video) x "
        "softmax(audio), the head that best matches the labels (k-means with k = the classes for a model without "
        "heads); metrics in percent",
        build=dict(fps=30.0, short_side=128, max_seconds=10.0),
        clip=dict(num_frames=30, fps=30.0),
        windows=1,
        placement="middle",
        split="train",  # SeLaVi labels and scores the split it trained on
        references=(
            Reference(
                "SeLaVi",
                "SeLaVi paper, the clustering table of VGG-Sound (train split); its model-zoo table gives NMI 55.9, "
                "acc 31.0",
                {"NMI": 54.6, "aNMI": 52.0, "ARI": 20.6, "acc": 30.9, "purity": 36.2},
            ),
        ),
        departures=SELAVI_DEPARTURES,
    ),
}
PROTOCOLS["ave"] = dataclasses.replace(
    PROTOCOLS["vggsound"],
    annotations=(("{split}Set.txt", "ave"),),
    videos="AVE",
    references=(Reference("SeLaVi", "SeLaVi paper, AVE (train split)", {"NMI": 66.2, "acc": 57.9}),),
)
PROTOCOLS["kinetics400"] = Protocol(
    "zeroshot",
    (("kinetics400/validate.csv", "kinetics"), ("annotations/val.csv", "kinetics")),  # the second: CVDF's download
    ".",
    "zero-shot classification from class-name prompts (no paper of this family reports it; CLIP-style ensembling)",
    build=dict(fps=10.0, short_side=256, max_seconds=10.0),
    split="val",
)
MIN_VIDEOS = 10  # a split scored on fewer videos is flagged: its numbers say little and compare with nothing
CHANCE_DRAWS = 3


def resolve_protocol(name: str, cfg) -> Protocol:
    """Benchmark `name`'s protocol with the settings of `cfg` (an `eval.config.BenchmarkConfig`) applied: its clip
    (`official`, or `model`: the checkpoint's own frames and rate), frames, rate, size, windows, words, split,
    folds and prompts."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown benchmark {name!r} (known: {', '.join(PROTOCOLS)})")
    p = PROTOCOLS[name]
    clip = dict(p.clip) if cfg.clip == "official" else {}
    clip.update({k: getattr(cfg, k) for k in ("num_frames", "fps", "size") if getattr(cfg, k) is not None})
    folds = cfg.folds if cfg.folds is not None else p.folds
    if folds == 3 and p.kind != "classification":
        raise ValueError(f"folds=3: {name} has one split to score (the three-split mean is UCF101's and HMDB51's)")
    fields = {k: getattr(cfg, k) for k in ("windows", "max_words", "split", "templates") if getattr(cfg, k) is not None}
    return dataclasses.replace(p, clip=clip, folds=folds, **fields)


def check_model(name: str, p: Protocol, model) -> str | None:
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


def check_scorable(p: Protocol, name: str, emb, counts: dict, *, scored: bool) -> list[str]:
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


def score_retrieval(emb, space: str = "vt") -> dict:
    """Zero-shot text->video R@1/5/10 and MedR in `space` (each caption's own video is the answer), through
    `eval.retrieval.evaluate_retrieval` like every other retrieval score."""
    from eval.retrieval import evaluate_retrieval

    m = evaluate_retrieval(emb, directions=[f"text->video@{space}"])[f"text->video@{space}"]
    out = {f"t2v_R@{k}": m[f"R@{k}"] for k in (1, 5, 10)} | {"t2v_MedR": m["MedR"]}
    return out | {"queries": m["queries"], "similarity": m["similarity"]}


def score_classes(train, test, model, space: str | None = "vt", templates: tuple[str, ...] = ()) -> dict:
    """MIL-NCE's linear SVM (C = 100, liblinear as the official script) fitted on every window's raw backbone
    features of the training split (the video's label on each), a test video's decision values summed over its
    windows; kNN on the unit window-mean features; zero-shot from the class names when the model has a text tower
    with `space` (None: no zero-shot). `svm` records how the fit went (solver, iterations, converged, objective)."""
    from eval.probe import knn_classifier, linear_svm, row_array

    names = sorted(set(train.labels()[1]) | set(test.labels()[1]))
    y_train, y_test = train.labels(names)[0], test.labels(names)[0]
    keep_tr, keep_te = y_train >= 0, y_test >= 0
    y_train, y_test = y_train[keep_tr], y_test[keep_te]
    win_train, win_test = train.get("video_feat.windows")[keep_tr], test.get("video_feat.windows")[keep_te]  # (N, W, F)
    scores, fit = linear_svm(
        win_train.reshape(-1, win_train.shape[-1]),
        np.repeat(y_train, win_train.shape[1]),
        win_test.reshape(-1, win_test.shape[-1]),
        C=100.0,
    )
    scores = scores.reshape(len(y_test), win_test.shape[1], -1).sum(1)  # (N_test, classes)
    out = {"svm_top1": float(100.0 * np.mean(scores.argmax(1) == y_test))}
    unit_train, unit_test = row_array(train, "video_feat")[keep_tr], row_array(test, "video_feat")[keep_te]
    out["knn_top1"] = knn_classifier(unit_train, y_train, unit_test, y_test, k=20)
    if space is not None and f"video@{space}" in test.arrays and model.tokenize is not None:
        zs = _zero_shot(test, model, space, names, templates)
        out.update({f"zeroshot_{k}": v for k, v in zs.items()})
    out.update(classes=len(names), train=int(len(y_train)), test=int(len(y_test)), svm=fit)
    return out


def score_clusters(emb) -> dict:
    """SeLaVi's clustering protocol, in percent: the self-label heads when the model has them, else k-means with
    k = the number of classes on the default array (a space, else the backbone features). `chance` holds the
    same metrics for uniformly random clusters of the same count on the same labels (the mean of a few draws):
    NMI and accuracy grow with the clusters per video, aNMI and ARI stay near 0."""
    from eval.clustering import cluster_embeddings

    labels, names = emb.labels()
    if "video_logits" in emb.arrays or "audio_logits" in emb.arrays:
        summary, _ = cluster_embeddings(emb, method="heads", shots=())
        k = int(emb.arrays["video_logits" if "video_logits" in emb.arrays else "audio_logits"].shape[-1])
    else:
        summary, _ = cluster_embeddings(emb, method="kmeans", k=len(names), shots=(), nredo=3)
        k = len(names)
    out = _percent(summary["metrics"])
    out.update(classes=len(names), videos=int((labels >= 0).sum()), method=summary["method"])
    out["chance"] = chance_clusters(labels[labels >= 0], k)
    return out


def chance_clusters(labels: np.ndarray, k: int, draws: int = CHANCE_DRAWS, seed: int = 0) -> dict[str, float]:
    """The clustering metrics (percent) of `k` uniformly random clusters on `labels`, averaged over `draws`."""
    from eval.clustering import cluster_metrics

    rng = np.random.default_rng(seed)
    runs = [_percent(cluster_metrics(rng.integers(0, k, len(labels)), labels)) for _ in range(draws)]
    return {key: float(np.mean([r[key] for r in runs])) for key in runs[0]}


def _percent(m: dict) -> dict[str, float]:
    """aNMI and ARI first: unlike NMI and accuracy they stay near 0 for a random clustering of a small split."""
    return {"aNMI": 100 * m["anmi"], "ARI": 100 * m["ari"], "NMI": 100 * m["nmi"], "acc": m["acc"]} | {
        "purity": 100 * m["purity_avg"]
    }


def score_zero_shot(emb, model, space: str = "vt", templates: tuple[str, ...] = ()) -> dict:
    """Top-1 / top-5 zero-shot accuracy from the class names (`eval.zeroshot`), compared as the space compares."""
    if model.tokenize is None:
        raise ValueError("zero-shot classification needs a model with a text tower and its tokenizer")
    labels, names = emb.labels()
    out = _zero_shot(emb, model, space, names, templates)
    out.update(classes=len(names), videos=int((labels >= 0).sum()))
    return out


def _zero_shot(emb, model, space: str, names: list[str], templates: tuple[str, ...]) -> dict:
    from eval.probe import row_array
    from eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings, class_prompts, similarity_of, zero_shot_accuracy

    labels = emb.labels(names)[0]
    keep = labels >= 0
    similarity = similarity_of(model, space)
    classes = class_embeddings(model, class_prompts(names, templates or DEFAULT_TEMPLATES), space, similarity)
    out: dict = zero_shot_accuracy(row_array(emb, f"video@{space}")[keep] @ classes.T, labels[keep])
    return out | {"similarity": similarity}


def mean_of_folds(per_fold: list[dict]) -> dict:
    """The mean of every accuracy over the splits (counts and records of the first split kept as they are)."""
    mean = {k: float(np.mean([m[k] for m in per_fold])) for k, v in per_fold[0].items() if isinstance(v, float)}
    return mean | {k: v for k, v in per_fold[0].items() if not isinstance(v, float)} | {"folds": len(per_fold)}


def format_benchmark(result: dict) -> str:
    """One table: each metric, ours, chance (clustering), and each reference's number in its own column (flagged
    `!` when the split is too small to compare); below it what each column is, the coverage and the warnings."""
    refs = result["references"]
    chance = result["metrics"].get("chance") or {}
    heads = ["ours", *(["chance"] if chance else []), *refs]
    width = max(10, *(len(h) + 2 for h in heads))
    flag = "  !" if not result.get("comparable", True) else ""
    lines = [f"== {result['benchmark']} ==", f"{'metric':<16}" + "".join(f"{h:>{width}}" for h in heads)]
    for key, value in result["metrics"].items():
        if isinstance(value, (dict, list)):
            continue
        cells = [f"{value:.1f}" if isinstance(value, float) else str(value)]
        if chance:
            cells.append(f"{chance[key]:.1f}" if key in chance else "")
        cells += [f"{ref['values'][key]:.1f}" if key in ref["values"] else "" for ref in refs.values()]
        mark = flag if isinstance(value, float) else ""
        lines.append(f"{key:<16}" + "".join(f"{c:>{width}}" for c in cells) + mark)
    if chance:
        lines.append("chance: uniformly random clusters of the same count on the same labels")
    lines += [f"{short}: {ref['source']}" for short, ref in refs.items()]
    protocol = result["protocol"]
    lines.append(f"protocol: {protocol['source']}; split {protocol['split']}, clip {protocol['clip_setting']}")
    svm = result["metrics"].get("svm")
    if svm:
        state = "converged" if svm["converged"] else f"stopped at {svm['iterations']} iterations, as the official"
        lines.append(f"svm: {svm['solver']}, C {svm['C']:g}, {state} (objective {svm['objective']:.4g})")
    for split, v in result["videos"].items():
        counts = f"{v['listed']} listed, {v['built']} built, {v['scored']} scored"
        lines.append(f"videos {split}: {counts} ({v['failed']} failed at build, {v['skipped']} skipped at embed)")
    lines += [f"! {line}" for line in result.get("warnings", [])]
    lines.append(f"{result['seconds']:.0f} s")
    return "\n".join(lines)
