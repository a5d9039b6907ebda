"""`vatp eval benchmark` end to end on tiny replicas in the official file formats (the tests write the videos and
the annotation files the way each benchmark distributes them), with a tiny exported model."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest

from launch.cli import main

QUICK = ["--set", "size=32", "--set", "num_frames=4", "--set", "fps=10", "--set", "windows=2", "--workers", "1"]


def _video(path: Path, colour: str, seconds: float = 1.5) -> Path:
    """A real mp4 (h264) of a moving test pattern tinted `colour`, as the benchmarks' own .avi/.mp4 files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    src = f"testsrc=size=64x48:rate=25:duration={seconds},colorbalance=rs={colour}"
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-f", "lavfi", "-i", src]
    subprocess.run([*argv, "-pix_fmt", "yuv420p", str(path)], check=True, timeout=60, capture_output=True)
    return path


@pytest.fixture(scope="module")
def model(export_tiny_model):
    from models.towers import SpaceConfig

    export, data = export_tiny_model(
        "benchmark", video="s3d_tiny", text="text_tiny", spaces=[SpaceConfig("vt", ["video", "text"], dim=16)]
    )
    return export, data / "tokenizer.model"


def test_ucf101_from_its_split_lists(model, tmp_path, capsys):
    export, tokenizer = model
    root = tmp_path / "UCF101"
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\r\n2 YoYo\r\n")
    train, test = [], []
    for name, colour in [("ApplyEyeMakeup", "0.8"), ("YoYo", "-0.8")]:
        for g in range(1, 5):
            rel = f"{name}/v_{name}_g{g:02d}_c01.avi"
            _video(root / "UCF-101" / rel, colour)
            (train if g > 1 else test).append(rel)
    (lists / "trainlist01.txt").write_text("".join(f"{r} {1 + ('YoYo' in r)}\r\n" for r in train))
    (lists / "testlist01.txt").write_text("".join(f"{r}\r\n" for r in test))
    out = tmp_path / "bench"
    argv = ["eval", "benchmark", "ucf101", "--root", str(root), "--checkpoint", str(export), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK]) == 0
    result = json.loads((out / "ucf101.json").read_text())
    m = result["metrics"]
    assert (m["classes"], m["train"], m["test"]) == (2, 6, 2)
    assert {"svm_top1", "knn_top1", "zeroshot_top1"} <= set(m) and 0 <= m["svm_top1"] <= 100
    assert result["paper"]["svm_top1"] == 82.7 and "eval_hmdb" in result["protocol"]["source"]
    windows = np.load(out / "ucf101" / "emb_train" / "video_feat.windows.npy")
    assert windows.shape[:2] == (6, 2)  # every window's features: the SVM is fitted on windows, as MIL-NCE
    table = capsys.readouterr().out
    assert "svm_top1" in table and "82.7" in table
    built = (out / "ucf101" / "data_test" / "dataset.json").stat().st_mtime
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK]) == 0  # a re-run reuses the shards and embeddings
    assert (out / "ucf101" / "data_test" / "dataset.json").stat().st_mtime == built
    assert json.loads((out / "ucf101.json").read_text())["metrics"] == m


def test_msrvtt_1k_a_from_the_jsfusion_list(model, tmp_path, capsys):
    export, tokenizer = model
    root = tmp_path / "MSRVTT"
    rows = ["key,vid_key,video_id,sentence"]
    pairs = [("0.8", "a red square moves"), ("-0.8", "a blue circle spins"), ("0", "a man")]
    for i, (colour, text) in enumerate(pairs):
        _video(root / "videos" / f"video{7000 + i}.mp4", colour)
        rows.append(f"ret{i},msr{7000 + i},video{7000 + i},{text}")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "bench"
    argv = ["eval", "benchmark", "msrvtt", "--root", str(root), "--checkpoint", str(export), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK]) == 0
    m = json.loads((out / "msrvtt.json").read_text())["metrics"]
    assert m["queries"] == 3 and 0 <= m["t2v_R@1"] <= m["t2v_R@5"] <= 100 and 1 <= m["t2v_MedR"] <= 3
    assert "9.9" in capsys.readouterr().out  # the paper's R@1 beside ours
    assert main(["eval", "benchmark", "msrvtt", "--root", str(tmp_path / "none"), "--checkpoint", str(export)]) == 2
    assert "MSRVTT_JSFUSION_test.csv not found" in capsys.readouterr().err
