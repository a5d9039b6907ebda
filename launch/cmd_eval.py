"""`vatp embed`, `vatp eval retrieval|cluster`, `vatp report`, `vatp search` (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from eval.config import (
    BenchmarkConfig,
    ClusterConfig,
    EmbedConfig,
    ReportConfig,
    RetrievalConfig,
    SearchConfig,
    WordListConfig,
    ZeroShotConfig,
    describe,
    eval_config,
)
from launch.options import add_overrides
from pipeline.config import to_dict

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation commands to `sub`; each command's knobs are `--set` keys of its config (eval/config.py)."""
    p = _add_parser(sub, "embed", EmbedConfig, "embed a dataset with a checkpoint (torchrun: several ranks)")
    p.add_argument("--checkpoint", required=True, help="export dir (model.yaml + .safetensors) or s3d_howto100m.pth")
    p.add_argument("--data", required=True, help="dataset directory (dataset.json + shards/)")
    p.add_argument("--out", required=True, help="embedding directory (re-running resumes)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the export's, else the dataset's)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.set_defaults(func=run_embed)

    ev = sub.add_parser("eval", help="score embeddings (retrieval, clustering, zero-shot) or run a standard benchmark")
    cmds = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    p = _add_parser(cmds, "retrieval", RetrievalConfig, "text<->video, audio<->video retrieval; classes and probes")
    p.add_argument("embeddings", help="embedding directory (from `vatp embed`)")
    p.add_argument("--out", default=None, help="metrics JSON (default: <embeddings>/retrieval.json)")
    p.set_defaults(func=run_retrieval)

    p = _add_parser(cmds, "cluster", ClusterConfig, "k-means (or self-label heads) with clustering metrics")
    p.add_argument("embeddings", help="embedding directory")
    p.add_argument("--space", default="auto", help="array to cluster (auto: video@vt, another video space, video_feat)")
    p.add_argument("--k", type=int, default=10, help="number of clusters")
    p.add_argument("--out", default=None, help="output dir (default: <embeddings>/clusters)")
    p.set_defaults(func=run_cluster)

    p = _add_parser(sub, "report", ReportConfig, "static HTML cluster explorer with plots")
    p.add_argument("embeddings", help="embedding directory")
    p.add_argument("--data", default=None, help="dataset directory, for previews and audio")
    p.add_argument("--clusters", default=None, help="output dir of `vatp eval cluster` (default: run k-means)")
    p.add_argument("--space", default="auto", help="array plotted and clustered (auto as for eval cluster)")
    p.add_argument("--k", type=int, default=10, help="clusters when --clusters is not given")
    p.add_argument("--out", required=True, help="report directory")
    p.set_defaults(func=run_report)

    p = _add_parser(cmds, "zeroshot", ZeroShotConfig, "classify videos from their class names (text prompts)")
    p.add_argument("embeddings", help="embedding directory of labelled videos (the labels name the classes)")
    p.add_argument("--checkpoint", required=True, help="the checkpoint the embeddings were made with")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the export's, else the dataset's)")
    p.add_argument("--space", default="vt", help="the video-text space to compare in")
    p.add_argument("--out", default=None, help="metrics JSON (default: <embeddings>/zeroshot.json)")
    p.set_defaults(func=run_zeroshot)

    from eval.benchmark import PROTOCOLS  # the benchmark names come from the protocol table

    p = _add_parser(
        cmds,
        "benchmark",
        BenchmarkConfig,
        "a standard benchmark in one command: build, embed and score with the paper's protocol",
        description="Build the benchmark's shards from its files as distributed (cached), embed them with the "
        "protocol of the paper's evaluation code, score, and print each metric beside the published numbers "
        "(docs/evaluation.md, Benchmarks). Every setting below left null keeps the official protocol.",
    )
    p.add_argument("name", choices=sorted(PROTOCOLS), help="the benchmark")
    p.add_argument("--root", required=True, help="the benchmark's folder as distributed (videos + annotation files)")
    p.add_argument("--checkpoint", required=True, help="export dir or s3d_howto100m.pth")
    p.add_argument("--out", default="benchmarks", help="shards, embeddings and <NAME>.json (default ./benchmarks)")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the export's)")
    p.add_argument("--dict", default=None, help="the released S3D's word list s3d_dict.npy (its text tower)")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.set_defaults(func=run_benchmark)

    p = _add_parser(sub, "search", SearchConfig, "top-k videos for a text query or a query clip")
    p.add_argument("query", nargs="?", default=None, help="text query")
    p.add_argument("--video", default=None, help="query clip instead of text")
    p.add_argument("--embeddings", required=True, help="embedding directory")
    p.add_argument("--checkpoint", required=True, help="the checkpoint the embeddings were made with")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: the export's, else the dataset's)")
    p.add_argument("--space", default="vt")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print hits as JSON")
    p.set_defaults(func=run_search)


def _add_parser(
    sub: argparse._SubParsersAction, name: str, config: type, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """A subcommand with `--set KEY=VALUE` for the fields of `config`, listed with their defaults in its --help."""
    settings = "\n".join(f"  {line}" for line in describe(config))
    p = sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"settings (--set KEY=VALUE, repeatable; values are YAML), with their defaults:\n{settings}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_overrides(p, "override a setting below")
    return p


def _load_model(checkpoint: str, tokenizer: Path | None, words: WordListConfig):
    from eval.embed import load_model

    return load_model(
        checkpoint, tokenizer=tokenizer, dict_path=words.dict_path, max_words=words.max_words, lowercase=words.lowercase
    )


def run_embed(args: argparse.Namespace) -> int:
    import torch

    from eval.embed import embed_dataset, find_tokenizer
    from pipeline.distributed import init_distributed, launch_env, resolve_device

    cfg = eval_config(EmbedConfig, args.overrides)
    # The same start-up as training: torchrun / the deepspeed launcher, or srun's SLURM variables.
    if int(launch_env()["WORLD_SIZE"]) > 1:
        info = init_distributed(args.device)
        rank, world, device = info.rank, info.world_size, str(info.device)
    else:
        rank, world, device = 0, 1, resolve_device(args.device)
    model = _load_model(args.checkpoint, find_tokenizer(args.tokenizer, args.checkpoint, args.data), cfg)
    summary = embed_dataset(
        model,
        args.data,
        args.out,
        windows=cfg.windows,
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        rank=rank,
        world_size=world,
        device=device,
    )
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank == 0:
        print(f"embeddings  {args.out}" + (f"  (embedded/resumed/seconds: rank 0 of {world})" if world > 1 else ""))
        for key, value in summary.items():
            print(f"  {key:<10} {value:.1f}" if isinstance(value, float) else f"  {key:<10} {value}")
    return 0


def run_retrieval(args: argparse.Namespace) -> int:
    from eval.embed import read_embeddings
    from eval.probe import evaluate_classes
    from eval.retrieval import evaluate_retrieval

    cfg = eval_config(RetrievalConfig, args.overrides)
    emb = read_embeddings(args.embeddings)
    t0 = time.time()
    ivf = {"nlist": cfg.nlist, "nprobe": cfg.nprobe} if cfg.method == "ivf" else {}
    directions = list(cfg.directions) if cfg.directions is not None else None
    results = evaluate_retrieval(emb, method=cfg.method, k=cfg.k, directions=directions, **ivf)
    labels, _ = emb.labels()
    if cfg.classes and (labels >= 0).sum() >= 2:
        train = read_embeddings(cfg.gallery) if cfg.gallery else None
        results.update(evaluate_classes(emb, train, space=cfg.class_space))
    if not results:
        raise ValueError(f"{args.embeddings}: nothing to evaluate (no two modalities share a space, no labels)")
    out = Path(args.out or Path(args.embeddings) / "retrieval.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(format_metrics(results))
    print(f"\n{len(results)} evaluations in {time.time() - t0:.1f} s -> {out}")
    return 0


def format_metrics(results: dict) -> str:
    """One line per evaluation: its name and its scalar metrics."""
    lines = []
    for name, vals in results.items():
        cells = [
            f"{k} {v:6.2f}" if isinstance(v, float) else f"{k} {v}"
            for k, v in vals.items()
            if k not in ("curve",) and not isinstance(v, (dict, list))
        ]
        lines.append(f"{name:<22} " + "  ".join(cells))
    return "\n".join(lines)


def run_cluster(args: argparse.Namespace) -> int:
    from eval.clustering import cluster_embeddings, name_clusters, write_assignments
    from eval.embed import read_embeddings

    cfg = eval_config(ClusterConfig, args.overrides)
    emb = read_embeddings(args.embeddings)
    kw = {}
    if cfg.method == "kmeans":
        mppc = cfg.max_points_per_centroid
        kw = dict(spherical=cfg.spherical, niter=cfg.niter, nredo=cfg.nredo, max_points_per_centroid=mppc)
    summary, assign = cluster_embeddings(
        emb, space=args.space, k=args.k, method=cfg.method, shots=cfg.shots, seed=cfg.seed, **kw
    )
    summary["config"] = to_dict(cfg)
    out = Path(args.out or Path(args.embeddings) / "clusters")
    out.mkdir(parents=True, exist_ok=True)
    labels, label_names = emb.labels()
    names = None
    if (labels >= 0).any():
        names = {c: label_names[n] for c, n in enumerate(name_clusters(assign, labels, "majority")) if n >= 0}
        summary["names"] = {str(c): n for c, n in names.items()}
    write_assignments(emb, assign, out / "assignments.jsonl", names)
    (out / "clusters.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    sizes = summary["sizes"]
    print(f"clusters  {out}  ({summary['method']}, k={summary['k']}, {summary['rows']} videos)")
    if "points_used" in summary:
        used, secs = summary["points_used"], summary["seconds"]
        print(f"  k-means trained on {used} of {summary['rows']} points in {secs:.1f} s")
    print(f"  sizes     min {sizes['min']}  median {sizes['median']:.0f}  max {sizes['max']}  empty {sizes['empty']}")
    for key, value in summary.get("metrics", {}).items():
        print(f"  {key:<10} {value:.4f}" if isinstance(value, float) else f"  {key:<10} {value}")
    for shots, accs in summary.get("naming", {}).items():
        print(f"  naming {shots:<8} " + "  ".join(f"{m} {a:5.1f}%" for m, a in accs.items()))
    for shots, why in summary.get("naming_skipped", {}).items():
        print(f"  naming {shots:<8} skipped: {why}")
    return 0


def run_report(args: argparse.Namespace) -> int:
    import numpy as np

    from eval.clustering import cluster_embeddings
    from eval.embed import read_embeddings
    from eval.report import load_json, write_report

    cfg = eval_config(ReportConfig, args.overrides)
    emb = read_embeddings(args.embeddings)
    names = None
    if args.clusters:
        path = Path(args.clusters) / "assignments.jsonl"
        if not path.is_file():
            raise ValueError(f"{path} not found (run `vatp eval cluster` first)")
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        by_idx = {r["idx"]: r for r in rows}
        missing = [m["idx"] for m in emb.meta if m["idx"] not in by_idx]
        if missing:
            raise ValueError(f"{path} has no cluster for {len(missing)} videos (e.g. idx {missing[0]})")
        assign = np.array([by_idx[m["idx"]]["cluster"] for m in emb.meta])
        names = {r["cluster"]: r["name"] for r in rows if r.get("name")}
    else:
        _, assign = cluster_embeddings(emb, space=args.space, k=min(args.k, len(emb.meta)), method=cfg.method, shots=())
    metrics_path = cfg.metrics or (Path(args.embeddings) / "retrieval.json")
    metrics = load_json(metrics_path) if cfg.metrics or Path(metrics_path).is_file() else None
    path = write_report(
        emb,
        assign,
        args.out,
        dataset=args.data,
        space=args.space,
        names=names,
        metrics=metrics,
        per_cluster=cfg.per_cluster,
        max_clusters=cfg.max_clusters,
        preview=cfg.preview,
    )
    print(f"report  {path}  ({len(set(assign.tolist()))} clusters, {len(assign)} videos)")
    return 0


def run_benchmark(args: argparse.Namespace) -> int:
    from eval.benchmark import format_benchmark
    from launch.benchmark import run_benchmark
    from pipeline.distributed import resolve_device

    cfg = eval_config(BenchmarkConfig, args.overrides)
    result = run_benchmark(
        args.name,
        args.root,
        args.checkpoint,
        args.out,
        cfg,
        tokenizer=args.tokenizer,
        dict_path=args.dict,
        device=resolve_device(args.device),
    )
    print(format_benchmark(result))
    print(f"-> {Path(args.out) / (args.name + '.json')}")
    return 0


def run_zeroshot(args: argparse.Namespace) -> int:
    from eval.embed import find_tokenizer, read_embeddings, spaces_holding
    from eval.embed_files import check_checkpoint
    from eval.probe import row_array
    from eval.zeroshot import class_embeddings, class_prompts, similarity_of, zero_shot_accuracy

    cfg = eval_config(ZeroShotConfig, args.overrides)
    emb = read_embeddings(args.embeddings)
    labels, names = emb.labels()
    keep = labels >= 0
    if len(names) < 2 or not keep.any():
        raise ValueError(f"{args.embeddings}: zero-shot classification needs labelled videos of at least two classes")
    model = _load_model(args.checkpoint, find_tokenizer(args.tokenizer, args.checkpoint, emb.info.get("dataset")), cfg)
    check_checkpoint(emb, args.checkpoint, model.fingerprint)
    both = spaces_holding(model, "video", "text")
    if args.space not in both:
        raise ValueError(
            f"--space {args.space}: {args.checkpoint} has no video and text in {args.space!r} "
            f"(spaces with both: {', '.join(both) or 'none'})"
        )
    classes = class_embeddings(model, class_prompts(names, cfg.templates), space=args.space)  # (C, D)
    video = row_array(emb, f"video@{args.space}")[keep]
    result = zero_shot_accuracy(video @ classes.T, labels[keep], cfg.ks)
    result.update(classes=len(names), videos=int(keep.sum()), space=args.space, templates=list(cfg.templates))
    result["similarity"] = similarity_of(model, args.space)  # dot in a dot-product space, as its retrieval
    out = Path(args.out or Path(args.embeddings) / "zeroshot.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"zero-shot": result}, indent=1), encoding="utf-8")
    print(format_metrics({"zero-shot": result}))
    print(f"-> {out}")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from eval.embed import find_tokenizer, read_embeddings
    from eval.embed_files import check_checkpoint
    from eval.search import format_hits, search, text_query, video_query

    cfg = eval_config(SearchConfig, args.overrides)
    if (args.query is None) == (args.video is None):
        raise ValueError("give either a text query or --video PATH")
    emb = read_embeddings(args.embeddings)
    tokenizer = find_tokenizer(args.tokenizer, args.checkpoint, emb.info.get("dataset"))
    model = _load_model(args.checkpoint, tokenizer, cfg)
    check_checkpoint(emb, args.checkpoint, model.fingerprint)
    if args.video:
        query = video_query(model, args.video, space=args.space, windows=int(emb.info.get("windows") or 4))
    else:
        query = text_query(model, args.query, space=args.space)
    hits = search(emb, query, space=args.space, k=args.k)
    print(json.dumps(hits, indent=1) if args.json else format_hits(hits))
    return 0
