"""Public-corpus adapters on small hand-written annotation files (tests/data/<corpus>/) with dummy video files."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest

from data_prep.readers import read_sources
from data_prep.sources import Caption

DATA = Path(__file__).parent / "data"


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 16)
    return path


def _copy(name, tmp_path):
    src = DATA / name
    dst = tmp_path / src.name
    shutil.copy(src, dst)
    return dst


def _by_id(sources):
    return {item.id: item for item in sources.items}


def test_howto100m(tmp_path):
    ann = _copy("howto100m/caption.json", tmp_path)
    _touch(tmp_path / "v_cook01.mp4")
    _touch(tmp_path / "nested" / "v_fix02.webm")
    _touch(tmp_path / "v_bad04.mp4")
    sources = read_sources(ann, "howto100m")
    items = _by_id(sources)
    assert sorted(items) == ["v_cook01", "v_fix02"]
    assert items["v_cook01"].captions == (
        Caption(0.0, 2.5, "today we make pancakes"),
        Caption(2.5, 6.0, "crack two eggs"),
        Caption(6.0, 9.5, "whisk the batter"),
    )
    assert items["v_fix02"].captions == (Caption(1.0, 3.0, "loosen the bolt"),)  # the empty text is dropped
    assert items["v_fix02"].path.endswith("nested/v_fix02.webm")
    assert sorted((f.reason, f.source) for f in sources.failures) == [
        ("bad_row", "v_bad04"),
        ("missing_file", "v_gone03"),
    ]
    with pytest.raises(ValueError, match="no splits"):
        read_sources(ann, "howto100m", split="train")


def test_kinetics_precut_and_uncut_clips(tmp_path):
    videos = tmp_path / "k400"
    _touch(videos / "train" / "abseiling" / "--07WQ2iBlw_000001_000011.mp4")  # pre-cut: used whole
    _touch(videos / "train" / "-0MkYbe2Kj0.mkv")  # full video: cut to the CSV bounds
    _touch(videos / "val" / "0aB9xJ-uNxo_000030_000040.mp4")
    sources = read_sources(DATA / "kinetics" / "kinetics_train.csv", "kinetics", videos=videos)
    items = _by_id(sources)
    assert sorted(items) == ["--07WQ2iBlw_000001_000011", "-0MkYbe2Kj0_000014_000024", "0aB9xJ-uNxo_000030_000040"]
    precut = items["--07WQ2iBlw_000001_000011"]
    assert (precut.start, precut.end, precut.label, precut.split) == (None, None, "abseiling", "train")
    uncut = items["-0MkYbe2Kj0_000014_000024"]
    assert (uncut.start, uncut.end) == (14.0, 24.0)
    assert uncut.label == "passing American football (in game)"
    assert items["0aB9xJ-uNxo_000030_000040"].label == "dancing, ballet"
    assert sorted(f.reason for f in sources.failures) == ["duplicate_id", "missing_file"]

    val = read_sources(DATA / "kinetics" / "kinetics_train.csv", "kinetics", videos=videos, split="validation")
    assert [i.id for i in val.items] == ["0aB9xJ-uNxo_000030_000040"] and val.failures == []


def test_kinetics_rejects_other_csvs(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("id,path\na,b\n")
    with pytest.raises(ValueError, match="youtube_id"):
        read_sources(bad, "kinetics")


def test_vggsound_headerless_csv_and_clip_names(tmp_path):
    ann = _copy("vggsound/vggsound.csv", tmp_path)
    _touch(tmp_path / "video" / "---g-f_I2yQ_000001.mp4")
    _touch(tmp_path / "video" / "--0PQM4-hqg_000030_000040.mp4")
    _touch(tmp_path / "video" / "--56QUhyDQM.mp4")
    sources = read_sources(ann, "vggsound")
    items = _by_id(sources)
    assert sorted(items) == ["---g-f_I2yQ_000001", "--0PQM4-hqg_000030", "--56QUhyDQM_000185"]
    assert items["---g-f_I2yQ_000001"].split == "test"
    assert (items["--0PQM4-hqg_000030"].start, items["--0PQM4-hqg_000030"].end) == (None, None)
    uncut = items["--56QUhyDQM_000185"]
    assert (uncut.start, uncut.end, uncut.label) == (185.0, 195.0, "engine accelerating, revving, vroom")
    assert [(f.reason, f.source) for f in sources.failures] == [("missing_file", "-_missing_x_000000")]
    assert [i.id for i in read_sources(ann, "vggsound", split="test").items] == ["---g-f_I2yQ_000001"]


def test_msrvtt_one_item_per_video_with_all_captions(tmp_path):
    ann = _copy("msrvtt/train_val_videodatainfo.json", tmp_path)
    for i in range(3):
        _touch(tmp_path / "TrainValVideo" / f"video{i}.mp4")
    sources = read_sources(ann, "msrvtt")
    items = _by_id(sources)
    assert sorted(items) == ["video0", "video1", "video2"]
    assert [c.text for c in items["video0"].captions] == [
        "a car is shown",
        "a red car drives down a road",
        "a man talks about a car",
    ]  # file (sen_id) order
    assert all(c.start == 0.0 and c.end == math.inf for c in items["video0"].captions)
    assert (items["video0"].start, items["video0"].label, items["video2"].split) == (None, "9", "val")
    val = read_sources(ann, "msrvtt", split="validate")
    assert [i.id for i in val.items] == ["video2"]


def test_youcook2_timed_captions_label_and_split(tmp_path):
    ann = DATA / "youcook2" / "youcookii_annotations_trainval.json"
    videos = tmp_path / "raw_videos"
    _touch(videos / "training" / "113" / "GLd3aX16zBg.mp4")
    _touch(videos / "validation" / "212" / "9GX8f5EwwE4.mkv")
    sources = read_sources(ann, "youcook2", videos=videos)
    items = _by_id(sources)
    assert sorted(items) == ["9GX8f5EwwE4", "GLd3aX16zBg"]
    assert items["GLd3aX16zBg"].captions == (
        Caption(90.0, 102.0, "spread margarine on two slices of white bread"),
        Caption(114.0, 127.0, "place a slice of cheese on the bread"),
    )
    assert (items["GLd3aX16zBg"].label, items["GLd3aX16zBg"].split) == ("113", "train")
    assert items["9GX8f5EwwE4"].split == "val"
    assert [(f.reason, f.source) for f in sources.failures] == [("missing_file", "xHr8X2Wpmno")]
    train = read_sources(ann, "youcook2", videos=videos, split="training")
    assert [i.id for i in train.items] == ["GLd3aX16zBg"] and len(train.failures) == 1


def test_adapter_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="annotation file"):
        read_sources(tmp_path, "msrvtt")
    with pytest.raises(ValueError, match="root is not a directory"):
        read_sources(DATA / "msrvtt" / "train_val_videodatainfo.json", "msrvtt", videos=tmp_path / "none")
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"database": {}}')
    with pytest.raises(ValueError, match="MSR-VTT"):
        read_sources(wrong, "msrvtt")
    wrong.write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_sources(wrong, "youcook2")


def _ucf101(root):
    """A replica of UCF101's `ucfTrainTestlist/` (three classes) and its `UCF-101/<class>/v_*.avi` videos."""
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True)
    (lists / "classInd.txt").write_text("1 ApplyEyeMakeup\r\n2 Archery\r\n3 YoYo\r\n")
    train = ["ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1", "Archery/v_Archery_g09_c02.avi 2"]
    (lists / "trainlist01.txt").write_text("\r\n".join(train) + "\r\n")
    (lists / "testlist01.txt").write_text("ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\nYoYo/v_YoYo_g01_c03.avi\r\n")
    (lists / "trainlist02.txt").write_text("YoYo/v_YoYo_g01_c03.avi 3\r\n")
    (lists / "testlist02.txt").write_text("Archery/v_Archery_g09_c02.avi\r\n")
    for line in [*train, "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "YoYo/v_YoYo_g01_c03.avi"]:
        _touch(root / "UCF-101" / line.split()[0])
    return lists


def test_ucf101_split_lists_give_class_labels_and_splits(tmp_path):
    lists = _ucf101(tmp_path)
    items = _by_id(read_sources(lists, "ucf101", videos=tmp_path / "UCF-101"))
    assert {k: (v.label, v.split) for k, v in items.items()} == {
        "v_ApplyEyeMakeup_g08_c01": ("ApplyEyeMakeup", "train"),
        "v_Archery_g09_c02": ("Archery", "train"),
        "v_ApplyEyeMakeup_g01_c01": ("ApplyEyeMakeup", "test"),
        "v_YoYo_g01_c03": ("YoYo", "test"),
    }
    test = read_sources(lists, "ucf101", split="test", videos=tmp_path / "UCF-101")
    assert sorted(_by_id(test)) == ["v_ApplyEyeMakeup_g01_c01", "v_YoYo_g01_c03"]
    fold2 = _by_id(read_sources(lists / "testlist02.txt", "ucf101", videos=tmp_path / "UCF-101"))
    assert {k: v.split for k, v in fold2.items()} == {"v_YoYo_g01_c03": "train", "v_Archery_g09_c02": "test"}
    (lists / "testlist01.txt").write_text("Juggling/v_Juggling_g01_c01.avi\r\n")
    bad = read_sources(lists, "ucf101", videos=tmp_path / "UCF-101")
    assert [f.reason for f in bad.failures] == ["bad_row"] and "classInd" in bad.failures[0].detail


def test_hmdb51_split_files_use_1_train_2_test_0_unused(tmp_path):
    splits = tmp_path / "testTrainMulti_7030_splits"
    splits.mkdir()
    rows = {
        "brush_hair": [
            "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1",
            "Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0.avi 2",
        ],
        "cartwheel": [
            "(Rad)Schlag_die_Bank!_cartwheel_f_cm_np1_le_med_0.avi 2",
            "Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8.avi 0",
        ],
    }
    for label, lines in rows.items():
        (splits / f"{label}_test_split1.txt").write_text(" \n".join(lines) + " \n")
        (splits / f"{label}_test_split2.txt").write_text(lines[0][:-1] + "2 \n")
        for line in lines:
            _touch(tmp_path / "hmdb51" / label / line.split()[0])
    sources = read_sources(splits, "hmdb51", videos=tmp_path / "hmdb51")
    assert {k: (v.label, v.split) for k, v in _by_id(sources).items()} == {
        "April_09_brush_hair_u_nm_np1_ba_goo_0": ("brush_hair", "train"),
        "Blonde_being_brushed_brush_hair_f_nm_np2_ri_med_0": ("brush_hair", "test"),
        "(Rad)Schlag_die_Bank!_cartwheel_f_cm_np1_le_med_0": ("cartwheel", "test"),
    }  # the "0" row (not used in split 1) is left out
    fold2 = read_sources(splits / "cartwheel_test_split2.txt", "hmdb51", videos=tmp_path / "hmdb51")
    assert {v.split for v in fold2.items} == {"test"} and len(fold2.items) == 2
    (splits / "cartwheel_test_split9.txt").write_text("")
    with pytest.raises(ValueError, match="split 1-3"):
        read_sources(splits / "cartwheel_test_split9.txt", "hmdb51", videos=tmp_path / "hmdb51")


def test_ave_split_files_give_category_labels(tmp_path):
    header = "Category&VideoID&Quality&StartTime&EndTime\n"
    (tmp_path / "testSet.txt").write_text(header + "Church bell&RUhOCu3LNXM&good&0&10\nBarking&-0tB7U7pKz0&bad&2&8\n")
    (tmp_path / "trainSet.txt").write_text("Church bell&aaaaaaaaaaa&good&0&10\nbroken line\n")
    for vid in ("RUhOCu3LNXM", "-0tB7U7pKz0", "aaaaaaaaaaa"):
        _touch(tmp_path / "AVE" / f"{vid}.mp4")
    test = read_sources(tmp_path / "testSet.txt", "ave", videos=tmp_path / "AVE")
    assert {k: (v.label, v.split) for k, v in _by_id(test).items()} == {
        "RUhOCu3LNXM": ("Church bell", "test"),
        "-0tB7U7pKz0": ("Barking", "test"),
    }
    train = read_sources(tmp_path / "trainSet.txt", "ave", videos=tmp_path / "AVE")
    assert [i.id for i in train.items] == ["aaaaaaaaaaa"] and [f.reason for f in train.failures] == ["bad_row"]
    assert read_sources(tmp_path / "trainSet.txt", "ave", split="test", videos=tmp_path / "AVE").items == []
