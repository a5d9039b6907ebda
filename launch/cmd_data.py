"""`vatp data synth|build|tokenizer|inspect`: the data-preparation commands (docs/data-prep.md)."""

from __future__ import annotations

import argparse
import os

from data_prep.readers import FORMATS


def register(sub: argparse._SubParsersAction) -> None:
    """Add `vatp data ...` to `sub`."""
    data = sub.add_parser("data", help="prepare datasets: synth corpus, shards, tokenizer, inspection")
    cmds = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = cmds.add_parser("synth", help="write a synthetic raw corpus (mp4 + AAC, captions, manifest)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--videos", type=int, required=True, help="number of videos")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same corpus)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each video")
    p.add_argument("--workers", type=int, default=None, help="parallel ffmpeg processes (default: CPU count)")
    p.set_defaults(func=run_synth)

    p = cmds.add_parser("build", help="turn videos (a directory or a manifest) into WebDataset shards")
    p.add_argument("input", help="a directory of videos, or a manifest file (csv/tsv/jsonl/json)")
    p.add_argument("--out", required=True, help="dataset directory (re-running with it resumes)")
    p.add_argument("--format", default="auto", choices=FORMATS, help="input layout (default: guess)")
    p.add_argument("--videos-root", default=None, help="where manifest paths/ids resolve to video files")
    p.add_argument("--fps", type=float, default=16.0, help="constant output frame rate")
    p.add_argument("--short-side", type=int, default=160, help="output short side in pixels (even)")
    p.add_argument("--max-seconds", type=float, default=30.0, help="longer videos are cut into chunks of this")
    p.add_argument("--sample-rate", type=int, default=16000, help="output audio sample rate (mono)")
    p.add_argument("--audio-format", default="flac", choices=("flac", "wav"), help="audio member format")
    p.add_argument("--samples-per-shard", type=int, default=64, help="chunks per tar")
    p.add_argument("--workers", type=int, default=None, help="parallel transcodes (default: CPU count)")
    p.add_argument("--num-parts", type=int, default=None, help="split the shards over P jobs (default: SLURM array)")
    p.add_argument("--part", type=int, default=None, help="which part this job builds, 0..P-1")
    p.add_argument("--split", default=None, help="keep only manifest rows of this split")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per ffmpeg call before it is killed")
    p.set_defaults(func=run_build)

    p = cmds.add_parser("tokenizer", help="train a sentencepiece model on a dataset's captions")
    p.add_argument("dir", help="dataset directory (tokenizer.model is written there)")
    p.add_argument("--vocab-size", type=int, default=8000, help="vocabulary size")
    p.add_argument("--model-type", default="unigram", help="sentencepiece model type: unigram, bpe, word or char")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.set_defaults(func=run_tokenizer)

    p = cmds.add_parser("inspect", help="validate a dataset (schema, shard integrity, decodability)")
    p.add_argument("dir", help="dataset directory")
    p.add_argument("--decode", type=int, default=8, help="decode this many samples with decord (0: none)")
    p.set_defaults(func=run_inspect)


def run_synth(args: argparse.Namespace) -> int:
    from data_prep.synth import format_summary, make_synth_corpus

    if args.videos < 1:
        raise ValueError(f"--videos must be >= 1, got {args.videos}")
    result = make_synth_corpus(args.out, videos=args.videos, seed=args.seed, seconds=args.seconds, workers=args.workers)
    print(format_summary(result))
    return 0


def run_build(args: argparse.Namespace) -> int:
    from data_prep.build import build_dataset

    num_parts, part = resolve_parts(args.num_parts, args.part, os.environ)
    summary = build_dataset(
        args.input,
        args.out,
        fmt=args.format,
        videos_root=args.videos_root,
        fps=args.fps,
        short_side=args.short_side,
        max_seconds=args.max_seconds,
        sample_rate=args.sample_rate,
        audio_format=args.audio_format,
        samples_per_shard=args.samples_per_shard,
        workers=args.workers,
        num_parts=num_parts,
        part=part,
        split=args.split,
        timeout=args.timeout,
    )
    print(summary.format())
    if summary.chunks == 0 or (summary.shards_written and not summary.samples):
        print("vatp data build: error: no usable input (see failures.jsonl)")
        return 1
    return 0


def resolve_parts(num_parts: int | None, part: int | None, env: os._Environ | dict) -> tuple[int, int]:
    """(P, I) from the flags, else from a SLURM job array (task ids made 0-based), else (1, 0)."""
    if (num_parts is None) != (part is None):
        raise ValueError(f"--num-parts and --part go together (got {num_parts} and {part})")
    if num_parts is not None:
        return num_parts, part
    if "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"]) - first
    return 1, 0


def run_tokenizer(args: argparse.Namespace) -> int:
    from data_prep.tokenizer import train_tokenizer

    path = train_tokenizer(args.dir, vocab_size=args.vocab_size, model_type=args.model_type, seed=args.seed)
    print(f"tokenizer    {path}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from data_prep.inspect import inspect_dataset

    if not os.path.isdir(args.dir):
        raise ValueError(f"{args.dir} is not a directory")
    report = inspect_dataset(args.dir, decode=args.decode)
    print(report.format())
    return 0 if report.ok else 1
