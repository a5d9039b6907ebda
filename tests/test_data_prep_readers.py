"""read_sources on folders and manifests: sidecars, edge cases, failures, split filtering.

Videos are dummy files (a few bytes): readers only check that files exist; the builder probes them.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from data_prep.readers import read_sources
from data_prep.sources import Caption


def _touch(path, data=b"\0\0\0\x18ftypmp42"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _csv(path, rows, header):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _reasons(sources):
    return sorted((f.reason, f.source) for f in sources.failures)


def test_directory_scan_with_mixed_sidecars(tmp_path):
    _touch(tmp_path / "b.mp4")
    (tmp_path / "b.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nfrom srt\n")
    _touch(tmp_path / "a.MKV")
    (tmp_path / "a.vtt").write_text("WEBVTT\n\n00:00.500 --> 00:01.000\nfrom vtt\n")
    _touch(tmp_path / "sub" / "c.webm")
    (tmp_path / "sub" / "c.csv").write_text("start,end,text\n0,1,from csv\n")
    _touch(tmp_path / "sub" / "d.mov")
    (tmp_path / "sub" / "d.json").write_text(
        '{"label": "dance", "captions": [{"start": 0, "end": 2, "text": "from json"}]}'
    )
    _touch(tmp_path / "sub" / "e.avi")
    (tmp_path / "sub" / "e.txt").write_text("whole clip text\n")
    _touch(tmp_path / "f.mp4")  # no sidecar
    _touch(tmp_path / "._a.mp4")  # macOS resource fork, not a video
    _touch(tmp_path / ".cache" / "x.mp4")
    (tmp_path / "notes.txt").write_text("not a sidecar")

    sources = read_sources(tmp_path)
    assert [i.id for i in sources.items] == ["a", "b", "f", "sub/c", "sub/d", "sub/e"]
    by_id = {i.id: i for i in sources.items}
    assert by_id["a"].captions == (Caption(0.5, 1.0, "from vtt"),)
    assert by_id["b"].captions == (Caption(1.0, 2.0, "from srt"),)
    assert by_id["sub/c"].captions == (Caption(0.0, 1.0, "from csv"),)
    assert by_id["sub/d"].label == "dance" and by_id["sub/d"].captions[0].text == "from json"
    assert by_id["sub/e"].captions == (Caption(0.0, math.inf, "whole clip text"),)
    assert by_id["f"].captions == ()
    assert all(i.path.startswith(str(tmp_path)) for i in sources.items)
    assert sources.failures == []


def test_directory_same_stem_is_a_duplicate_id(tmp_path):
    _touch(tmp_path / "x.mp4")
    _touch(tmp_path / "x.webm")
    sources = read_sources(tmp_path, "dir")
    assert [i.path.rsplit(".", 1)[1] for i in sources.items] == ["mp4"]
    assert _reasons(sources) == [("duplicate_id", str(tmp_path / "x.webm"))]


def test_directory_with_split_is_an_error(tmp_path):
    _touch(tmp_path / "x.mp4")
    with pytest.raises(ValueError, match="split"):
        read_sources(tmp_path, split="train")


def test_manifest_csv_edge_cases(tmp_path):
    _touch(tmp_path / "vids" / "with space 'q\".mp4")
    _touch(tmp_path / "vids" / "ünïcode.mp4")
    absolute = _touch(tmp_path / "elsewhere" / "abs.mp4")
    (tmp_path / "vids" / "ünïcode.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nsidecar\n")
    rows = [
        ["s1", "vids/with space 'q\".mp4", "", "", "lbl", "a caption, with comma", "train"],
        ["u1", "vids/ünïcode.mp4", "1.5", "4", "", "", "val"],
        ["a1", str(absolute), "", "", "", "", ""],
        ["m1", "vids/missing.mp4", "", "", "", "", ""],
        ["s1", "vids/ünïcode.mp4", "", "", "", "", ""],
        ["", "vids/ünïcode.mp4", "", "", "", "", ""],
        ["e1", "", "", "", "", "", ""],
        ["b1", "vids/ünïcode.mp4", "5", "2", "", "", ""],
        ["b2", "vids/ünïcode.mp4", "soon", "", "", "", ""],
    ]
    manifest = _csv(tmp_path / "list.csv", rows, ["id", "path", "start", "end", "label", "caption", "split"])
    sources = read_sources(manifest)
    by_id = {i.id: i for i in sources.items}
    assert sorted(by_id) == ["a1", "s1", "u1"]
    assert by_id["s1"].label == "lbl" and by_id["s1"].split == "train"
    assert by_id["s1"].captions == (Caption(0.0, math.inf, "a caption, with comma"),)
    assert (by_id["u1"].start, by_id["u1"].end) == (1.5, 4.0)
    assert by_id["u1"].captions == (Caption(1.0, 2.0, "sidecar"),)
    assert by_id["a1"].path == str(absolute)
    reasons = [f.reason for f in sources.failures]
    assert reasons.count("missing_file") == 1 and reasons.count("duplicate_id") == 1
    assert reasons.count("bad_row") == 4  # empty id, empty path, end <= start, non-numeric start
    dup = next(f for f in sources.failures if f.reason == "duplicate_id")
    assert "line 6" in dup.detail


def test_whole_clip_caption_uses_the_clip_bounds(tmp_path):
    _touch(tmp_path / "v.mp4")
    manifest = _csv(tmp_path / "m.csv", [["v", "v.mp4", "2", "7", "hello"]], ["id", "path", "start", "end", "caption"])
    (item,) = read_sources(manifest).items
    assert item.captions == (Caption(2.0, 7.0, "hello"),)


def test_manifest_unknown_column_fails_before_any_work(tmp_path):
    _touch(tmp_path / "v.mp4")
    manifest = _csv(tmp_path / "m.csv", [["v", "v.mp4", "x"]], ["id", "path", "colour"])
    with pytest.raises(ValueError, match="'colour'"):
        read_sources(manifest)
    kinetics_like = _csv(
        tmp_path / "k.csv", [["a", "yt", "0", "10"]], ["label", "youtube_id", "time_start", "time_end"]
    )
    with pytest.raises(ValueError, match="fmt='kinetics'"):
        read_sources(kinetics_like)
    no_path = _csv(tmp_path / "n.csv", [["v"]], ["id"])
    with pytest.raises(ValueError, match="'path'"):
        read_sources(no_path)


def test_manifest_jsonl_with_timed_captions(tmp_path):
    _touch(tmp_path / "clips" / "one.mp4")
    _touch(tmp_path / "clips" / "two.mp4")
    lines = [
        {"id": "one", "path": "clips/one.mp4", "captions": [{"start": 0, "end": 1, "text": "x"}, {"text": 5}]},
        "not json at all",
        {"id": 2, "path": "clips/two.mp4", "start": 1, "split": "validation"},
        [1, 2],
        {},
    ]
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n"
    (tmp_path / "m.jsonl").write_text(text)
    sources = read_sources(tmp_path / "m.jsonl")
    assert [i.id for i in sources.items] == ["one", "2"]
    assert sources.items[0].captions == (Caption(0.0, 1.0, "x"),)
    assert sources.items[1].split == "val" and sources.items[1].start == 1.0
    assert [f.reason for f in sources.failures] == ["bad_row", "bad_row", "bad_row"]

    (tmp_path / "bad.jsonl").write_text(json.dumps({"id": "one", "path": "clips/one.mp4", "duration": 3}) + "\n")
    with pytest.raises(ValueError, match="'duration'.*line 1"):
        read_sources(tmp_path / "bad.jsonl")


def test_manifest_split_filter_counts_left_out_rows(tmp_path, caplog):
    for name in "abc":
        _touch(tmp_path / f"{name}.mp4")
    rows = [["a", "a.mp4", "train"], ["b", "b.mp4", "validation"], ["c", "c.mp4", "val"], ["d", "gone.mp4", "train"]]
    _csv(tmp_path / "manifest.csv", rows, ["id", "path", "split"])
    with caplog.at_level("INFO"):
        sources = read_sources(tmp_path, split="val")
    assert [i.id for i in sources.items] == ["b", "c"]
    assert sources.failures == []  # the missing file is in another split
    assert "2 left out" in caplog.text


def test_directory_with_manifest_uses_it_and_rejects_ambiguity(tmp_path):
    _touch(tmp_path / "videos" / "a.mp4")
    _touch(tmp_path / "videos" / "extra.mp4")
    _csv(tmp_path / "manifest.csv", [["a", "videos/a.mp4"]], ["id", "path"])
    assert [i.id for i in read_sources(tmp_path).items] == ["a"]
    assert [i.id for i in read_sources(tmp_path, "dir").items] == ["videos/a", "videos/extra"]
    (tmp_path / "manifest.jsonl").write_text("")
    with pytest.raises(ValueError, match="both"):
        read_sources(tmp_path)


def test_bad_arguments_are_errors(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        read_sources(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown source format"):
        read_sources(tmp_path, "youtube")
    with pytest.raises(ValueError, match="videos="):
        read_sources(tmp_path, videos=tmp_path)
    (tmp_path / "ann.json").write_text("{}")
    with pytest.raises(ValueError, match="fmt="):
        read_sources(tmp_path / "ann.json")
    with pytest.raises(ValueError, match="manifest"):
        read_sources(tmp_path, "manifest")


def test_synth_corpus_layout_reads_as_is(tmp_path):
    # The layout data_prep.synth writes: manifest.csv (id,path,label,split) + videos/<id>.mp4 + videos/<id>.srt.
    rows = []
    for i, split in enumerate(["train", "train", "val"]):
        vid = f"synth_{i:04d}"
        _touch(tmp_path / "videos" / f"{vid}.mp4")
        (tmp_path / "videos" / f"{vid}.srt").write_text(f"1\n00:00:00,000 --> 00:00:01,500\ncaption {i}\n")
        rows.append([vid, f"videos/{vid}.mp4", f"class{i}", split])
    _csv(tmp_path / "manifest.csv", rows, ["id", "path", "label", "split"])
    sources = read_sources(tmp_path)
    assert [(i.id, i.label, i.split) for i in sources.items] == [
        ("synth_0000", "class0", "train"),
        ("synth_0001", "class1", "train"),
        ("synth_0002", "class2", "val"),
    ]
    assert [i.captions for i in sources.items][2] == (Caption(0.0, 1.5, "caption 2"),)


def test_reads_the_real_synth_corpus(synth_corpus):
    with open(synth_corpus / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sources = read_sources(synth_corpus)
    assert [i.id for i in sources.items] == [r["id"] for r in rows] and sources.failures == []
    assert all(i.captions and i.label and i.split for i in sources.items)
    assert all(c.end > c.start >= 0 for i in sources.items for c in i.captions)
    train = read_sources(synth_corpus, split="train")
    assert [i.id for i in train.items] == [r["id"] for r in rows if r["split"] == "train"]


def test_tsv_and_json_manifests_and_a_separate_video_root(tmp_path):
    videos = tmp_path / "store"
    _touch(videos / "a b.mp4")
    _touch(videos / "c.mp4")
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "list.tsv").write_text("id\tpath\tlabel\nA\ta b.mp4\tx, y\nC\tc.mp4\t\n")
    sources = read_sources(meta / "list.tsv", videos=videos)
    assert [(i.id, i.label) for i in sources.items] == [("A", "x, y"), ("C", None)]
    assert read_sources(meta / "list.tsv").failures[0].reason == "missing_file"  # default root: the manifest folder

    (meta / "list.json").write_text(json.dumps([{"id": "A", "path": "a b.mp4", "end": 3}, {"id": "C"}]))
    sources = read_sources(meta / "list.json", "manifest", videos=videos)
    assert [(i.id, i.end) for i in sources.items] == [("A", 3.0)]
    assert sources.failures[0].reason == "bad_row" and "row 2" in sources.failures[0].detail
    (meta / "corpus.json").write_text("{}")
    with pytest.raises(ValueError, match="fmt="):
        read_sources(meta / "corpus.json")


def test_unusable_caption_sidecars_become_kept_warnings(tmp_path):
    for name in ("empty", "malformed", "latin1", "good"):
        _touch(tmp_path / f"{name}.mp4")
    (tmp_path / "empty.srt").write_bytes(b"")
    (tmp_path / "malformed.vtt").write_bytes(b"WEBVTT\n\nno timing\n\n00:00.000 --> soon\nbroken\n")
    (tmp_path / "latin1.srt").write_bytes("1\n00:00:00,000 --> 00:00:01,000\ncaf\xe9\n".encode("latin-1"))
    (tmp_path / "good.txt").write_text("a caption\n")
    sources = read_sources(tmp_path)
    assert [i.id for i in sources.items] == ["empty", "good", "latin1", "malformed"] and sources.failures == []
    warned = {w.source: w for w in sources.warnings}
    assert sorted(warned) == [str(tmp_path / "empty.mp4"), str(tmp_path / "malformed.mp4")]
    for name, sidecar in (("empty", "empty.srt"), ("malformed", "malformed.vtt")):
        w = warned[str(tmp_path / f"{name}.mp4")]
        assert w.reason == "bad_captions" and w.kept and w.to_json()["kept"] is True
        assert sidecar in w.detail and "kept without those captions" in w.detail
    assert [c.text for c in sources.items[2].captions] == ["café"]


def test_manifest_sidecar_warnings_and_messages_name_the_cli_flag(tmp_path):
    _touch(tmp_path / "v.mp4")
    (tmp_path / "v.srt").write_bytes(b"\x00\x01 not a subtitle\n")
    (tmp_path / "m.csv").write_text("id,path\nv,v.mp4\n")
    sources = read_sources(tmp_path / "m.csv")
    assert [(w.source, w.reason) for w in sources.warnings] == [(str(tmp_path / "v.mp4"), "bad_captions")]
    (tmp_path / "ann.json").write_text("{}")
    with pytest.raises(ValueError, match="--format"):
        read_sources(tmp_path / "ann.json")
    with pytest.raises(ValueError, match="--videos-root"):
        read_sources(tmp_path, videos=tmp_path)


def test_folder_scan_takes_every_video_container_and_lists_what_it_leaves_out(tmp_path):
    for name in ("a.ogv", "c.mp4", "d.MTS", "e.wmv"):
        _touch(tmp_path / name)
    _touch(tmp_path / "b.m4a")  # audio only
    _touch(tmp_path / "sub" / "cover.jpg")
    (tmp_path / "c.srt").write_text("1\n00:00:00,000 --> 00:00:01,000\nhi\n")  # a sidecar, not a leftover
    sources = read_sources(tmp_path)
    assert [i.id for i in sources.items] == ["a", "c", "d", "e"]
    left = {(Path(f.source).name, f.reason) for f in sources.failures}
    assert left == {("b.m4a", "not_a_video_file"), ("cover.jpg", "not_a_video_file")}
    assert all("manifest" in f.detail for f in sources.failures)
