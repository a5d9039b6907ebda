"""`vatp quickstart` end to end, cut down: 20 synthetic videos, 4 training steps, the real stages in between."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np

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
    assert (run_dir / "metrics.jsonl").stat().st_mtime == mtime  # no training step ran

    # Interrupted before its first checkpoint (the run dir has a config and metrics, no checkpoint): a re-run
    # starts the training over by itself instead of asking for --resume.
    shutil.rmtree(run_dir / "checkpoints")
    shutil.rmtree(run_dir / "export")
    assert main(args) == 0
    assert (run_dir / "checkpoints" / "step_00000004").is_dir()
    assert json.loads((out / "quickstart.json").read_text())["rows"] == rows  # same seeds, same table
