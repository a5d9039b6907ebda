"""The dataset contract's one home: member names, the shard list, where a run finds its tokenizer."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import pytest

from data_prep.inspect import inspect_dataset
from data_prep.shards import write_shard
from pipeline.dataset import (
    MEMBERS,
    TOKENIZER_NAME,
    iter_samples,
    sample_key,
    shard_paths,
    split_member,
    tokenizer_path,
)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("000000001.mp4", ("000000001", "mp4")),
        ("000000001.JSON", ("000000001", "json")),
        ("dir/000000001.flac", ("dir/000000001", "flac")),
        ("a.b/000000001.wav", ("a.b/000000001", "wav")),  # the key ends at the first dot of the base name
        ("000000001.pyd", None),
        ("000000001.seg.mp4", None),
        ("README", None),
    ],
)
def test_split_member_reads_only_the_format_extensions(name, expected):
    assert split_member(name) == expected


def test_iter_samples_groups_by_key_and_leaves_foreign_members_unread(tmp_path):
    blob = tmp_path / "s.tar"
    samples = [(sample_key(i), {"mp4": b"v%d" % i, "json": b"{}", "wav": b"a"}) for i in range(3)]
    write_shard(str(blob), samples)
    with open(blob, "rb") as f:
        got = list(iter_samples(f))
    assert got == [(k, files) for k, files in samples]


def test_the_shard_writer_refuses_members_outside_the_format(tmp_path):
    with pytest.raises(AssertionError, match="pyd"):
        write_shard(str(tmp_path / "s.tar"), [("000000000", {"mp4": b"v", "pyd": b"x"})])
    assert set(MEMBERS) == {"mp4", "flac", "wav", "json"}


def test_shard_paths_follow_dataset_json_not_the_folder(tiny_dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    listed = [s["name"] for s in json.loads((ds / "dataset.json").read_text())["shards"]]
    (ds / "shards" / "999999.tar").write_bytes((ds / "shards" / listed[0]).read_bytes())  # a stray copy
    assert [p.name for p in shard_paths(ds)] == listed
    with pytest.raises(ValueError, match="dataset.json not found"):
        shard_paths(tmp_path / "nothing")


def test_tokenizer_path_explicit_then_first_dataset(tmp_path):
    assert tokenizer_path([str(tmp_path / "a")], tmp_path / "t.model") == tmp_path / "t.model"
    (tmp_path / "a").mkdir()
    assert tokenizer_path([str(tmp_path / "a"), str(tmp_path / "b")]) == tmp_path / "a" / TOKENIZER_NAME
    with pytest.raises(ValueError, match="not a directory"):
        tokenizer_path([str(tmp_path / "shards-{000000..000003}.tar")])
    with pytest.raises(ValueError, match="no dataset"):
        tokenizer_path([])


def test_inspect_reports_a_member_outside_the_format(tiny_dataset, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    first = shard_paths(ds)[0]
    with open(first, "rb") as f:
        samples = list(iter_samples(f))
    key = samples[0][0]
    write_shard(str(first), samples)  # same content: still clean
    assert inspect_dataset(ds).errors == []
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for k, files in samples:
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo(f"{key}.pyd")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"\x80\x04."))
    first.write_bytes(raw.getvalue())
    errors = inspect_dataset(ds).errors
    assert any(f"{key}.pyd" in e and "not part of the format" in e for e in errors), errors


def _shard_with_lying_pax_size(path, samples) -> None:
    """A shard whose second sample's json member carries a pax header claiming 10^15 bytes."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for n, (key, files) in enumerate(samples):
            for ext, data in sorted(files.items()):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                if n == 1 and ext == "json":
                    info.pax_headers = {"size": str(10**15)}
                tar.addfile(info, io.BytesIO(data))


def test_a_member_whose_pax_header_lies_about_its_size_is_a_damaged_shard_not_a_memory_error(tmp_path):
    samples = [(sample_key(i), {"json": json.dumps({"idx": i}).encode(), "mp4": b"v"}) for i in range(3)]
    _shard_with_lying_pax_size(tmp_path / "s.tar", samples)
    with open(tmp_path / "s.tar", "rb") as f, pytest.raises(ValueError, match="truncated tar member"):
        list(iter_samples(f))
    with open(tmp_path / "s.tar", "rb") as f:  # a pipe (no seek): read in pieces until the stream ends
        pipe = io.BufferedReader(io.BytesIO(f.read()))
        pipe.seekable = lambda: False
        with pytest.raises(ValueError, match="truncated tar member"):
            list(iter_samples(pipe))


def test_inspect_and_the_loader_count_a_shard_with_a_lying_pax_size(tiny_dataset, tmp_path):
    from pipeline.data import make_eval_loader
    from pipeline.data_config import DataConfig, DatasetSource

    ds = tmp_path / "ds"
    shutil.copytree(tiny_dataset, ds)
    first = shard_paths(ds)[0]
    with open(first, "rb") as f:
        samples = list(iter_samples(f))
    _shard_with_lying_pax_size(first, samples)
    report = inspect_dataset(ds, decode=0)
    assert not report.ok and any("truncated tar member" in e for e in report.errors)
    cfg = DataConfig(
        datasets=[DatasetSource(str(ds))], num_workers=0, batch_size=2, num_frames=4, size=32, fps=5.0,
        mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    )  # fmt: skip
    cfg.audio.enabled = cfg.text.enabled = False
    loader = make_eval_loader(cfg)
    idx = [int(i) for batch in loader for i in batch["idx"]]
    assert loader.skipped.get("bad_shard") == 1 and len(idx) == 7  # the damaged sample lost, counted
