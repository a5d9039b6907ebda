"""CLI subcommands: train, export, quickstart.

`vatp train` is the one entry point for every launcher: run it directly (one process), under
`torchrun ... -m launch.cli train`, under `deepspeed --module launch.cli train` (which appends
`--local_rank=N`: accepted and ignored, LOCAL_RANK is read from the environment), or under `srun`
(launch/slurm/pretrain.sbatch). See docs/launching.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from launch.options import add_overrides

CONFIGS = Path(__file__).parent / "configs"
EXIT_DIVERGED = 3


def register(sub: argparse._SubParsersAction) -> None:
    """Add `train` and `export`."""
    p = sub.add_parser(
        "train",
        help="train a recipe (launch/configs/*.yaml) with DeepSpeed",
        description="Train a recipe. RECIPE is a YAML file, a recipe name from launch/configs/ (e.g. quickstart), "
        "or a run directory (its saved config.yaml). Every knob is a --set override, e.g. --set run.steps=100.",
    )
    p.add_argument("recipe", help="recipe file, recipe name, or run directory")
    add_overrides(p, "override a config value (repeatable), e.g. --set optim.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue the run from its checkpoints/latest")
    p.add_argument(
        "--auto-resume",
        action="store_true",
        help="resume when the run has a checkpoint, else start it (for requeued cluster jobs)",
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "export",
        help="write a run's checkpoint as fp32 safetensors + model config",
        description="Export RUN's latest (or --tag) checkpoint to RUN/export (or --out): model.safetensors, "
        "model.yaml and the tokenizer, ready for `vatp embed`.",
    )
    e.add_argument("run", help="run directory (<runs_dir>/<name>)")
    e.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00001000 (default: latest)")
    e.add_argument("--out", default=None, help="output directory (default: RUN/export)")
    e.set_defaults(func=run_export)


def register_quickstart(sub: argparse._SubParsersAction) -> None:
    """Add `quickstart`."""
    p = sub.add_parser(
        "quickstart",
        help="the whole pipeline on a synthetic corpus, on the CPU (a few minutes on 2 cores)",
        description="Synthesise a corpus, build train/test shards and a tokenizer, train the objective's quickstart "
        "recipe, embed the held-out split, and compare the metrics of the objective's paper (retrieval, "
        "clustering, self-label heads) against the same model at random init.",
    )
    p.add_argument("--out", default="quickstart", help="working directory (default: ./quickstart)")
    p.add_argument(
        "--objective",
        default="milnce",
        choices=("milnce", "gdt", "selavi", "mmv"),
        help="which objective's quickstart recipe to train and evaluate (default: milnce)",
    )
    p.add_argument("--videos", type=int, default=None, help="synthetic videos (default: the recipe's plan)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the quickstart recipe's)")
    add_overrides(p, "override a quickstart recipe value")
    p.set_defaults(func=run_quickstart)


def resolve_recipe(name: str) -> Path:
    """A run directory's config.yaml, a recipe file, or launch/configs/<name>.yaml, in that order; a directory
    without config.yaml (e.g. the `quickstart/` output folder of `make demo`) does not hide a bundled recipe."""
    path = Path(name)
    if path.is_dir() and (path / "config.yaml").is_file():
        return path / "config.yaml"
    if path.is_file():
        return path
    bundled = CONFIGS / f"{name}.yaml"
    if bundled.is_file():
        return bundled
    if path.is_dir():
        raise ValueError(f"{path} is a directory without config.yaml (not a run directory)")
    known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise ValueError(f"recipe {name!r} not found (not a file, a run directory, or one of: {known})")


def run_dir_location(recipe: str) -> list[str]:
    """`run.runs_dir` / `run.name` overrides that keep a run directory where it is now.

    A run directory's config.yaml records where the run was started; after the directory is copied or moved,
    resuming from it must write its checkpoints here, not into the original run (whose oldest checkpoints the
    pruning would delete). The user's own `--set run.runs_dir/run.name` still win (they come later)."""
    path = Path(recipe)
    if not (path.is_dir() and (path / "config.yaml").is_file()):
        return []
    from pipeline.config import load_yaml

    here = path.resolve()
    saved = load_yaml(path / "config.yaml").get("run") or {}
    was = Path(str(saved.get("runs_dir", "runs"))) / str(saved.get("name", here.name))
    if was.resolve() != here and _is_main():
        print(f"vatp train: {path} was started as {was}; it continues here", file=sys.stderr)
    return [f"run.runs_dir={json.dumps(str(here.parent))}", f"run.name={json.dumps(here.name)}"]


def run_train(args: argparse.Namespace) -> int:
    from pipeline.train import EXIT_STOPPED, TrainingDiverged, train
    from pipeline.train_config import load_train_config

    cfg = load_train_config(resolve_recipe(args.recipe), [*run_dir_location(args.recipe), *args.overrides])
    resume = args.resume
    if args.auto_resume and not resume:
        from pipeline.checkpoint import latest_tag

        resume = latest_tag(Path(cfg.run.runs_dir) / cfg.run.name) is not None
    evaluate = None
    if cfg.eval.every:
        from eval.periodic import held_out_retrieval

        evaluate = held_out_retrieval(cfg)
    try:
        summary = train(cfg, resume=resume, evaluate=evaluate)
    except TrainingDiverged as e:
        print(f"vatp train: stopped: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if _is_main():
        print_summary("train", summary)
    return EXIT_STOPPED if summary["stopped_by"] else 0


def run_export(args: argparse.Namespace) -> int:
    from pipeline.checkpoint import export_run

    out = export_run(args.run, tag=args.tag, out_dir=args.out)
    print_summary("export", {"run": args.run, "out": str(out), "files": sorted(p.name for p in out.iterdir())})
    return 0


def run_quickstart(args: argparse.Namespace) -> int:
    from launch.quickstart import quickstart

    quickstart(args.out, objective=args.objective, videos=args.videos, steps=args.steps, overrides=args.overrides)
    return 0


def print_summary(command: str, summary: dict) -> None:
    """One screen: the command's summary as aligned key: value lines."""
    print(f"\n== vatp {command} ==")
    for key, value in summary.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        print(f"  {key:<16} {text}")


def _is_main() -> bool:
    return os.environ.get("RANK", "0") == "0"
