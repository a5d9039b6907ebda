"""`vatp eval benchmark NAME --root DIR --checkpoint PATH`: build, embed and score a standard benchmark.

    annotation files as distributed (--root) -> shards (data_prep, cached) -> embeddings (eval.embed, keyed by the
    checkpoint's content, the protocol and the build) -> scores (eval.benchmark) -> <out>/<NAME>.json + a table

Every stage is reused on a re-run; a split whose listed videos have appeared since it was built is built again.
The protocols, and where each follows or departs from the official evaluation code: eval/benchmark.py and
docs/evaluation.md, "Benchmarks".
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import shutil
import time
from pathlib import Path

from eval.benchmark import (
    Protocol,
    check_model,
    check_scorable,
    mean_of_folds,
    resolve_protocol,
    score_classes,
    score_clusters,
    score_retrieval,
    score_zero_shot,
)
from eval.config import BenchmarkConfig
from pipeline.config import to_dict

log = logging.getLogger(__name__)


def run_benchmark(
    name: str,
    root: str | Path,
    checkpoint: str | Path,
    out: str | Path,
    cfg: BenchmarkConfig | None = None,
    *,
    tokenizer: str | Path | None = None,
    dict_path: str | Path | None = None,
    device: str = "cpu",
) -> dict:
    """Build, embed and score benchmark `name` with the settings of `cfg` (defaults: the official protocol); returns
    (and writes to `<out>/<name>.json`) its metrics beside the references, each split's coverage (listed, built,
    scored, failed at build, skipped at embed) and the warnings that make the numbers partial."""
    from eval.embed import find_tokenizer, load_model

    cfg = cfg or BenchmarkConfig()
    p = resolve_protocol(name, cfg)
    root, out = Path(root), Path(out)
    annotation, fmt, warnings = _find_annotation(name, p, root)
    tok = find_tokenizer(str(tokenizer) if tokenizer else None, str(checkpoint), None)
    model = load_model(checkpoint, tokenizer=tok, dict_path=dict_path, max_words=p.max_words)
    space = check_model(name, p, model)  # before anything is built
    videos = root / p.videos if (root / p.videos).is_dir() else root
    folds = [_fold_annotation(annotation, fmt, fold) for fold in range(1, p.folds + 1)]  # each split's list, first
    per_fold, coverage, t0 = [], {}, time.perf_counter()
    for fold, listed in enumerate(folds, 1):
        tag = "" if fold == 1 else f"_split{fold}"
        source = (listed, fmt)
        emb = _build_and_embed(
            p, source, videos, out / name, tag, model, coverage, warnings, workers=cfg.workers, device=device
        )
        test = emb[p.split]
        if p.kind == "retrieval":
            per_fold.append(score_retrieval(test, space))
        elif p.kind == "classification":
            per_fold.append(score_classes(emb["train"], test, model, space, templates=p.templates))
        elif p.kind == "clustering":
            per_fold.append(score_clusters(test))
        else:
            per_fold.append(score_zero_shot(test, model, space, templates=p.templates))
    result = {
        "benchmark": name,
        "metrics": per_fold[0] if p.folds == 1 else mean_of_folds(per_fold),
        **({"splits": per_fold} if p.folds > 1 else {}),
        "references": {r.short: {"source": r.source, "values": r.values} for r in p.references},
        "protocol": {
            "source": p.source,
            "split": p.split,
            "folds": p.folds,
            "windows": p.windows,
            "placement": p.placement,
            "clip_setting": cfg.clip,
            "clip": p.clip or "the model's",
            "build": p.build,
            "departures": list(p.departures),
        },
        "settings": to_dict(cfg),
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


def _find_annotation(name: str, p: Protocol, root: Path) -> tuple[Path, str, list[str]]:
    """The first of the protocol's annotation files present under `root`, its adapter, and a warning when it is
    not the protocol's own list (YouCook2 without MIL-NCE's validation_youcook.csv)."""
    wanted = [(root / path.format(split=p.split), fmt) for path, fmt in p.annotations]
    for i, (path, fmt) in enumerate(wanted):
        if path.exists():
            if i == 0:
                return path, fmt, []
            note = (
                f"{wanted[0][0].name} not found: scoring the clips {path.name} lists instead, not the official "
                "protocol's list (numbers differ from the paper's)"
            )
            log.warning("%s", note)
            return path, fmt, [note]
    where = " or ".join(str(path) for path, _ in wanted)
    raise ValueError(f"{where} not found: {name} expects its files as distributed under --root")


def _build_and_embed(
    p: Protocol,
    source: tuple[Path, str],
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
    from pipeline.dataset import DATASET_JSON, FAILURES_JSONL

    splits = ("train", p.split) if p.kind == "classification" else (p.split,)
    view = {**p.clip, "eval_placement": p.placement, "eval_end_gap": p.end_gap}
    emb = {}
    for split in splits:
        data = work / f"data_{split}{tag}"
        counts = _build_split(p, source, videos, data, split, workers, stale=f"emb_{split}{tag}-*")
        built = hashlib.sha1((data / DATASET_JSON).read_bytes()).hexdigest()
        what = [model.fingerprint, model.tokenization, p.windows, view, p.max_words, p.kind, built]
        key = hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()[:10]
        embed_dataset(
            model,
            data,
            work / f"emb_{split}{tag}-{key}",
            windows=p.windows,
            num_workers=workers,
            device=device,
            data_overrides=view,
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
                f"({data / FAILURES_JSONL}): the numbers cover the rest"
            )
        if counts["skipped"]:
            why = emb[split].info.get("skipped") or {}
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(why.items())) or "see the embed log"
            notes.append(
                f"{name}: {counts['scored']} of the {counts['built']} built samples were scored ({counts['skipped']} "
                f"skipped at embed: {reasons}): the numbers cover those {counts['scored']}"
            )
        notes += check_scorable(p, name, emb[split], counts, scored=split == p.split)
        for line in notes:
            log.warning("%s", line)
        warnings += notes
    return emb


def _build_split(
    p: Protocol, source: tuple[Path, str], videos: Path, data: Path, split: str, workers: int, stale: str
) -> dict:
    """Build split `split` into `data`, or reuse its finished build, unless some listed videos that were missing
    then are there now (it is built again, and its embeddings `stale` go). A build of no sample is not kept.
    Returns the split's counts: listed (rows of the annotation), built (samples), failed (inputs not built)."""
    from data_prep.build import build_dataset
    from data_prep.readers import read_sources
    from pipeline.dataset import DATASET_JSON, read_dataset_json

    annotation, fmt = source
    listed = None
    if (data / DATASET_JSON).is_file():
        sources = read_sources(annotation, fmt, split=split, videos=videos)
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
        build = build_dataset(annotation, data, fmt=fmt, videos_root=videos, split=split, workers=workers, **p.build)
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
    from pipeline.dataset import FAILURES_JSONL

    path = data / FAILURES_JSONL
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _fold_annotation(annotation: Path, fmt: str, fold: int) -> Path:
    """The annotation that selects split `fold` (1-3) for the UCF101 / HMDB51 adapters: a list file of that split."""
    if fold == 1:
        return annotation
    if fmt == "ucf101":
        lists = [annotation / f"trainlist0{fold}.txt", annotation / f"testlist0{fold}.txt"]
        missing = [p.name for p in lists if not p.is_file()]
        if missing:
            raise ValueError(f"{annotation}: no {missing[0]} for split {fold} (set folds=1 to score split 1 alone)")
        return lists[0]
    found = sorted(annotation.glob(f"*_test_split{fold}.txt"))
    if not found:
        raise ValueError(f"{annotation}: no *_test_split{fold}.txt files (set folds=1 to score split 1 alone)")
    return found[0]
