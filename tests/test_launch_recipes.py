"""launch/configs/*.yaml: every recipe validates, documents its command and expected result, has a tiny variant
of the same shape, and the tiny variants train on the tiny shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from launch.cmd_train import CONFIGS
from pipeline.train_config import load_train_config

RECIPES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))
# The other objectives' quickstart recipes run cut down in tests/test_launch_quickstart.py instead of as _tiny.
QUICKSTARTS = ["quickstart_gdt", "quickstart_mmv", "quickstart_selavi"]
FULL = [r for r in RECIPES if not r.endswith("_tiny") and r not in QUICKSTARTS]
TINY = [r for r in RECIPES if r.endswith("_tiny")]


def test_the_five_recipe_families_exist_with_tiny_variants():
    assert set(FULL) == {"quickstart", "milnce_s3d", "gdt_av", "selavi_av", "mmv_fac"}
    assert set(TINY) == {f"{r}_tiny" for r in FULL}
    assert set(RECIPES) == {*FULL, *TINY, *QUICKSTARTS}


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_validates_and_its_header_gives_command_and_expectation(name):
    cfg = load_train_config(CONFIGS / f"{name}.yaml")
    assert cfg.run.name == name
    header = [line for line in (CONFIGS / f"{name}.yaml").read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "vatp " in text or "launch.cli train" in text, f"{name}: no command in the header"
    assert "Expected" in text, f"{name}: no expected result in the header"


@pytest.mark.parametrize("name", FULL)
def test_tiny_variant_has_the_same_shape_as_its_recipe(name):
    full, tiny = load_train_config(CONFIGS / f"{name}.yaml"), load_train_config(CONFIGS / f"{name}_tiny.yaml")
    towers = [m for m in ("video", "audio", "text") if getattr(full.model, m)]
    assert towers == [m for m in ("video", "audio", "text") if getattr(tiny.model, m)]
    assert [(s.name, s.modalities, s.source) for s in full.model.spaces] == [
        (s.name, s.modalities, s.source) for s in tiny.model.spaces
    ]
    objectives = [k for k in ("milnce", "gdt", "selflabel") if getattr(full.loss, k) is not None]
    assert objectives == [k for k in ("milnce", "gdt", "selflabel") if getattr(tiny.loss, k) is not None]
    assert full.data.views == tiny.data.views
    assert tiny.run.device == "cpu" and tiny.run.steps <= 4


@pytest.fixture(scope="module")
def dataset(dataset_with_tokenizer):
    return dataset_with_tokenizer


@pytest.mark.parametrize("name", TINY)
def test_tiny_recipe_trains_to_a_finite_loss(name, dataset, tmp_path, restore_launcher_env):
    from pipeline.train import train

    cfg = load_train_config(
        CONFIGS / f"{name}.yaml",
        [
            f"data.datasets=[{{path: {dataset}}}]",
            f"run.runs_dir={tmp_path}",
            "data.num_workers=0",
            "run.tensorboard=false",
        ],
    )
    summary = train(cfg)
    assert summary["step"] == cfg.run.steps
    last = summary["last"]
    assert math.isfinite(last["loss"])
    objectives = [k for k in ("milnce", "gdt", "selflabel") if getattr(cfg.loss, k) is not None]
    for k in objectives:
        assert any(key.startswith(f"loss/{k}") for key in last), f"no {k} term logged: {sorted(last)}"
    assert (Path(summary["run_dir"]) / "checkpoints" / f"step_{cfg.run.steps:08d}").is_dir()
    if cfg.loss.selflabel is not None:  # as many labelling runs as the recipe says, all before the last step
        rows = [json.loads(line) for line in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        runs = [r["step"] for r in rows if "selflabel/coverage" in r]
        assert len(runs) == cfg.loss.selflabel.relabels and max(runs) < cfg.run.steps, runs


@pytest.mark.parametrize("name", ["mmv_fac", "mmv_fac_tiny", "quickstart_gdt", "quickstart_selavi", "quickstart_mmv"])
def test_audio_covers_the_video_clip_where_the_objective_aligns_them(name):
    from models.towers import build_model
    from pipeline.data_config import data_config_for

    cfg = load_train_config(CONFIGS / f"{name}.yaml")
    with torch.device("meta"):
        contracts = build_model(cfg.model).input_contracts()
    data = data_config_for(cfg.data, contracts)
    assert data.audio.seconds == pytest.approx(data.num_frames / data.fps)
