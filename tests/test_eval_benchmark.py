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

QUICK = ["--set", "size=32", "--set", "num_frames=4", "--set", "fps=10", "--set", "windows=2", "--set", "workers=1"]
ONE_SPLIT = ["--set", "folds=1"]  # replicas of UCF101 / HMDB51 with split 1's lists only


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
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK]) == 2  # the default is the mean of the three splits
    err = capsys.readouterr().err
    assert "no trainlist02.txt for split 2 (set folds=1" in err and not (out / "ucf101").exists()  # before any work
    argv += ONE_SPLIT
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK]) == 0
    result = json.loads((out / "ucf101.json").read_text())
    m = result["metrics"]
    assert (m["classes"], m["train"], m["test"]) == (2, 6, 2)
    assert {"svm_top1", "knn_top1", "zeroshot_top1"} <= set(m) and 0 <= m["svm_top1"] <= 100
    assert result["references"]["paper"]["values"]["svm_top1"] == 82.7 and "eval_hmdb" in result["protocol"]["source"]
    (emb_train,) = (out / "ucf101").glob("emb_train-*")
    windows = np.load(emb_train / "video_feat.windows.npy")
    assert windows.shape[:2] == (6, 2)  # every window's features: the SVM is fitted on windows, as MIL-NCE
    table = capsys.readouterr().out
    assert "svm_top1" in table and "82.7" in table
    built = (out / "ucf101" / "data_test" / "dataset.json").stat().st_mtime
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK]) == 0  # a re-run reuses the shards and embeddings
    assert (out / "ucf101" / "data_test" / "dataset.json").stat().st_mtime == built
    assert json.loads((out / "ucf101.json").read_text())["metrics"] == m

    # Splits 2 and 3 (the official lists hold a different train/test partition each): the mean of the three.
    for fold in (2, 3):
        held_out = [r for r in train + test if r.split("/")[1].endswith(f"g0{fold}_c01.avi")]
        (lists / f"trainlist0{fold}.txt").write_text("".join(f"{r} 1\r\n" for r in train + test if r not in held_out))
        (lists / f"testlist0{fold}.txt").write_text("".join(f"{r}\r\n" for r in held_out))
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK, "--set", "folds=3"]) == 0
    three = json.loads((out / "ucf101.json").read_text())
    assert three["metrics"]["folds"] == 3 and len(three["splits"]) == 3 and three["splits"][0] == m
    mean = sum(f["svm_top1"] for f in three["splits"]) / 3
    assert three["metrics"]["svm_top1"] == pytest.approx(mean)
    assert (out / "ucf101" / "data_test_split3" / "dataset.json").is_file()
    # Another protocol (or checkpoint) embeds anew next to the first; the shards are shared.
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK, "--set", "windows=1"]) == 0
    assert len(list((out / "ucf101").glob("emb_train-*"))) == 2
    assert (out / "ucf101" / "data_test" / "dataset.json").stat().st_mtime == built


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
    table = capsys.readouterr().out
    assert "9.9" in table and "TF eval" in table.splitlines()[1] and "PyTorch" in table.splitlines()[1]
    assert "TF eval: MIL-NCE paper / README: DeepMind's TensorFlow evaluation" in table  # what each column is
    assert "PyTorch: the official PyTorch eval_msrvtt.py on the released S3D-G" in table
    result = json.loads((out / "msrvtt.json").read_text())
    assert result["references"]["PyTorch"]["values"]["t2v_R@10"] == 35.0 and result["metrics"]["similarity"] == "cosine"
    # the checkpoint's own clip (its frames and rate) instead of the official 16 at 5 fps: embedded anew
    assert (
        main([*argv, "--tokenizer", str(tokenizer), "--set", "clip=model", "--set", "size=32", "--set", "windows=2"])
        == 0
    )
    own = json.loads((out / "msrvtt.json").read_text())["protocol"]
    assert own["clip_setting"] == "model" and own["clip"] == {"size": 32}
    assert len(list((out / "msrvtt").glob("emb_test-*"))) == 2
    assert main(["eval", "benchmark", "msrvtt", "--root", str(tmp_path / "none"), "--checkpoint", str(export)]) == 2
    assert "MSRVTT_JSFUSION_test.csv not found" in capsys.readouterr().err


def test_youcook2_scores_each_validation_step_as_a_clip(model, tmp_path):
    export, tokenizer = model
    root = tmp_path / "YouCook2"
    database = {}
    for vid, subset, colour in [("GLd3aX16zBg", "validation", "0.8"), ("xHr8X2Wpmno", "validation", "-0.8"),
                                ("trainVid001", "training", "0")]:  # fmt: skip
        _video(root / "raw_videos" / subset / "113" / f"{vid}.mp4", colour, seconds=4.0)
        steps = [{"id": 0, "segment": [0, 2], "sentence": f"{vid} first step"},
                 {"id": 1, "segment": [2, 4], "sentence": f"{vid} second step"}]  # fmt: skip
        database[vid] = {"subset": subset, "recipe_type": "113", "duration": 4.0, "annotations": steps}
    (root / "youcookii_annotations_trainval.json").write_text(json.dumps({"database": database}))
    out = tmp_path / "bench"
    argv = ["eval", "benchmark", "youcook2", "--root", str(root), "--checkpoint", str(export), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK]) == 0
    m = json.loads((out / "youcook2.json").read_text())["metrics"]
    assert m["queries"] == 4  # the four validation steps, not the training video's
    (emb,) = (out / "youcook2").glob("emb_val-*")
    meta = [json.loads(line) for line in (emb / "meta.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in meta) == ["GLd3aX16zBg_0", "GLd3aX16zBg_1", "xHr8X2Wpmno_0", "xHr8X2Wpmno_1"]
    assert all(abs(r["duration"] - 2.0) < 0.2 for r in meta)  # each clip is its step's segment
    warnings = json.loads((out / "youcook2.json").read_text())["warnings"]
    assert any("validation_youcook.csv not found" in w for w in warnings)  # not MIL-NCE's list: said so


def test_youcook2_scores_milnce_s_clip_list_with_windows_running_past_short_steps(model, tmp_path):
    """validation_youcook.csv (MIL-NCE's 3,350 steps) is the clip list; as eval_youcook.py, each 3.2-s window is cut
    from the whole video, so the windows of a step shorter than that show the frames that follow it."""
    export, tokenizer = model
    root = tmp_path / "YouCook2"
    video = root / "validation" / "226" / "xHr8X2Wpmno.mp4"  # MIL-NCE's Youcook2_val layout: validation/<task>/
    video.parent.mkdir(parents=True)
    red_then_blue = "color=c=red:size=64x48:rate=25:duration=8,drawbox=c=blue:t=fill:enable='gte(t,3)'"
    argv = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-f", "lavfi", "-i", red_then_blue]
    subprocess.run([*argv, "-pix_fmt", "yuv420p", str(video)], check=True, timeout=60, capture_output=True)
    _video(root / "validation" / "105" / "V53XmPeyjIU.mp4", "0.8", seconds=6.0)
    rows = ["end,start,task,text,video_id", "2,1,226,pick the ends off,xHr8X2Wpmno",
            "7.9,3.5,226,combine lemon juice,xHr8X2Wpmno", "5,0,105,combine salt and butter,V53XmPeyjIU"]  # fmt: skip
    (root / "validation_youcook.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "bench"
    argv = ["eval", "benchmark", "youcook2", "--root", str(root), "--checkpoint", str(export), "--out", str(out)]
    small = ["--set", "size=32", "--set", "windows=2", "--set", "workers=1"]  # the official 16 frames at 5 fps
    assert main([*argv, "--tokenizer", str(tokenizer), *small]) == 0
    result = json.loads((out / "youcook2.json").read_text())
    assert result["metrics"]["queries"] == 3 and not any("not found" in w for w in result["warnings"])
    (emb,) = (out / "youcook2").glob("emb_val-*")
    meta = {r["id"]: r for r in map(json.loads, (emb / "meta.jsonl").read_text().splitlines())}
    assert sorted(meta) == ["V53XmPeyjIU_0002", "xHr8X2Wpmno_0000", "xHr8X2Wpmno_0001"]
    short = meta["xHr8X2Wpmno_0000"]  # 1 s long: both windows start with it and run 3.2 s, past its end
    assert short["windows"] == [[1.0, 4.2], [1.0, 4.2]]
    assert meta["xHr8X2Wpmno_0001"]["windows"] == [[3.5, 6.7], [4.3, 7.5]]  # linspace(start, end - 3.6, 2)

    from pipeline.dataset import iter_samples, shard_paths
    from pipeline.video import decode_clip, open_video

    samples = {}
    for shard in shard_paths(out / "youcook2" / "data_val"):
        with open(shard, "rb") as f:
            samples.update({json.loads(files["json"])["id"]: files for _, files in iter_samples(f)})
    clip = decode_clip(open_video(samples["xHr8X2Wpmno_0000"]["mp4"]), 0.0, 16, 5.0).dense().float()  # (3, T, H, W)
    red_minus_blue = (clip[0] - clip[2]).mean((1, 2))  # per frame
    assert (red_minus_blue[:10] > 100).all() and (red_minus_blue[-5:] < -100).all()  # the step, then what follows


def test_vggsound_clusters_the_train_split_with_chance_beside_it(model, tmp_path, capsys):
    """SeLaVi labels and scores the split it trained on; NMI and accuracy of a random clustering are far from 0
    on a small split, so the chance level is printed beside them."""
    export, tokenizer = model
    root = tmp_path / "VGGSound"
    rows = []
    for i, (label, colour) in enumerate([("dog barking", "0.8")] * 3 + [("playing piano", "-0.8")] * 3):
        ytid = f"yt{i:09d}"
        _video(root / "video" / f"{ytid}_000030.mp4", colour, seconds=2.0)
        rows.append(f"{ytid},30,{label},{'test' if i % 3 == 0 else 'train'}")
    (root / "vggsound.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "bench"
    argv = ["eval", "benchmark", "vggsound", "--root", str(root), "--checkpoint", str(export), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK, "--set", "windows=1"]) == 0
    result = json.loads((out / "vggsound.json").read_text())
    m = result["metrics"]
    assert (m["classes"], m["videos"], m["method"]) == (2, 4, "kmeans")  # the 4 train clips, k = 2 classes
    assert 0 <= m["NMI"] <= 100 and 50 <= m["acc"] <= 100  # Hungarian accuracy of 2 clusters is at least half
    assert list(m)[:2] == ["aNMI", "ARI"] and set(m["chance"]) == {"aNMI", "ARI", "NMI", "acc", "purity"}
    assert 50 <= m["chance"]["acc"] <= 100 and result["protocol"]["split"] == "train"
    assert result["references"]["SeLaVi"]["values"]["NMI"] == 54.6  # one table's row, all from the same run
    table = capsys.readouterr().out
    assert "chance" in table.splitlines()[1] and "SeLaVi: SeLaVi paper, the clustering table" in table
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK, "--set", "windows=1", "--set", "split=test"]) == 0
    assert json.loads((out / "vggsound.json").read_text())["metrics"]["videos"] == 2


def test_the_clustering_clip_is_the_middle_second(tmp_path):
    from pipeline.views import eval_window_starts

    assert eval_window_starts(10.0, 1.0, 1, placement="middle") == [4.5]  # SeLaVi: frame 500 of 1000 onwards
    assert eval_window_starts(0.6, 1.0, 1, placement="middle") == [0.0]  # shorter than the clip: from the start
    assert eval_window_starts(10.0, 1.0, 1) == [0.0]  # spread placement: the first second


def test_kinetics400_zero_shot_from_its_validation_csv(model, tmp_path, capsys):
    export, tokenizer = model
    root = tmp_path / "K400"
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i, (label, colour) in enumerate([("playing guitar", "0.8"), ("riding a bike", "-0.8"), ("yoga", "0")]):
        ytid = f"k4{i:09d}"
        _video(root / "val" / f"{ytid}_000000_000002.mp4", colour, seconds=2.0)
        rows.append(f"{label},{ytid},0,2,validate")
    (root / "kinetics400").mkdir(parents=True)
    (root / "kinetics400" / "validate.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "bench"
    argv = ["eval", "benchmark", "kinetics400", "--root", str(root), "--checkpoint", str(export), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK]) == 0
    m = json.loads((out / "kinetics400.json").read_text())["metrics"]
    assert (m["classes"], m["videos"]) == (3, 3) and 0 <= m["top1"] <= 100 and "top5" not in m  # 3 classes: no top-5
    table = capsys.readouterr().out
    assert "top1" in table.split("\n")[2] and table.split("\n")[2].endswith("!")  # 3 videos: flagged beside it
    assert "videos val: 3 listed, 3 built, 3 scored (0 failed at build, 0 skipped at embed)" in table
    assert "! val: 3 videos scored (fewer than 10)" in table
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK, "--set", "templates=['{}']"]) == 0
    again = json.loads((out / "kinetics400.json").read_text())["metrics"]
    assert again["videos"] == 3  # the embeddings are reused; only the prompts changed
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK, "--set", "templates=['no slot']"]) == 2


def test_hmdb51_from_its_split_files(model, tmp_path):
    export, tokenizer = model
    root = tmp_path / "HMDB51"
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for label, colour in [("brush_hair", "0.8"), ("cartwheel", "-0.8")]:
        lines = []
        for i, kind in enumerate([1, 1, 1, 2, 0]):
            name = f"{label}_clip_{i}.avi"
            _video(root / "hmdb51" / label / name, colour)
            lines.append(f"{name} {kind} ")
        if label == "brush_hair":
            lines.append("listed_but_missing.avi 2 ")  # a video the list names but the folder lacks
        (splits / f"{label}_test_split1.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "bench"
    argv = ["eval", "benchmark", "hmdb51", "--root", str(root), "--checkpoint", str(export), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK, *ONE_SPLIT]) == 0
    result = json.loads((out / "hmdb51.json").read_text())
    assert (result["metrics"]["train"], result["metrics"]["test"]) == (6, 2)  # the "0" (unused) rows left out
    assert result["references"]["paper"]["values"] == {"svm_top1": 53.1}
    assert result["videos"] == {
        "train": {"listed": 6, "built": 6, "scored": 6, "failed": 0, "skipped": 0},
        "test": {"listed": 3, "built": 2, "scored": 2, "failed": 1, "skipped": 0, "too_few": True},
    }
    assert not result["comparable"] and any("1 of the 3 listed videos" in w for w in result["warnings"])
    svm = result["metrics"]["svm"]  # the official solver, and how its fit went
    assert svm["solver"].startswith("liblinear") and svm["C"] == 100.0 and svm["objective"] > 0


def test_ave_clusters_its_train_split_from_its_own_list(model, tmp_path):
    export, tokenizer = model
    root = tmp_path / "AVE_Dataset"
    lines = ["Category&VideoID&Quality&StartTime&EndTime"]
    for i, (label, colour) in enumerate([("Church bell", "0.8")] * 2 + [("Barking", "-0.8")] * 2):
        _video(root / "AVE" / f"ave{i:08d}.mp4", colour)
        lines.append(f"{label}&ave{i:08d}&good&0&1")
    (root / "trainSet.txt").write_text("\n".join(lines) + "\n")
    (root / "testSet.txt").write_text("\n".join(lines[:2] + lines[3:4]) + "\n")
    out = tmp_path / "bench"
    argv = ["eval", "benchmark", "ave", "--root", str(root), "--checkpoint", str(export), "--out", str(out)]
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK, "--set", "windows=1"]) == 0
    result = json.loads((out / "ave.json").read_text())
    assert (result["metrics"]["classes"], result["metrics"]["videos"]) == (2, 4)  # trainSet.txt, SeLaVi's split
    assert result["references"]["SeLaVi"]["values"]["NMI"] == 66.2 and result["protocol"]["placement"] == "middle"
    assert main([*argv, "--tokenizer", str(tokenizer), *QUICK, "--set", "windows=1", "--set", "split=test"]) == 0
    assert json.loads((out / "ave.json").read_text())["metrics"]["videos"] == 2  # testSet.txt


def test_the_released_checkpoint_format_goes_through_msrvtt_and_youcook2_with_the_official_protocol(tmp_path):
    """A width-1/8 stand-in for s3d_howto100m.pth (the release's key layout) with a word2vec word list, at the
    protocols as MIL-NCE's evaluators run them: 10 windows of 16 frames at 5 fps, 224 px, dot product."""
    import torch

    from models.s3d import S3D, Word2VecText

    torch.manual_seed(0)
    words = np.array(["a", "red", "square", "moves", "blue", "circle", "spins", "first", "second", "step"])
    video, text = S3D(space_to_depth=True, width=0.125, embed_dim=512), Word2VecText(words)
    state = {**video.state_dict(), **{f"text_module.{k}": v for k, v in text.state_dict().items()}}
    torch.save(state, tmp_path / "s3d_howto100m.pth")
    np.save(tmp_path / "s3d_dict.npy", words)
    release = ["--checkpoint", str(tmp_path / "s3d_howto100m.pth"), "--dict", str(tmp_path / "s3d_dict.npy")]

    msrvtt = tmp_path / "MSRVTT"
    rows = ["key,vid_key,video_id,sentence"]
    for i, (colour, sentence) in enumerate([("0.8", "a red square moves"), ("-0.8", "a blue circle spins")]):
        _video(msrvtt / "videos" / f"video{9000 + i}.mp4", colour, seconds=3.0)
        rows.append(f"ret{i},msr{9000 + i},video{9000 + i},{sentence}")
    (msrvtt / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows) + "\n")
    youcook = tmp_path / "YouCook2"
    steps = [
        {"id": 0, "segment": [0, 2], "sentence": "first step"},
        {"id": 1, "segment": [2, 4], "sentence": "second step"},
    ]
    _video(youcook / "raw_videos" / "validation" / "101" / "ycVid000001.mp4", "0.5", seconds=4.0)
    database = {"ycVid000001": {"subset": "validation", "recipe_type": "101", "annotations": steps}}
    (youcook / "youcookii_annotations_trainval.json").write_text(json.dumps({"database": database}))

    out = tmp_path / "bench"
    for name, root, queries in (("msrvtt", msrvtt, 2), ("youcook2", youcook, 2)):
        assert (
            main(["eval", "benchmark", name, "--root", str(root), *release, "--out", str(out), "--set", "workers=1"])
            == 0
        )
        result = json.loads((out / f"{name}.json").read_text())
        assert result["metrics"]["queries"] == queries and result["protocol"]["windows"] == 10
        assert result["protocol"]["clip"] == {"num_frames": 16, "fps": 5.0}
        (emb,) = (out / name).glob("emb_test-*" if name == "msrvtt" else "emb_val-*")
        info = json.loads((emb / "embed.json").read_text())
        assert info["kind"] == "s3d_howto100m" and info["dot_product_spaces"] == ["vt"] and info["windows"] == 10
        assert np.load(emb / "video@vt.windows.npy").shape[1:] == (10, 512)  # ten 16-frame windows per clip


def _kinetics(root: Path, labels: list[str], *, present=None, csv=("kinetics400", "validate.csv"), split="validate"):
    """A Kinetics-400 replica: one 2-s clip per label (tinted apart) under `root/val`, those in `present` (default
    all) on disk, and the validation CSV at `root/<csv>`."""
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i, label in enumerate(labels):
        if present is None or i in present:
            _video(root / "val" / f"k4{i:09d}_000000_000002.mp4", f"{0.8 - 0.4 * i:.1f}", seconds=2.0)
        rows.append(f"{label},k4{i:09d},0,2,{split}")
    path = root.joinpath(*csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(rows) + "\n")
    return root


def _reexport(export: Path, dest: Path, shift: float = 0.05) -> None:
    """`export`'s model with its first weight shifted by `shift`, written to `dest` (e.g. re-exported in place)."""
    import torch

    from models.towers import load_exported, save_exported

    module, cfg = load_exported(export)
    with torch.no_grad():
        next(module.parameters()).add_(shift)
    save_exported(module, cfg, dest)


def _bench(name: str, root: Path, export: Path, out: Path, tokenizer: Path, *extra: str) -> int:
    argv = ["eval", "benchmark", name, "--root", str(root), "--checkpoint", str(export), "--out", str(out)]
    return main([*argv, "--tokenizer", str(tokenizer), *extra])


def test_a_checkpoint_re_exported_to_the_same_path_is_embedded_again_with_the_default_workers(model, tmp_path, caplog):
    """The embedding cache is keyed by the checkpoint's content; `--workers 2` (the default) on a one-shard split
    uses one loader worker instead of failing."""
    import shutil

    export, tokenizer = model
    ckpt = tmp_path / "ckpt"
    shutil.copytree(export, ckpt)
    root, out = _kinetics(tmp_path / "K400", ["playing guitar", "riding a bike", "yoga"]), tmp_path / "bench"
    quick = [a for a in QUICK if a != "workers=1"][:-1]  # the default workers
    with caplog.at_level("INFO", logger="eval.embed"):
        assert _bench("kinetics400", root, ckpt, out, tokenizer, *quick) == 0
    assert "1 shard(s), so 1 loader worker(s) per rank instead of 2" in caplog.text
    first = json.loads((out / "kinetics400.json").read_text())
    _reexport(export, ckpt)
    assert _bench("kinetics400", root, ckpt, out, tokenizer, *quick) == 0
    second = json.loads((out / "kinetics400.json").read_text())
    assert first["fingerprint"] != second["fingerprint"]
    dirs = sorted((out / "kinetics400").glob("emb_val-*"))
    assert len(dirs) == 2  # embedded anew, next to the first checkpoint's
    made = {json.loads((d / "embed.json").read_text())["fingerprint"] for d in dirs}
    assert made == {first["fingerprint"], second["fingerprint"]}


def test_a_video_downloaded_after_the_first_run_is_built_and_scored_on_the_next(model, tmp_path, caplog):
    export, tokenizer = model
    labels = ["playing guitar", "riding a bike", "yoga", "yoga"]
    root, out = _kinetics(tmp_path / "K400", labels, present={0, 1, 2}), tmp_path / "bench"
    assert _bench("kinetics400", root, export, out, tokenizer, *QUICK) == 0
    videos = json.loads((out / "kinetics400.json").read_text())["videos"]["val"]
    assert videos == {"listed": 4, "built": 3, "scored": 3, "failed": 1, "skipped": 0, "too_few": True}
    _video(root / "val" / "k4000000003_000000_000002.mp4", "-0.4", seconds=2.0)  # downloaded since
    with caplog.at_level("WARNING"):
        assert _bench("kinetics400", root, export, out, tokenizer, *QUICK) == 0
    assert "1 listed video(s) missing when it was built are under" in caplog.text
    assert "building the split again" in caplog.text
    result = json.loads((out / "kinetics400.json").read_text())
    assert result["videos"]["val"] == {"listed": 4, "built": 4, "scored": 4, "failed": 0, "skipped": 0, "too_few": True}
    assert result["metrics"]["videos"] == 4 and len(list((out / "kinetics400").glob("emb_val-*"))) == 1


def test_a_sample_skipped_at_embed_is_counted_and_flagged(model, tmp_path, capsys):
    """A corrupt mp4 member is built into the shards but skipped by the loader: 3 of 4 scored, and said so."""
    import shutil

    from data_prep.shards import write_shard
    from pipeline.dataset import iter_samples

    export, tokenizer = model
    root = _kinetics(tmp_path / "K400", ["playing guitar", "riding a bike", "yoga", "yoga"])
    out = tmp_path / "bench"
    assert _bench("kinetics400", root, export, out, tokenizer, *QUICK) == 0
    (shard,) = (out / "kinetics400" / "data_val" / "shards").glob("*.tar")
    with open(shard, "rb") as f:
        samples = list(iter_samples(f))
    samples[1][1]["mp4"] = b"\x00\x00\x00\x18ftypmp42 not a video any more"
    write_shard(str(shard), samples)
    for emb in (out / "kinetics400").glob("emb_val-*"):
        shutil.rmtree(emb)
    capsys.readouterr()
    assert _bench("kinetics400", root, export, out, tokenizer, *QUICK) == 0
    result = json.loads((out / "kinetics400.json").read_text())
    assert result["videos"]["val"] == {"listed": 4, "built": 4, "scored": 3, "failed": 0, "skipped": 1, "too_few": True}
    assert result["metrics"]["videos"] == 3
    assert any("3 of the 4 built samples were scored (1 skipped at embed" in w for w in result["warnings"])
    table = capsys.readouterr().out
    assert "videos val: 4 listed, 4 built, 3 scored (0 failed at build, 1 skipped at embed)" in table
    assert "! val: 3 of the 4 built samples were scored" in table


def test_no_videos_in_place_is_one_line_naming_the_folder_and_keeps_no_build(model, tmp_path, capsys):
    export, tokenizer = model
    root = tmp_path / "MSRVTT"
    (root / "videos").mkdir(parents=True)
    rows = ["key,vid_key,video_id,sentence"] + [f"ret{i},msr{7000 + i},video{7000 + i},a clip {i}" for i in range(3)]
    (root / "MSRVTT_JSFUSION_test.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "bench"
    capsys.readouterr()
    assert _bench("msrvtt", root, export, out, tokenizer, *QUICK) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the build's progress bars
    assert err.startswith("vatp eval benchmark: error: ") and "data.num_workers" not in err
    assert f"{root / 'videos'} holds none of the 3 videos that MSRVTT_JSFUSION_test.csv lists" in err
    assert "video7000.*" in err
    assert not (out / "msrvtt" / "data_test").exists()  # not kept: the next run builds again
    for i in range(3):
        _video(root / "videos" / f"video{7000 + i}.mp4", f"{0.8 - 0.8 * i:.1f}")
    assert _bench("msrvtt", root, export, out, tokenizer, *QUICK) == 0
    assert json.loads((out / "msrvtt.json").read_text())["videos"]["test"]["scored"] == 3


def test_what_the_benchmark_needs_is_checked_before_anything_is_built(model, tmp_path, capsys):
    from models.towers import ModelConfig, SpaceConfig, build_model, save_exported

    export, tokenizer = model
    cfg = ModelConfig(video="s3d_tiny", audio="audio_tiny", spaces=[SpaceConfig("va", ["video", "audio"], dim=16)])
    va = tmp_path / "va_export"  # a video-audio model: no text tower, no video-text space
    save_exported(build_model(cfg), cfg, va)
    root = tmp_path / "MSRVTT"
    _video(root / "videos" / "video7000.mp4", "0.8")
    (root / "MSRVTT_JSFUSION_test.csv").write_text("key,vid_key,video_id,sentence\nret0,msr7000,video7000,a clip\n")
    out = tmp_path / "bench"
    for name, where in (("msrvtt", root), ("kinetics400", _kinetics(tmp_path / "K400", ["yoga", "dancing"]))):
        capsys.readouterr()
        assert _bench(name, where, va, out, tokenizer, *QUICK) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "has no space of video and text (its spaces: va (video+audio))" in err
        assert not (out / name).exists()  # refused before building or embedding
    # One class on disk: nothing to tell apart, refused rather than printed as 100 %.
    one = _kinetics(tmp_path / "K400one", ["yoga", "yoga", "yoga"])
    assert _bench("kinetics400", one, export, out, tokenizer, *QUICK) == 2
    assert "the val split has videos of 1 class(es) (yoga): there is nothing to tell apart" in capsys.readouterr().err


def test_the_current_kinetics_download_and_hmdb51_class_folders_under_root(model, tmp_path):
    export, tokenizer = model
    k400 = _kinetics(tmp_path / "k400", ["yoga", "dancing"], csv=("annotations", "val.csv"), split="val")
    out = tmp_path / "nested" / "bench"  # --out's parents are created
    assert _bench("kinetics400", k400, export, out, tokenizer, *QUICK) == 0
    assert json.loads((out / "kinetics400.json").read_text())["metrics"]["videos"] == 2
    root = tmp_path / "HMDB51"
    splits = root / "testTrainMulti_7030_splits"
    splits.mkdir(parents=True)
    for label, colour in [("brush_hair", "0.8"), ("cartwheel", "-0.8")]:
        lines = []
        for i, kind in enumerate([1, 1, 2]):
            _video(root / label / f"{label}_clip_{i}.avi", colour)  # the class folders right under --root
            lines.append(f"{label}_clip_{i}.avi {kind} ")
        (splits / f"{label}_test_split1.txt").write_text("\n".join(lines) + "\n")
    assert _bench("hmdb51", root, export, out, tokenizer, *QUICK, *ONE_SPLIT) == 0
    m = json.loads((out / "hmdb51.json").read_text())["metrics"]
    assert (m["train"], m["test"], m["classes"]) == (4, 2, 2)
