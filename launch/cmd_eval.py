"""`vatp embed`, `vatp eval retrieval|cluster`, `vatp report`, `vatp search` (docs/evaluation.md)."""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    """Add the evaluation commands to `sub`."""
    p = sub.add_parser("embed", help="embed a dataset with a checkpoint (run under torchrun for several ranks)")
    p.add_argument("--checkpoint", required=True, help="export dir (model.yaml + .safetensors) or s3d_howto100m.pth")
    p.add_argument("--data", required=True, help="dataset directory (dataset.json + shards/)")
    p.add_argument("--out", required=True, help="embedding directory (re-running resumes)")
    p.add_argument("--windows", type=int, default=4, help="evenly spaced clips per video, averaged (0: whole video)")
    p.add_argument("--batch-size", type=int, default=8, help="videos per batch and rank")
    p.add_argument("--workers", type=int, default=2, help="loader worker processes per rank")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: <data>/tokenizer.model)")
    p.add_argument("--dict", default=None, help="word list s3d_dict.npy for the released S3D text tower")
    _word_list_args(p)
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto")
    p.set_defaults(func=run_embed)

    ev = sub.add_parser("eval", help="score embeddings: retrieval or clustering")
    cmds = ev.add_subparsers(dest="eval_command", metavar="SUBCOMMAND", required=True)
    p = cmds.add_parser("retrieval", help="text<->video, audio<->video retrieval; class retrieval and probes")
    p.add_argument("embeddings", help="embedding directory (from `vatp embed`)")
    p.add_argument("--method", default="exact", choices=("exact", "flat", "ivf"), help="ranking (default exact)")
    p.add_argument("--k", type=int, default=100, help="flat/ivf: neighbours searched (ranks beyond are censored)")
    p.add_argument("--nlist", type=int, default=None, help="ivf: inverted lists (default ~4 sqrt(N))")
    p.add_argument("--nprobe", type=int, default=16, help="ivf: lists visited per query")
    p.add_argument("--direction", action="append", default=None, help="only this direction (repeatable)")
    p.add_argument("--gallery", default=None, help="train-split embedding dir for class retrieval / probes")
    p.add_argument("--class-space", default="video@vt", help="embedding used for class retrieval and probes")
    p.add_argument("--no-classes", action="store_true", help="skip class retrieval, kNN and linear probe")
    p.add_argument("--out", default=None, help="metrics JSON (default: <embeddings>/retrieval.json)")
    p.set_defaults(func=run_retrieval)

    p = cmds.add_parser("cluster", help="k-means (or self-label heads) with clustering metrics")
    p.add_argument("embeddings", help="embedding directory")
    p.add_argument("--method", default="kmeans", choices=("kmeans", "heads"))
    p.add_argument("--space", default="video@vt", help="embedding to cluster (and to build prototypes from)")
    p.add_argument("--k", type=int, default=10, help="number of clusters")
    p.add_argument("--euclidean", action="store_true", help="plain k-means instead of spherical")
    p.add_argument("--niter", type=int, default=25)
    p.add_argument("--nredo", type=int, default=1, help="restarts; the best objective wins")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--max-points-per-centroid", type=int, default=None, help="FAISS subsampling (default: none)")
    p.add_argument("--shots", type=int, nargs="*", default=[1, 10], help="k-shot naming to evaluate")
    p.add_argument("--out", default=None, help="output dir (default: <embeddings>/clusters)")
    p.set_defaults(func=run_cluster)

    p = sub.add_parser("report", help="static HTML cluster explorer with plots")
    p.add_argument("embeddings", help="embedding directory")
    p.add_argument("--data", default=None, help="dataset directory, for previews and audio")
    p.add_argument("--clusters", default=None, help="output dir of `vatp eval cluster` (default: run k-means)")
    p.add_argument("--metrics", default=None, help="retrieval.json to plot (default: <embeddings>/retrieval.json)")
    p.add_argument("--space", default="video@vt")
    p.add_argument("--k", type=int, default=10, help="clusters when --clusters is not given")
    p.add_argument("--per-cluster", type=int, default=8, help="videos shown per cluster")
    p.add_argument("--max-clusters", type=int, default=100, help="clusters shown, largest first")
    p.add_argument("--preview", default="gif", choices=("gif", "jpg"))
    p.add_argument("--out", required=True, help="report directory")
    p.set_defaults(func=run_report)

    p = sub.add_parser("search", help="top-k videos for a text query or a query clip")
    p.add_argument("query", nargs="?", default=None, help="text query")
    p.add_argument("--embeddings", required=True, help="embedding directory")
    p.add_argument("--checkpoint", required=True, help="the checkpoint the embeddings were made with")
    p.add_argument("--tokenizer", default=None, help="sentencepiece model (default: embed.json's dataset)")
    p.add_argument("--dict", default=None, help="word list for the released S3D")
    _word_list_args(p)
    p.add_argument("--video", default=None, help="query clip instead of text")
    p.add_argument("--space", default="vt")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print hits as JSON")
    p.set_defaults(func=run_search)


def _word_list_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-words", type=int, default=16, help="released S3D: words per caption (16 as released; MIL-NCE evals: 30)"
    )
    p.add_argument("--keep-case", action="store_true", help="released S3D: do not lowercase captions")


def run_embed(args: argparse.Namespace) -> int:
    import torch

    from eval.embed import embed_dataset, load_model
    from pipeline.engine import init_distributed, launch_env, resolve_device

    # The same start-up as training: torchrun / the deepspeed launcher, or srun's SLURM variables.
    if int(launch_env()["WORLD_SIZE"]) > 1:
        info = init_distributed(args.device)
        rank, world, device = info.rank, info.world_size, str(info.device)
    else:
        rank, world, device = 0, 1, resolve_device(args.device)
    tokenizer = args.tokenizer or (Path(args.data) / "tokenizer.model")
    tokenizer = tokenizer if Path(tokenizer).is_file() else None
    words = {"max_words": args.max_words, "lowercase": not args.keep_case}
    model = load_model(args.checkpoint, tokenizer=tokenizer, dict_path=args.dict, **words)
    summary = embed_dataset(
        model, args.data, args.out, windows=args.windows, batch_size=args.batch_size, num_workers=args.workers,
        rank=rank, world_size=world, device=device,
    )  # fmt: skip
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

    emb = read_embeddings(args.embeddings)
    t0 = time.time()
    ivf = {"nlist": args.nlist, "nprobe": args.nprobe} if args.method == "ivf" else {}
    results = evaluate_retrieval(emb, method=args.method, k=args.k, directions=args.direction, **ivf)
    labels, _ = emb.labels()
    if not args.no_classes and (labels >= 0).sum() >= 2 and args.class_space in emb.arrays:
        train = read_embeddings(args.gallery) if args.gallery else None
        results.update(evaluate_classes(emb, train, space=args.class_space))
    out = Path(args.out or Path(args.embeddings) / "retrieval.json")
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

    emb = read_embeddings(args.embeddings)
    kw = {}
    if args.method == "kmeans":
        kw = dict(
            spherical=not args.euclidean, niter=args.niter, nredo=args.nredo,
            max_points_per_centroid=args.max_points_per_centroid,
        )  # fmt: skip
    summary, assign = cluster_embeddings(
        emb, space=args.space, k=args.k, method=args.method, shots=tuple(args.shots), seed=args.seed, **kw
    )
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
        _, assign = cluster_embeddings(emb, space=args.space, k=min(args.k, len(emb.meta)), shots=())
    metrics_path = args.metrics or (Path(args.embeddings) / "retrieval.json")
    metrics = load_json(metrics_path) if args.metrics or Path(metrics_path).is_file() else None
    path = write_report(
        emb, assign, args.out, dataset=args.data, space=args.space, names=names, metrics=metrics,
        per_cluster=args.per_cluster, max_clusters=args.max_clusters, preview=args.preview,
    )  # fmt: skip
    print(f"report  {path}  ({len(set(assign.tolist()))} clusters, {len(assign)} videos)")
    return 0


def run_search(args: argparse.Namespace) -> int:
    from eval.embed import load_model, read_embeddings
    from eval.search import format_hits, search, text_query, video_query

    if (args.query is None) == (args.video is None):
        raise ValueError("give either a text query or --video PATH")
    emb = read_embeddings(args.embeddings)
    tokenizer = args.tokenizer
    if tokenizer is None and emb.info.get("dataset"):
        guess = Path(emb.info["dataset"]) / "tokenizer.model"
        tokenizer = guess if guess.is_file() else None
    words = {"max_words": args.max_words, "lowercase": not args.keep_case}
    model = load_model(args.checkpoint, tokenizer=tokenizer, dict_path=args.dict, **words)
    if args.video:
        query = video_query(model, args.video, space=args.space, windows=int(emb.info.get("windows") or 4))
    else:
        query = text_query(model, args.query, space=args.space)
    hits = search(emb, query, space=args.space, k=args.k)
    print(json.dumps(hits, indent=1) if args.json else format_hits(hits))
    return 0
