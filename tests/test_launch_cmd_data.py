"""`vatp data ...` end to end through the real CLI entry point."""

from __future__ import annotations

import json
import shutil

import pytest

from launch.cli import main
from launch.cmd_data import resolve_parts

TINY = ["--fps", "8", "--short-side", "32", "--samples-per-shard", "4", "--workers", "2"]


@pytest.mark.parametrize("sub", ["synth", "build", "tokenizer", "inspect"])
def test_every_data_command_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", sub, "--help"])
    assert e.value.code == 0 and f"vatp data {sub}" in capsys.readouterr().out


def test_build_help_lists_the_pinned_flags(capsys):
    with pytest.raises(SystemExit):
        main(["data", "build", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--format",
        "--videos-root",
        "--fps",
        "--short-side",
        "--max-seconds",
        "--sample-rate",
        "--audio-format",
        "--samples-per-shard",
        "--workers",
        "--num-parts",
        "--part",
        "--split",
        "--timeout",
    ):
        assert flag in out, flag


def test_resolve_parts_from_flags_slurm_or_default():
    assert resolve_parts(4, 3, {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "1"}) == (4, 3)
    assert resolve_parts(None, None, {"SLURM_ARRAY_TASK_COUNT": "8", "SLURM_ARRAY_TASK_ID": "5"}) == (8, 5)
    slurm_from_one = {"SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "1"}
    assert resolve_parts(None, None, slurm_from_one) == (3, 2)
    assert resolve_parts(None, None, {}) == (1, 0)
    with pytest.raises(ValueError, match="go together"):
        resolve_parts(2, None, {})


def test_synth_build_inspect_tokenizer(tmp_path, capsys):
    raw, ds = tmp_path / "raw", tmp_path / "ds"
    assert main(["data", "synth", "--out", str(raw), "--videos", "3", "--seconds", "1", "--workers", "1"]) == 0
    assert (raw / "manifest.csv").exists() and len(list((raw / "videos").glob("*.mp4"))) == 3
    synth = capsys.readouterr().out
    assert synth.count("synth corpus") == 1 and "videos       3 (3 written, 0 already there)" in synth
    assert "videos_per_s" not in synth  # one readable summary, not a raw dict
    assert main(["data", "build", str(raw), "--out", str(ds), *TINY]) == 0
    out = capsys.readouterr().out
    assert "samples      3 written" in out and "shards       1 written" in out
    assert main(["data", "inspect", str(ds), "--decode", "2"]) == 0
    assert "status       OK" in capsys.readouterr().out
    assert main(["data", "tokenizer", str(ds), "--vocab-size", "40"]) == 0
    assert (ds / "tokenizer.model").stat().st_size > 0


def test_build_split_keeps_only_that_split(synth_corpus, tmp_path):
    assert (
        main(
            [
                "data",
                "build",
                str(synth_corpus / "manifest.csv"),
                "--out",
                str(tmp_path / "ds"),
                "--split",
                "train",
                *TINY,
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    manifest = (synth_corpus / "manifest.csv").read_text().splitlines()[1:]
    assert meta["samples"] == sum(line.endswith(",train") for line in manifest) > 0


def test_inspect_invalid_dataset_exits_nonzero_with_reason(tiny_dataset, tmp_path, capsys):
    shutil.copytree(tiny_dataset, tmp_path / "ds")
    (tmp_path / "ds" / "shards" / "000001.tar").unlink()
    assert main(["data", "inspect", str(tmp_path / "ds"), "--decode", "0"]) == 1
    assert "000001.tar: listed in dataset.json but missing" in capsys.readouterr().out


def test_build_missing_input_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "build", str(tmp_path / "nope"), "--out", str(tmp_path / "ds")]) == 2
    assert "nope" in capsys.readouterr().err


def test_build_where_every_input_fails_exits_nonzero(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.mp4").write_text("not a video")
    assert main(["data", "build", str(tmp_path / "in"), "--out", str(tmp_path / "ds"), *TINY]) == 1
    assert "no usable input" in capsys.readouterr().out
    assert json.loads((tmp_path / "ds" / "failures.jsonl").read_text())["reason"] == "not_media"


def test_build_format_choices_are_the_readers_formats():
    from data_prep.readers import FORMATS
    from launch import cmd_data

    assert cmd_data.FORMATS is FORMATS
