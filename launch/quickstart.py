"""`vatp quickstart [--objective milnce|gdt|selavi|mmv]`: the whole pipeline on the CPU, from nothing to a
trained-vs-random comparison.

    synth corpus -> train/test shards -> tokenizer -> train the objective's quickstart recipe -> export
    -> embed the held-out split with the trained model and with the same architecture at random init
    -> the metrics of the objective's paper -> table + HTML report

Metrics per objective (the headline, higher is better, in the first column):
- milnce: text->video R@1/5/10 and MedR, k-means of the video embeddings (NMI, Hungarian accuracy);
- gdt: audio->video R@10/1/5 and MedR, k-means of the video embeddings;
- selavi: the self-label heads (best head against the classes: NMI, AMI, accuracy, purity), k-means of the
  backbone features;
- mmv: text->video and audio->video R@10, the self-label heads (NMI, AMI), k-means of the video embeddings.

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

from pipeline.checkpoint import environment
from pipeline.dataset import DATASET_JSON, TOKENIZER_NAME, shard_paths

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).parent / "configs"
RECIPES = {
    "milnce": CONFIGS / "quickstart.yaml",
    "gdt": CONFIGS / "quickstart_gdt.yaml",
    "selavi": CONFIGS / "quickstart_selavi.yaml",
    "mmv": CONFIGS / "quickstart_mmv.yaml",
}
COLUMNS = {
    "milnce": ("t2v_R@1", "t2v_R@5", "t2v_R@10", "t2v_MedR", "NMI", "acc"),
    "gdt": ("a2v_R@10", "a2v_R@1", "a2v_R@5", "a2v_MedR", "NMI", "acc"),
    "selavi": ("heads_NMI", "heads_AMI", "heads_acc", "heads_purity", "NMI", "acc"),
    "mmv": ("t2v_R@10", "a2v_R@10", "heads_NMI", "heads_AMI", "NMI", "acc"),
}
FRACTIONS = ("NMI", "heads_NMI", "heads_AMI", "heads_purity")  # in [0, 1]; every other column is % or ranks
SYNTH = dict(videos=400, seed=0, seconds=5.0, width=128, height=96, fps=20)
BUILD = dict(fps=10, short_side=64, max_seconds=30.0, sample_rate=16000, samples_per_shard=16)
VOCAB = 1000  # an upper bound: the synthetic narration has about 190 distinct words


def quickstart(
    out: str | Path,
    *,
    objective: str = "milnce",
    videos: int | None = None,
    steps: int | None = None,
    overrides: Sequence[str] = (),
) -> dict:
    """Run `objective`'s quickstart in `out`; return (and print) the comparison table's numbers. The corpus,
    shards and tokenizer are shared by every objective's quickstart in the same `out`."""
    if objective not in RECIPES:
        raise ValueError(f"unknown quickstart objective {objective!r} (known: {', '.join(RECIPES)})")
    recipe = RECIPES[objective]
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
    settings = [f"data.datasets=[{{path: {train_dir}}}]", f"run.runs_dir={out / 'runs'}"]
    base = load_train_config(recipe, settings)
    if base.model.text is not None:
        settings.append(f"model.vocab_size={pieces}")
    if steps is not None:
        settings += [f"run.steps={steps}", f"optim.warmup_steps={min(base.optim.warmup_steps, steps // 5)}"]
    cfg = load_train_config(recipe, [*settings, *overrides])
    run_dir = out / "runs" / cfg.run.name
    tag = latest_tag(run_dir) if run_dir.exists() else None
    t1 = time.perf_counter()
    if tag != f"step_{cfg.run.steps:08d}":
        train(cfg, resume=tag is not None)
    timings["train_s"] = time.perf_counter() - t1
    trained_dir = export_run(run_dir)
    random_dir = run_dir / "random_init"
    if not (random_dir / TOKENIZER_NAME).is_file():  # written last; made once: its embeddings are keyed by its bytes
        export_random_init(cfg, random_dir, tokenizer=tokenizer)

    # ---- evaluate both on the held-out split
    rows = {}
    for name, model_dir in (("random init", random_dir), ("trained", trained_dir)):
        emb_dir = out / "embed" / cfg.run.name / name.replace(" ", "_")
        if emb_dir.exists() and name == "trained" and tag != f"step_{cfg.run.steps:08d}":
            shutil.rmtree(emb_dir)  # embeddings of an earlier, unfinished state of this run
        report = out / ("report" if objective == "milnce" else f"report_{objective}") if name == "trained" else None
        rows[name] = evaluate(model_dir, test_dir, emb_dir, report=report, heads_report=objective == "selavi")
    timings["total_s"] = time.perf_counter() - t0
    result = {"objective": objective, "rows": rows, "timings": timings, "run_dir": str(run_dir)}
    result["test_dir"] = str(test_dir)
    result["environment"] = environment()  # the same seed gives the same table only on the same CPU type + versions
    summary = out / ("quickstart.json" if objective == "milnce" else f"quickstart_{objective}.json")
    summary.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(format_table(rows, timings, out, objective, result["environment"]))
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


def evaluate(
    model_dir: Path, dataset: Path, emb_dir: Path, report: Path | None = None, heads_report: bool = False
) -> dict:
    """Embed `dataset` with the exported model and score what its embedding holds: text->video and audio->video
    retrieval in the first space holding each pair, k-means of the video embeddings (`eval.probe`'s default
    array: a space, else the backbone features), and the self-label heads when the model has them. With `report`,
    also the HTML cluster explorer (k-means clusters, or the heads' with `heads_report`), named by majority class.
    """
    from eval.clustering import cluster_embeddings, cluster_metrics, kmeans, name_clusters
    from eval.embed import embed_dataset, load_model, read_embeddings
    from eval.probe import row_array
    from eval.report import write_report
    from eval.retrieval import evaluate_retrieval

    model = load_model(model_dir, tokenizer=model_dir / TOKENIZER_NAME)
    shards = len(shard_paths(dataset))
    embed_dataset(model, dataset, emb_dir, windows=4, batch_size=8, num_workers=min(2, shards))
    emb = read_embeddings(emb_dir)
    labels = np.array([m.get("label") for m in emb.meta])
    classes = sorted(set(labels))
    truth = np.array([classes.index(lab) for lab in labels])
    row: dict[str, float] = {"videos": len(emb.meta), "captions": len(emb.caption_video)}
    spaces = sorted({n.split("@", 1)[1] for n in emb.arrays if n.startswith("video@") and "." not in n})
    for query, prefix in (("text", "t2v"), ("audio", "a2v")):  # audio: each video's own, over those with audio
        space = next((s for s in spaces if f"{query}@{s}" in emb.arrays), None)
        if space is None:
            continue
        direction = f"{query}->video@{space}"
        m = evaluate_retrieval(emb, directions=[direction])[direction]
        row.update({f"{prefix}_R@{k}": m[f"R@{k}"] for k in (1, 5, 10)} | {f"{prefix}_MedR": m["MedR"]})
    assign = kmeans(row_array(emb, "auto"), len(classes), seed=0).assign
    clusters = cluster_metrics(assign, truth)
    row.update(NMI=clusters["nmi"], acc=clusters["acc"])
    if "video_logits" in emb.arrays or "audio_logits" in emb.arrays:
        summary, head_assign = cluster_embeddings(emb, method="heads", shots=())
        h = summary["metrics"]
        row.update(heads_NMI=h["nmi"], heads_AMI=h["anmi"], heads_acc=h["acc"], heads_purity=h["purity"])
        if heads_report:
            assign = head_assign
    if report is not None:
        names = {c: classes[n] for c, n in enumerate(name_clusters(assign, truth)) if n >= 0}
        metrics = {"quickstart": {k: float(v) for k, v in row.items() if k not in ("videos", "captions")}}
        write_report(emb, assign, report, dataset=dataset, names=names, metrics=metrics)
    return row


def format_table(
    rows: dict[str, dict[str, float]],
    timings: dict[str, float],
    out: Path,
    objective: str = "milnce",
    env: dict | None = None,
) -> str:
    """The closing one-screen summary: trained vs random init on the held-out split."""
    cols = COLUMNS[objective]
    any_row = next(iter(rows.values()))
    name = "vatp quickstart" + ("" if objective == "milnce" else f" --objective {objective}")
    lines = [
        "",
        f"== {name}: held-out split, {any_row['videos']} videos"
        + (f" / {any_row['captions']} captions ==" if any_row["captions"] else " =="),
        f"{'model':<12}" + "".join(f"{c:>13}" if len(c) > 9 else f"{c:>10}" for c in cols),
    ]
    for label, r in rows.items():
        cells = [f"{r[c]:.3f}" if c in FRACTIONS else f"{r[c]:.1f}" for c in cols]
        lines.append(f"{label:<12}" + "".join(f"{v:>13}" if len(c) > 9 else f"{v:>10}" for c, v in zip(cols, cells)))
    lines.append(
        "R@k and acc (Hungarian accuracy vs class) in percent; MedR in ranks; NMI, AMI and purity in [0, 1]; "
        "heads: the self-label head that best matches the classes; NMI/acc without a prefix: k-means."
    )
    lines.append(
        f"time: data {timings['data_s']:.0f} s, training {timings['train_s']:.0f} s, total {timings['total_s']:.0f} s"
    )
    if env is not None:
        v = env["versions"]
        lines.append(
            f"environment: {env['cpu']} ({env['cpu_capability']}), torch {v['torch']}, {env['torch_threads']} "
            f"thread(s), FAISS {v['faiss-cpu']}, PyAV {v['av']}, ffmpeg {env['ffmpeg']} (the same seed repeats "
            "this table on the same CPU type and versions)"
        )
    report = "report" if objective == "milnce" else f"report_{objective}"
    lines.append(f"outputs: {out} (runs/, embed/, quickstart*.json; the trained model's clusters: {report}/index.html)")
    return "\n".join(lines)
