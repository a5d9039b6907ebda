"""Shard helpers: byte-stable writing, and the one checked reader of dataset.json and of sample metadata."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from data_prep.shards import write_shard
from pipeline.dataset import iter_json_members, iter_tar_members, read_dataset_json


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


def _tar_bytes(members: list[tuple[str, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)  # a non-file entry is skipped
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_member_reader_matches_tarfile_and_reads_only_wanted_members(fmt):
    long = "d/" + "x" * 150 + ".mp4" if fmt != tarfile.USTAR_FORMAT else "d/" + "x" * 90 + ".mp4"
    members = [
        ("000001.json", b'{"idx": 1}'),
        (long, bytes(range(256)) * 7),
        ("000001.pyd", b"\x80pickle"),
        ("\u00e9t\u00e9.wav", b"R" * 513),
        ("empty.txt", b""),
    ]
    blob = _tar_bytes(members, fmt)
    got = list(iter_tar_members(io.BytesIO(blob), lambda name: not name.endswith(".pyd")))
    assert got == [m for m in members if not m[0].endswith(".pyd")]
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:  # the reference reader agrees on every member
        assert [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()] == members


def test_tar_member_reader_refuses_corrupt_and_truncated_tars():
    blob = _tar_bytes([("a.json", b"{}"), ("a.mp4", b"v" * 2000)], tarfile.USTAR_FORMAT)
    with pytest.raises(ValueError, match="truncated tar member 'a.mp4'"):
        list(iter_tar_members(io.BytesIO(blob[: 1024 + 512 + 700]), lambda name: True))
    with pytest.raises(ValueError, match="checksum"):
        list(iter_tar_members(io.BytesIO(b"not a tar file at all" * 40), lambda name: True))
    flipped = bytearray(blob)
    flipped[10] ^= 1  # a name byte of the first header
    with pytest.raises(ValueError, match="checksum"):
        list(iter_tar_members(io.BytesIO(bytes(flipped)), lambda name: True))
