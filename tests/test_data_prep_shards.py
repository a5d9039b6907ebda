"""Shard helpers: byte-stable writing, and the one checked reader of dataset.json and of sample metadata."""

from __future__ import annotations

import json

import pytest

from data_prep.shards import iter_json_members, read_dataset_json, write_shard


def test_read_dataset_json_accepts_a_built_dataset(tiny_dataset):
    meta = read_dataset_json(tiny_dataset)
    assert meta["format"] == "vatp-shards" and meta["version"] == 1 and len(meta["shards"]) == 4


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"format": "vatp-shards", "version": 2, "shards": []}', "format/version"),
        ('{"format": "other", "version": 1, "shards": []}', "format/version"),
        ('{"format": "vatp-shards", "version": 1}', "'shards'"),
    ],
)
def test_read_dataset_json_rejects_what_is_not_a_vatp_dataset(tmp_path, content, match):
    if content is not None:
        (tmp_path / "dataset.json").write_text(content)
    with pytest.raises(ValueError, match=match):
        read_dataset_json(tmp_path)


def test_iter_json_members_reads_only_json_objects(tmp_path):
    path = tmp_path / "000000.tar"
    samples = {
        "000000000": {"json": json.dumps({"idx": 0}).encode(), "mp4": b"\0" * 10},
        "000000001": {"json": b"[1, 2]", "mp4": b"\0"},
        "000000002": {"json": b"\xff not json", "flac": b"x"},
        "000000003": {"json": json.dumps({"idx": 3, "captions": []}).encode()},
    }
    write_shard(str(path), samples.items())
    bad: list[str] = []
    got = list(iter_json_members(path, bad=bad))
    assert got == [("000000000", {"idx": 0}), ("000000003", {"idx": 3, "captions": []})]
    assert bad == ["000000001.json", "000000002.json"]


def test_iter_json_members_raises_on_a_broken_tar(tmp_path):
    path = tmp_path / "bad.tar"
    path.write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match="not a readable tar"):
        list(iter_json_members(path))
