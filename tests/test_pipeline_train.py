"""pipeline/train.py end to end on the tiny shards, one CPU process: train -> checkpoint -> resume, NaN handling,
config errors before any work, export."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch

import pipeline.train as train_mod
from launch.cmd_train import CONFIGS
from pipeline.checkpoint import export_run, latest_tag
from pipeline.config import ConfigError
from pipeline.schedules import warmup_cosine
from pipeline.train import TrainingDiverged, train
from pipeline.train_config import load_train_config

pytestmark = pytest.mark.usefixtures("restore_launcher_env")


@pytest.fixture(scope="module")
def dataset(dataset_with_tokenizer):
    return dataset_with_tokenizer


def tiny_cfg(dataset: Path, runs: Path, *overrides: str):
    """The quickstart_tiny recipe on the tiny dataset: 2 clips of 4 x 32 x 32, in-process loading."""
    return load_train_config(
        CONFIGS / "quickstart_tiny.yaml",
        [
            f"data.datasets=[{{path: {dataset}}}]",
            f"run.runs_dir={runs}",
            "run.batch_size=2",
            "data.num_workers=0",
            "run.tensorboard=false",
            "run.trace_samples=true",
            *overrides,
        ],
    )


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _trace(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "trace" / "rank0.jsonl").read_text().splitlines()]


def test_train_checkpoint_resume_continues_step_counter_and_weights(dataset, tmp_path):
    first = train(tiny_cfg(dataset, tmp_path, "run.steps=2", "run.ckpt_every=2"))
    run_dir = Path(first["run_dir"])
    assert first["step"] == 2 and latest_tag(run_dir) == "step_00000002"
    assert {"config.yaml", "metrics.jsonl", "launches.jsonl", "checkpoints"} <= {p.name for p in run_dir.iterdir()}

    saved_cfg = load_train_config(run_dir / "config.yaml", ["run.steps=3"])  # what `vatp train <run dir>` loads
    assert saved_cfg.model == tiny_cfg(dataset, tmp_path).model
    second = train(saved_cfg, resume=True)
    assert second["step"] == 3 and latest_tag(run_dir) == "step_00000003"
    assert second["samples_seen"] == 3 * 2  # counters came back from the checkpoint
    steps = [m["step"] for m in _metrics(run_dir)]
    assert steps == [1, 2, 3]
    # the resumed step runs on the 3-step schedule, not at the 2-step schedule's final rate of 0
    expected = saved_cfg.optim.lr * warmup_cosine(
        2, total_steps=3, warmup_steps=saved_cfg.optim.warmup_steps, final_ratio=saved_cfg.optim.final_lr_ratio
    )
    assert _metrics(run_dir)[2]["lr"] == pytest.approx(expected) and expected > 0
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in _metrics(run_dir))
    trace = _trace(run_dir)
    starts = [t for t in trace if "start_step" in t]
    ends = [t for t in trace if "final_step" in t]
    assert [s["start_step"] for s in starts] == [0, 2]
    assert starts[1]["param_checksum"] == ends[0]["param_checksum"]  # resumed from exactly the saved weights
    assert starts[1]["param_checksum"] != ends[1]["param_checksum"]  # and kept training
    launches = [json.loads(x) for x in (run_dir / "launches.jsonl").read_text().splitlines()]
    assert [x["resumed_from"] for x in launches] == [None, "step_00000002"]
    assert "deepspeed" in launches[0]["versions"] and "av" in launches[0]["versions"]
    # what decides whether the numbers repeat bit for bit is recorded with every (re)start
    assert launches[0]["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and launches[0]["cpu"]
    assert launches[0]["ffmpeg"] != "unknown" and launches[0]["torch_threads"] >= 1


def test_injected_nan_batch_is_skipped_and_counted(dataset, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_build = train_mod.build_model

    def build_with_poison(cfg):
        model = real_build(cfg)

        def poison(module, inputs, out):
            calls["n"] += 1
            if calls["n"] == 2:  # the second micro-batch's embeddings become NaN
                out["video@vt"] = out["video@vt"] * float("nan")
            return out

        model.register_forward_hook(poison)
        return model

    monkeypatch.setattr(train_mod, "build_model", build_with_poison)
    summary = train(tiny_cfg(dataset, tmp_path, "run.steps=3"))
    assert summary["nonfinite_total"] == 1
    assert summary["step"] == 3  # the skipped micro-batch did not count as a step
    assert calls["n"] == 4
    assert _metrics(Path(summary["run_dir"]))[-1]["nonfinite_total"] == 1
    assert _trace(Path(summary["run_dir"]))[-1]["final_step"] == 3


def test_persistent_nan_stops_the_run_with_a_clear_message(dataset, tmp_path, monkeypatch):
    real_build = train_mod.build_model

    def build_nan(cfg):
        model = real_build(cfg)
        model.register_forward_hook(lambda m, i, out: {**out, "video@vt": out["video@vt"] * float("nan")})
        return model

    monkeypatch.setattr(train_mod, "build_model", build_nan)
    with pytest.raises(TrainingDiverged, match=r"non-finite for 2 micro-batches in a row at step 0 \(no checkpoint"):
        train(tiny_cfg(dataset, tmp_path, "run.steps=3", "run.max_nonfinite=2"))
    monkeypatch.setattr(train_mod, "build_model", real_build)
    summary = train(tiny_cfg(dataset, tmp_path, "run.steps=2"))  # the same command again: the failed start is redone
    assert summary["step"] == 2 and [m["step"] for m in _metrics(Path(summary["run_dir"]))] == [1, 2]


@pytest.mark.parametrize("value", ["nan", ".inf", "-.inf", "'inf'"])
def test_non_finite_float_knobs_are_refused_naming_the_key(dataset, tmp_path, value):
    with pytest.raises(ConfigError, match=r"optim\.lr: .* is not a finite number"):
        tiny_cfg(dataset, tmp_path, f"optim.lr={value}")
    with pytest.raises(ConfigError, match=r"data\.augment\.color_jitter: .* is not a finite number"):
        tiny_cfg(dataset, tmp_path, f"data.augment.color_jitter={value}")


def test_unknown_key_and_wrong_type_name_the_key(dataset, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'stpes'"):
        tiny_cfg(dataset, tmp_path, "run.stpes=3")
    with pytest.raises(ConfigError, match=r"run\.steps: expected an integer, got 'many'"):
        tiny_cfg(dataset, tmp_path, "run.steps=many")
    with pytest.raises(ConfigError, match="data.batch_size is derived from run.batch_size"):
        tiny_cfg(dataset, tmp_path, "data.batch_size=3")


def test_resume_with_another_model_is_refused_by_name(dataset, tmp_path):
    train(tiny_cfg(dataset, tmp_path, "run.steps=1", "run.ckpt_every=1"))
    with pytest.raises(ValueError, match=r"another model: model\.video is 'r2plus1d_tiny' there and 's3d_tiny' here"):
        train(tiny_cfg(dataset, tmp_path, "run.steps=2", "model.video=s3d_tiny"), resume=True)
    summary = train(tiny_cfg(dataset, tmp_path, "run.steps=2"), resume=True)  # the same model resumes
    assert summary["step"] == 2


def test_missing_dataset_fails_before_any_work(dataset, tmp_path):
    cfg = tiny_cfg(dataset, tmp_path, f"data.datasets=[{{path: {tmp_path / 'nowhere'}}}]")
    with pytest.raises(ValueError, match="nowhere"):
        train(cfg)
    assert not (tmp_path / cfg.run.name).exists()


def test_batch_not_divisible_by_ranks_fails_before_any_work(dataset, tmp_path, monkeypatch):
    for k, v in dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(k, v)
    cfg = tiny_cfg(dataset, tmp_path, "run.batch_size=4")
    with pytest.raises(ValueError, match="batch_size=4 is not divisible by ranks x grad_accum = 3 x 1"):
        train(cfg)  # would hang joining a 3-rank group if the check came after init
    assert not (tmp_path / cfg.run.name).exists()


def test_model_vocab_smaller_than_tokenizer_is_an_error(dataset, tmp_path):
    with pytest.raises(ValueError, match="raise model.vocab_size"):
        train(tiny_cfg(dataset, tmp_path, "model.vocab_size=8"))


def test_export_writes_fp32_safetensors_that_reload_to_the_trained_weights(dataset, tmp_path):
    from models.towers import load_exported
    from pipeline.engine import fp32_state_dict

    summary = train(tiny_cfg(dataset, tmp_path, "run.steps=1"))
    run_dir = Path(summary["run_dir"])
    out = export_run(run_dir)
    assert {"model.safetensors", "model.yaml", "tokenizer.model"} <= {p.name for p in out.iterdir()}
    model, _ = load_exported(out)
    saved = fp32_state_dict(run_dir / "checkpoints", latest_tag(run_dir))
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, saved[k], rtol=0, atol=0)


def test_thread_count_comes_from_the_config_or_the_cores_left_by_loader_workers(dataset, tmp_path, monkeypatch):
    from pipeline.train import default_threads

    before = torch.get_num_threads()
    try:
        train(tiny_cfg(dataset, tmp_path, "run.steps=1", "run.threads=1"))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="run.threads must be >= 1"):
        tiny_cfg(dataset, tmp_path, "run.threads=0")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads(loader_workers=5) == 3  # 16 cores / 2 ranks - 5 workers
    assert default_threads(loader_workers=12) == 1


def test_damaged_latest_checkpoint_resumes_from_the_one_before_and_export_names_the_file(dataset, tmp_path, caplog):
    first = train(tiny_cfg(dataset, tmp_path, "run.steps=4", "run.ckpt_every=2"))
    run_dir = Path(first["run_dir"])
    broken = run_dir / "checkpoints" / "step_00000004" / "mp_rank_00_model_states.pt"
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # cut in half
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states\.pt is damaged"):
        export_run(run_dir)
    assert export_run(run_dir, tag="step_00000002").is_dir()  # an earlier one still exports
    with caplog.at_level("WARNING"):
        second = train(load_train_config(run_dir / "config.yaml", ["run.steps=5"]), resume=True)
    assert "step_00000004/mp_rank_00_model_states.pt is damaged" in caplog.text and "step_00000002" in caplog.text
    assert second["step"] == 5
    starts = [t["start_step"] for t in _trace(run_dir) if "start_step" in t]
    assert starts == [0, 2]  # resumed from step 2, then re-did steps 3-5


def test_a_checkpoint_holding_foreign_objects_is_refused_in_one_line(dataset, tmp_path):
    first = train(tiny_cfg(dataset, tmp_path, "run.steps=2", "run.ckpt_every=2"))
    run_dir = Path(first["run_dir"])
    target = run_dir / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"w": torch.zeros(1)}, "payload": Exception("not a tensor")}, target)
    with pytest.raises(ValueError, match="refused to load it: it holds objects other than tensors") as e:
        train(load_train_config(run_dir / "config.yaml", ["run.steps=3"]), resume=True)
    assert "\n" not in str(e.value) and "weights_only=False" not in str(e.value)
    with pytest.raises(ValueError, match="refused to load it"):
        export_run(run_dir)


@pytest.mark.parametrize("where", ["device", "workers"])
def test_training_through_the_batched_augmentation_step_lowers_the_loss(dataset, tmp_path, where):
    """The loader augments each batch on the device (where=device) or its workers already did (where=workers);
    either way the model fits the 8 tiny clips: the loss falls well below its start."""
    summary = train(
        tiny_cfg(
            dataset,
            tmp_path,
            "run.steps=40",
            "run.log_every=1",
            "run.ckpt_every=40",
            "optim.lr=0.01",
            f"data.augment.where={where}",
        )
    )
    losses = [m["loss"] for m in _metrics(Path(summary["run_dir"]))]
    assert len(losses) == 40 and all(math.isfinite(x) for x in losses)
    # last/first eight steps: 0.64-0.84 over seeds 0-3 and both decoders; 1.02-1.29 with lr = 1e-9 (no learning)
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8


def test_periodic_eval_runs_through_the_callback_launch_passes(dataset, tmp_path):
    from eval.embed import read_embeddings
    from eval.periodic import held_out_retrieval, held_out_sources

    cfg = tiny_cfg(dataset, tmp_path, "run.steps=2", "eval.every=2", f"eval.dataset={dataset}", "eval.max_samples=1")
    with pytest.raises(ValueError, match="evaluate callback"):
        train(cfg)
    summary = train(cfg, evaluate=held_out_retrieval(cfg))
    logged = [m for m in _metrics(Path(summary["run_dir"])) if "eval/vt/t2v_R@1" in m]
    assert [m["step"] for m in logged] == [2] and 0 <= logged[0]["eval/vt/t2v_R@10"] <= 100
    # eval.max_samples=1 embeds the first shard only, not the whole held-out dataset
    first = held_out_sources(str(dataset), 1)
    assert len(first) == 1 and len(held_out_sources(str(dataset), 0)) == 1
    embedded = read_embeddings(Path(summary["run_dir"]) / "eval" / "step_00000002")
    shard_samples = json.loads((dataset / "dataset.json").read_text())["shards"][0]["samples"]
    assert len(embedded.idx) == shard_samples < json.loads((dataset / "dataset.json").read_text())["samples"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("data.size=64", "data.size is derived from model.size"),
        ("data.text.max_tokens=8", "data.text.max_tokens is derived from model.max_tokens"),
        ("data.audio.enabled=true", "no audio tower"),
        ("data.text.enabled=false", "a text tower"),
    ],
)
def test_each_fact_is_set_in_one_section(dataset, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_cfg(dataset, tmp_path, override)
    cfg = tiny_cfg(dataset, tmp_path)
    assert cfg.data.text.enabled and not cfg.data.audio.enabled  # from the towers: text_tiny, no audio


def test_self_label_heads_and_clusters_come_from_the_model(dataset, tmp_path):
    cfg = load_train_config(CONFIGS / "selavi_av_tiny.yaml", [f"data.datasets=[{{path: {dataset}}}]"])
    assert (cfg.loss.selflabel.heads, cfg.loss.selflabel.clusters) == (
        cfg.model.selflabel_heads,
        cfg.model.selflabel_clusters,
    )
    with pytest.raises(ConfigError, match="disagrees with model.selflabel_clusters"):
        load_train_config(CONFIGS / "selavi_av_tiny.yaml", ["loss.selflabel.clusters=7"])
    with pytest.raises(ConfigError, match="needs self-label heads"):
        load_train_config(CONFIGS / "selavi_av_tiny.yaml", ["model.selflabel_heads=0", "model.selflabel_clusters=0"])


@pytest.mark.parametrize("warmup", [0, 2])
def test_batchnorm_warms_up_before_the_first_labelling(dataset, tmp_path, monkeypatch, warmup):
    seen = []
    relabel = train_mod.relabel_pass

    def recording(engine, *a, **kw):
        norms = [m for m in engine.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        seen.append((int(norms[0].num_batches_tracked), norms[0].running_var.clone()))
        return relabel(engine, *a, **kw)

    monkeypatch.setattr(train_mod, "relabel_pass", recording)
    cfg = load_train_config(
        CONFIGS / "selavi_av_tiny.yaml",
        [
            f"data.datasets=[{{path: {dataset}}}]",
            f"run.runs_dir={tmp_path}",
            "data.num_workers=0",
            "run.tensorboard=false",
            "run.steps=2",
            "loss.selflabel.relabels=1",
            f"loss.selflabel.bn_warmup_batches={warmup}",
        ],
    )
    train(cfg)
    ((tracked, var),) = seen  # one labelling run, at step 0
    assert tracked == warmup  # the warm-up batches, and no training step, went through BatchNorm before it
    assert torch.equal(var, torch.ones_like(var)) == (warmup == 0)


def test_periodic_eval_scores_audio_to_video_for_an_audio_visual_model(dataset, tmp_path):
    from eval.periodic import held_out_retrieval

    cfg = load_train_config(
        CONFIGS / "gdt_av_tiny.yaml",
        [
            f"data.datasets=[{{path: {dataset}}}]",
            f"run.runs_dir={tmp_path}",
            "data.num_workers=0",
            "run.tensorboard=false",
            "run.steps=2",
            "eval.every=2",
            f"eval.dataset={dataset}",
        ],
    )
    summary = train(cfg, evaluate=held_out_retrieval(cfg))
    logged = [m for m in _metrics(Path(summary["run_dir"])) if "eval/va/a2v_R@10" in m]
    assert [m["step"] for m in logged] == [2] and 0 <= logged[0]["eval/va/a2v_R@1"] <= logged[0]["eval/va/a2v_R@10"]
    nothing = tiny_cfg(dataset, tmp_path, "eval.every=2", f"eval.dataset={dataset}", "model.spaces=[]")
    with pytest.raises(ValueError, match="no space"):
        held_out_retrieval(nothing)
