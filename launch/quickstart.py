"""`vatp quickstart`: the whole pipeline on the CPU, from nothing to a trained-vs-random comparison.

    synth corpus -> train/test shards -> tokenizer -> train the quickstart recipe -> export
    -> embed the held-out split with the trained model and with the same architecture at random init
    -> text->video retrieval (R@1/5/10) and k-means clustering (NMI, Hungarian accuracy) -> table + HTML report

Every stage is idempotent: a re-run reuses finished outputs (the corpus, shards, tokenizer, a finished run,
complete embedding directories) and resumes an interrupted training run from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipeline.dataset import DATASET_JSON, TOKENIZER_NAME, shard_paths

log = logging.getLogger(__name__)

RECIPE = Path(__file__).parent / "configs" / "quickstart.yaml"
SYNTH = dict(videos=400, seed=0, seconds=5.0, width=128, height=96, fps=20)
BUILD = dict(fps=10, short_side=64, max_seconds=30.0, sample_rate=16000, samples_per_shard=16)
VOCAB = 1000  # an upper bound: the synthetic narration has about 190 distinct words


def quickstart(
    out: str | Path, *, videos: int | None = None, steps: int | None = None, overrides: Sequence[str] = ()
) -> dict:
    """Run the quickstart in `out`; return (and print) the comparison table's numbers."""
    from data_prep.build import build_dataset
    from data_prep.synth import make_synth_corpus
    from data_prep.tokenizer import train_tokenizer
    from pipeline.checkpoint import export_run, latest_tag
    from pipeline.dataset import load_tokenizer
    from pipeline.train import train
    from pipeline.train_config import load_train_config

    out = Path(out).resolve()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    # ---- data: synthetic corpus, shards for the train and test splits, tokenizer
    make_synth_corpus(out / "synth", **{**SYNTH, "videos": videos or SYNTH["videos"]})
    train_dir, test_dir = out / "data" / "train", out / "data" / "test"
    for split, target in (("train", train_dir), ("test", test_dir)):
        if not (target / DATASET_JSON).is_file():
            build_dataset(out / "synth", target, split=split, workers=2, **BUILD)
    tokenizer = train_dir / TOKENIZER_NAME
    if not tokenizer.is_file():
        # BPE: whole-word pieces; unigram splits even frequent words on a corpus this small (docs/data-prep.md)
        train_tokenizer(train_dir, vocab_size=VOCAB, model_type="bpe")
    shutil.copyfile(tokenizer, test_dir / TOKENIZER_NAME)  # held-out text, training vocab
    pieces = load_tokenizer(tokenizer).get_piece_size()
    timings["data_s"] = time.perf_counter() - t0

    # ---- train (or resume, or reuse a finished run)
    settings = [f"data.datasets=[{{path: {train_dir}}}]", f"run.runs_dir={out / 'runs'}", f"model.vocab_size={pieces}"]
    if steps is not None:
        base = load_train_config(RECIPE, settings)
        settings += [f"run.steps={steps}", f"optim.warmup_steps={min(base.optim.warmup_steps, steps // 5)}"]
    cfg = load_train_config(RECIPE, [*settings, *overrides])
    run_dir = out / "runs" / cfg.run.name
    tag = latest_tag(run_dir) if run_dir.exists() else None
    t1 = time.perf_counter()
    if tag != f"step_{cfg.run.steps:08d}":
        train(cfg, resume=tag is not None)
    timings["train_s"] = time.perf_counter() - t1
    trained_dir = export_run(run_dir)
    random_dir = export_random_init(cfg, run_dir / "random_init", tokenizer=tokenizer)

    # ---- evaluate both on the held-out split
    rows = {}
    for name, model_dir in (("random init", random_dir), ("trained", trained_dir)):
        emb_dir = out / "embed" / cfg.run.name / name.replace(" ", "_")
        if emb_dir.exists() and name == "trained" and tag != f"step_{cfg.run.steps:08d}":
            shutil.rmtree(emb_dir)  # embeddings of an earlier, unfinished state of this run
        report = out / "report" if name == "trained" else None
        rows[name] = evaluate(model_dir, test_dir, emb_dir, report=report)
    timings["total_s"] = time.perf_counter() - t0
    result = {"rows": rows, "timings": timings, "run_dir": str(run_dir), "test_dir": str(test_dir)}
    (out / "quickstart.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_table(rows, timings, out))
    return result


def export_random_init(cfg, out_dir: Path, *, tokenizer: Path, calibration_batches: int = 20) -> Path:
    """The recipe's architecture at the initial weights of training (same seed), exported like a trained model.

    Its BatchNorm statistics are measured on training clips first (no gradient step): with the initial
    statistics (mean 0, variance 1) a random S3D in eval mode maps every clip to the same vector, and a
    collapsed baseline would flatter the trained model.
    """
    from models.towers import build_model, save_exported

    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg.model)
    data_cfg = dataclasses.replace(cfg.data, batch_size=cfg.run.batch_size)
    calibrate_batchnorm(model, data_cfg, batches=calibration_batches)
    save_exported(model, cfg.model, out_dir)
    shutil.copyfile(tokenizer, out_dir / TOKENIZER_NAME)
    return out_dir


@torch.no_grad()
def calibrate_batchnorm(model: torch.nn.Module, data_cfg, *, batches: int) -> None:
    """Replace every BatchNorm's running statistics by their average over the first `batches` eval batches of
    `data_cfg`'s datasets (fewer when an epoch is shorter); no gradient step. Clip settings come from the model."""
    from pipeline.data import make_eval_loader
    from pipeline.data_config import data_config_for

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    data_cfg = data_config_for(data_cfg, model.input_contracts())
    model.train()
    for i, batch in enumerate(make_eval_loader(data_cfg)):
        model({k: v for k, v in batch.items() if torch.is_tensor(v)})
        if i + 1 == batches:
            break
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.eval()


def evaluate(model_dir: Path, dataset: Path, emb_dir: Path, space: str = "vt", report: Path | None = None) -> dict:
    """Embed `dataset` with the exported model, then text->video retrieval and k-means clustering metrics;
    with `report`, also the HTML cluster explorer of the k-means clusters (named by their majority class)."""
    from eval.clustering import cluster_metrics, kmeans, name_clusters
    from eval.embed import embed_dataset, load_model, read_embeddings
    from eval.report import write_report
    from eval.retrieval import retrieval_metrics

    model = load_model(model_dir, tokenizer=model_dir / TOKENIZER_NAME)
    shards = len(shard_paths(dataset))
    embed_dataset(model, dataset, emb_dir, windows=4, batch_size=8, num_workers=min(2, shards))
    emb = read_embeddings(emb_dir)
    video, text = emb.get(f"video@{space}"), emb.get(f"text@{space}")  # (N, D), (C, D)
    t2v = retrieval_metrics(text @ video.T, [np.array([v]) for v in emb.caption_video])
    labels = np.array([m.get("label") for m in emb.meta])
    classes = sorted(set(labels))
    truth = np.array([classes.index(lab) for lab in labels])
    assign = kmeans(video, len(classes), seed=0).assign
    clusters = cluster_metrics(assign, truth)
    row = {
        "t2v_R@1": t2v["R@1"],
        "t2v_R@5": t2v["R@5"],
        "t2v_R@10": t2v["R@10"],
        "t2v_MedR": t2v["MedR"],
        "NMI": clusters["nmi"],
        "acc": clusters["acc"],
        "videos": len(video),
        "captions": len(text),
    }
    if report is not None:
        names = {c: classes[n] for c, n in enumerate(name_clusters(assign, truth)) if n >= 0}
        metrics = {
            "text->video": {k: float(v) for k, v in row.items() if k.startswith("t2v")},
            "k-means": {"NMI": float(clusters["nmi"]), "acc": float(clusters["acc"])},
        }
        write_report(emb, assign, report, dataset=dataset, space=f"video@{space}", names=names, metrics=metrics)
    return row


def format_table(rows: dict[str, dict[str, float]], timings: dict[str, float], out: Path) -> str:
    """The closing one-screen summary: trained vs random init on the held-out split."""
    cols = ("t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MedR", "NMI", "acc")
    any_row = next(iter(rows.values()))
    lines = [
        "",
        f"== vatp quickstart: held-out split, {any_row['videos']} videos / {any_row['captions']} captions ==",
        f"{'model':<12}" + "".join(f"{c:>10}" for c in cols),
    ]
    for name, r in rows.items():
        lines.append(f"{name:<12}" + "".join(f"{r[c]:>10.3f}" if c == "NMI" else f"{r[c]:>10.1f}" for c in cols))
    lines.append("R@k and acc (Hungarian accuracy of k-means vs class) in percent; MedR in ranks; NMI in [0, 1].")
    lines.append(
        f"time: data {timings['data_s']:.0f} s, training {timings['train_s']:.0f} s, total {timings['total_s']:.0f} s"
    )
    lines.append(f"outputs: {out} (runs/, embed/, quickstart.json; the trained model's clusters: report/index.html)")
    return "\n".join(lines)
