"""`vatp quickstart` end to end, cut down: 20 synthetic videos, 4 training steps, the real stages in between."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from launch.cli import main


def test_quickstart_runs_every_stage_and_a_rerun_reuses_them(tmp_path, capsys, restore_launcher_env):
    out = tmp_path / "qs"
    args = [
        "quickstart",
        "--out",
        str(out),
        "--videos",
        "20",
        "--steps",
        "4",
        "--set",
        "run.batch_size=4",
        "--set",
        "run.ckpt_every=2",
        "--set",
        "data.num_workers=0",
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    result = json.loads((out / "quickstart.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"random init", "trained"}
    test_videos = sum(1 for line in (out / "synth" / "manifest.csv").read_text().splitlines() if line.endswith(",test"))
    for row in rows.values():
        assert row["videos"] == test_videos and row["captions"] > 0
        assert all(math.isfinite(row[k]) for k in ("t2v_R@1", "t2v_R@10", "NMI", "acc"))
        assert 0 <= row["t2v_R@1"] <= row["t2v_R@5"] <= row["t2v_R@10"] <= 100
    emb = out / "embed" / "quickstart"
    trained, random_init = (np.load(emb / name / "video@vt.npy") for name in ("trained", "random_init"))
    assert trained.shape == random_init.shape and not np.allclose(trained, random_init)  # two models were embedded
    lines = [line.split() for line in table.splitlines()]
    assert ["random", "init"] == lines[[i for i, w in enumerate(lines) if w[:1] == ["random"]][0]][:2]
    assert any(w[:1] == ["trained"] for w in lines)
    run_dir = out / "runs" / "quickstart"
    assert (run_dir / "checkpoints" / "step_00000004").is_dir() and (run_dir / "export" / "model.safetensors").is_file()
    assert "cluster" in (out / "report" / "index.html").read_text().lower()

    # A re-run finds the finished corpus, shards, tokenizer and run, and gives the same table.
    mtime = (run_dir / "metrics.jsonl").stat().st_mtime
    assert main(args) == 0
    again = json.loads((out / "quickstart.json").read_text())
    assert again["rows"] == rows
    assert again["environment"]["cpu_capability"] and again["environment"]["versions"]["torch"] == torch.__version__
    assert "environment:" in capsys.readouterr().out  # the table names what it was measured on
    assert (run_dir / "metrics.jsonl").stat().st_mtime == mtime  # no training step ran

    # Interrupted before its first checkpoint (the run dir has a config and metrics, no checkpoint): a re-run
    # starts the training over by itself instead of asking for --resume.
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "export")
    assert main(args) == 0
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()
    assert json.loads((out / "quickstart.json").read_text())["rows"] == rows  # same seeds, same table


# What each objective's evaluation needs in the trained model's embedding, and its table's columns.
NEEDS = {
    "gdt": ("video@va", "audio@va", "video_feat", "audio_feat"),
    "selavi": ("video_feat", "audio_feat", "video_logits", "audio_logits"),
    "mmv": ("video@va", "audio@va", "video@vat", "text@vat", "video_logits"),
}


@pytest.fixture(scope="module")
def shared_out(tmp_path_factory):
    """One quickstart folder for every objective: they share the corpus, the shards and the tokenizer."""
    return tmp_path_factory.mktemp("qs_objectives") / "qs"


@pytest.mark.parametrize("objective", ["gdt", "selavi", "mmv"])
def test_quickstart_of_each_objective_prints_its_table(objective, shared_out, capsys, restore_launcher_env):
    from launch.quickstart import COLUMNS

    args = ["quickstart", "--objective", objective, "--out", str(shared_out), "--videos", "20", "--steps", "4"]
    args += ["--set", "run.batch_size=4", "--set", "data.num_workers=0"]
    if objective in ("selavi", "mmv"):  # about 14 training videos: fewer clusters than videos, a short warm-up
        args += ["--set", "model.selflabel_clusters=4", "--set", "loss.selflabel.bn_warmup_batches=2"]
    assert main(args) == 0
    table = capsys.readouterr().out
    result = json.loads((shared_out / f"quickstart_{objective}.json").read_text())
    assert result["objective"] == objective and set(result["rows"]) == {"random init", "trained"}
    header = next(line for line in table.splitlines() if line.startswith("model"))
    assert header.split()[1:] == list(COLUMNS[objective])
    for row in result["rows"].values():
        assert all(math.isfinite(row[c]) for c in COLUMNS[objective]), row
    trained = shared_out / "embed" / f"quickstart_{objective}" / "trained"
    assert {f"{name}.npy" for name in NEEDS[objective]} <= {p.name for p in trained.iterdir()}
    assert (shared_out / f"report_{objective}" / "index.html").is_file()
    assert (shared_out / "data" / "train" / "dataset.json").is_file()  # built once, by the first objective
