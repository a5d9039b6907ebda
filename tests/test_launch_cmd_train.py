"""launch/cmd_train.py: `vatp train` / `vatp export` argument handling and their one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from launch.cli import build_parser, main
from launch.cmd_train import resolve_recipe


def test_train_accepts_the_deepspeed_launchers_local_rank():
    args = build_parser().parse_args(["train", "quickstart", "--set", "run.steps=5", "--local_rank=3"])
    assert args.recipe == "quickstart" and args.overrides == ["run.steps=5"] and args.local_rank == 3
    args = build_parser().parse_args(["train", "quickstart", "--local-rank", "1", "--resume"])
    assert args.local_rank == 1 and args.resume


def test_recipe_resolves_by_name_file_and_run_directory(tmp_path):
    assert resolve_recipe("milnce_s3d").name == "milnce_s3d.yaml"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("run: {}\n")
    assert resolve_recipe(str(tmp_path / "run")) == tmp_path / "run" / "config.yaml"
    with pytest.raises(ValueError, match="not found.*milnce_s3d"):
        resolve_recipe("milnce_s3e")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="without config.yaml"):
        resolve_recipe(str(tmp_path / "empty"))


def test_output_folder_named_like_a_recipe_does_not_hide_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart" / "runs").mkdir(parents=True)  # what `make demo` leaves in the working directory
    assert resolve_recipe("quickstart").name == "quickstart.yaml"
    (tmp_path / "quickstart" / "config.yaml").write_text("run: {}\n")  # a run directory still wins
    assert resolve_recipe("quickstart") == Path("quickstart") / "config.yaml"


def test_bad_override_ends_with_one_line_naming_the_key(capsys):
    assert main(["train", "quickstart_tiny", "--set", "optim.lr=fast"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("vatp train: error:") and "optim.lr: expected a number, got 'fast'" in err[-1]


def test_export_of_a_run_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    assert main(["export", str(tmp_path)]) == 2
    assert "not a run directory (no config.yaml)" in capsys.readouterr().err


@pytest.mark.usefixtures("restore_launcher_env")
def test_resuming_a_copied_run_directory_writes_into_the_copy(dataset_with_tokenizer, tmp_path, capsys):
    import shutil

    from pipeline.checkpoint import latest_tag

    settings = [
        "--set", f"data.datasets=[{{path: {dataset_with_tokenizer}}}]", "--set", f"run.runs_dir={tmp_path / 'runs'}",
        "--set", "run.batch_size=2", "--set", "data.num_workers=0", "--set", "run.tensorboard=false",
        "--set", "run.keep_ckpts=1",
    ]  # fmt: skip
    assert main(["train", "quickstart_tiny", *settings, "--set", "run.steps=2", "--set", "run.ckpt_every=2"]) == 0
    original = tmp_path / "runs" / "quickstart_tiny"
    before = sorted(p.name for p in (original / "checkpoints").iterdir())
    copy = tmp_path / "moved" / "copy"
    shutil.copytree(original, copy)

    assert main(["train", str(copy), "--resume", "--set", "run.steps=4", "--set", "run.ckpt_every=2"]) == 0
    assert "was started as" in capsys.readouterr().err
    assert latest_tag(copy) == "step_00000004"
    assert sorted(p.name for p in (original / "checkpoints").iterdir()) == before  # untouched, nothing pruned
    assert latest_tag(original) == "step_00000002"
