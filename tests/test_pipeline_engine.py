"""pipeline/engine.py, pipeline/checkpoint.py and pipeline/schedules.py on a toy module, one CPU process (gloo)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from pipeline import checkpoint as ckpt
from pipeline.distributed import init_distributed, launch_env
from pipeline.engine import build_ds_config, build_engine, fp32_state_dict, grad_norm, micro_batch_size
from pipeline.schedules import warmup_cosine
from pipeline.train_config import OptimConfig, RunConfig

DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 3)
        self.norm = torch.nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.lin(x.float()))


def _run(**kw) -> RunConfig:
    return RunConfig(**{"name": "toy", "steps": 10, "batch_size": 4, "device": "cpu", **kw})


@pytest.fixture(scope="module")
def dist_info():
    """One gloo process group for the module; the launcher variables it sets are removed afterwards."""
    saved = {k: os.environ.get(k) for k in (*DIST_VARS, "DS_ACCELERATOR")}
    info = init_distributed("cpu")
    yield info
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _engine(dist_info, run=None, optim=None, seed=0):
    torch.manual_seed(seed)
    return build_engine(Toy(), run or _run(), optim or OptimConfig(lr=0.1), dist_info)


def _train(engine, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(engine.train_micro_batch_size_per_gpu(), 6, generator=g)
        loss = engine(x).pow(2).mean() + engine(x).sum() * 0.3
        engine.backward(loss)
        engine.step()


# ---- schedules


def test_warmup_cosine_is_linear_then_cosine_to_the_floor():
    f = [warmup_cosine(s, total_steps=10, warmup_steps=4, final_ratio=0.1) for s in range(12)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f[4] == pytest.approx(1.0)
    assert all(a > b for a, b in zip(f[4:10], f[5:10]))  # strictly decreasing after warmup
    assert f[7] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f[10] == f[11] == pytest.approx(0.1)


def test_warmup_cosine_rejects_warmup_longer_than_the_run():
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine(0, total_steps=5, warmup_steps=6)


# ---- DeepSpeed config


def test_ds_config_sets_the_surprising_defaults_explicitly():
    cfg = build_ds_config(_run(batch_size=16, grad_accum=2), OptimConfig(), world_size=2)
    assert cfg["gradient_clipping"] == 0.0  # DeepSpeed 0.19 would clip at 1.0 without the key
    assert (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (
        16,
        4,
        2,
    )
    assert "scheduler" not in cfg and "optimizer" not in cfg  # ours are passed in, not DeepSpeed's log-warmup ones
    assert cfg["torch_autocast"]["enabled"] is False and cfg["bf16"]["enabled"] is False


def test_ds_config_mixed_precision_is_autocast_over_fp32_weights():
    cfg = build_ds_config(_run(precision="bf16", zero_stage=2), OptimConfig(clip_grad_norm=1.5), world_size=1)
    assert cfg["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.5


def test_batch_size_must_split_over_ranks_and_accumulation():
    assert micro_batch_size(24, 3, 2) == 4
    with pytest.raises(ValueError, match="batch_size=10 is not divisible by ranks x grad_accum = 3 x 1"):
        micro_batch_size(10, 3, 1)


def test_launch_env_maps_slurm_variables(monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    with pytest.raises(ValueError, match="MASTER_ADDR, MASTER_PORT"):
        launch_env()
    monkeypatch.setenv("MASTER_ADDR", "node-0")
    monkeypatch.setenv("MASTER_PORT", "29999")
    env = launch_env()
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"]) == ("5", "1", "8", "node-0")


def test_launch_env_without_a_launcher_is_one_process(monkeypatch):
    for k in (*DIST_VARS, "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    env = launch_env()
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("0", "1", "0")
    assert int(env["MASTER_PORT"]) > 0


def test_partial_launcher_environment_is_an_error(monkeypatch):
    for k in DIST_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        launch_env()


# ---- engine


def test_engine_follows_the_schedule_on_optimizer_steps_only(dist_info):
    run = _run(steps=6, batch_size=4, grad_accum=2)
    engine = _engine(dist_info, run, OptimConfig(lr=0.1, warmup_steps=2, final_lr_ratio=0.0))
    lrs = []
    for _ in range(3):
        _train(engine, 2)  # one optimizer step = 2 micro-batches
        lrs.append(engine.get_lr()[0])
    assert engine.global_steps == 3
    expected = [0.1 * warmup_cosine(s, total_steps=6, warmup_steps=2) for s in (1, 2, 3)]
    assert lrs == pytest.approx(expected)


def test_gradient_clipping_is_applied(dist_info):
    # lr large and Adam off (betas 0) would hide clipping; instead compare one plain step's update size.
    clipped = _engine(dist_info, optim=OptimConfig(lr=1.0, clip_grad_norm=1e-6, betas=(0.0, 0.0), eps=1.0))
    free = _engine(dist_info, optim=OptimConfig(lr=1.0, clip_grad_norm=0.0, betas=(0.0, 0.0), eps=1.0))
    before = clipped.module.lin.weight.detach().clone()
    _train(clipped, 1)
    _train(free, 1)
    d_clipped = (clipped.module.lin.weight - before).abs().max().item()
    d_free = (free.module.lin.weight - before).abs().max().item()
    assert d_clipped < 1e-4 < d_free


def test_checkpoint_round_trip_restores_weights_optimizer_and_step(dist_info, tmp_path):
    engine = _engine(dist_info, optim=OptimConfig(lr=0.05, warmup_steps=3))
    _train(engine, 4)
    run_dir = tmp_path / "run"
    tag = ckpt.save_checkpoint(
        engine,
        run_dir,
        step=4,
        client_state={"counters": {"samples_seen": 16}},
        rank_state={"loader": {"epoch": 2}},
        keep=2,
        rank=0,
        world_size=1,
    )
    assert tag == "step_00000004" and ckpt.latest_tag(run_dir) == tag
    _train(engine, 3)  # continue: these are the numbers a restored engine must reproduce
    want = engine.module.lin.weight.detach().clone()

    fresh = _engine(dist_info, optim=OptimConfig(lr=0.05, warmup_steps=3), seed=123)
    got_tag, client, rank_state = ckpt.load_checkpoint(fresh, run_dir, rank=0, world_size=1)
    assert (got_tag, client["counters"]["samples_seen"], rank_state["loader"]["epoch"]) == (tag, 16, 2)
    assert fresh.global_steps == 4
    _train(fresh, 3)
    torch.testing.assert_close(fresh.module.lin.weight, want)  # Adam moments and schedule came back too


def test_partial_checkpoint_is_never_latest_and_old_ones_are_pruned(dist_info, tmp_path):
    engine = _engine(dist_info)
    run_dir = tmp_path / "run"
    for step in (1, 2, 3):
        _train(engine, 1)
        ckpt.save_checkpoint(engine, run_dir, step=step, client_state={}, rank_state={}, keep=2, rank=0, world_size=1)
    tags = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["step_00000002", "step_00000003"]
    # A save killed half-way leaves a tag dir without vatp_meta.json: latest still names the last complete one.
    partial = run_dir / "checkpoints" / "step_00000004"
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncat")
    assert ckpt.latest_tag(run_dir) == "step_00000003"
    # ... and a latest that names an incomplete tag is refused rather than loaded.
    (run_dir / "checkpoints" / "latest").write_text("step_00000004\n")
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.latest_tag(run_dir)


def test_run_dir_is_never_silently_reused(tmp_path):
    run_dir = ckpt.prepare_run_dir(tmp_path, "a", resume=False)
    (run_dir / "checkpoints" / "step_00000001").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run: {}\n")
    with pytest.raises(ValueError, match="already holds a run: pass --resume"):
        ckpt.prepare_run_dir(tmp_path, "a", resume=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        ckpt.prepare_run_dir(tmp_path, "a", resume=True)


def test_a_run_that_stopped_before_its_first_checkpoint_is_started_over(tmp_path):
    run_dir = tmp_path / "a"
    (run_dir / "tb").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("run: {}\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    assert ckpt.prepare_run_dir(tmp_path, "a", resume=False) == run_dir
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "tb").exists()
    with pytest.raises(ValueError, match="nothing to resume"):
        ckpt.prepare_run_dir(tmp_path, "a", resume=True)


def test_fp32_state_dict_matches_the_module_under_zero2_bf16(dist_info, tmp_path):
    engine = _engine(dist_info, _run(precision="bf16", zero_stage=2))
    _train(engine, 2)
    assert math.isfinite(grad_norm(engine))  # ZeRO-2 reports the norm itself
    ckpt.save_checkpoint(engine, tmp_path, step=2, client_state={}, rank_state={}, keep=1, rank=0, world_size=1)
    state = fp32_state_dict(tmp_path / "checkpoints", "step_00000002")
    assert all(v.dtype == torch.float32 for v in state.values())
    for k, v in engine.module.state_dict().items():
        torch.testing.assert_close(state[k], v.float(), rtol=0, atol=0)
    meta = json.loads((tmp_path / "checkpoints" / "step_00000002" / ckpt.META).read_text())
    assert meta["world_size"] == 1 and meta["step"] == 2


def test_checkpoint_from_another_world_size_is_refused_with_advice(dist_info, tmp_path):
    engine = _engine(dist_info)
    ckpt.save_checkpoint(engine, tmp_path, step=1, client_state={}, rank_state={}, keep=1, rank=0, world_size=1)
    meta_path = tmp_path / "checkpoints" / "step_00000001" / ckpt.META
    meta_path.write_text(json.dumps({"step": 1, "world_size": 4}))
    with pytest.raises(ValueError, match="saved by 4 ranks.*ds_to_universal"):
        ckpt.load_checkpoint(engine, tmp_path, rank=0, world_size=1)


def test_sgd_with_momentum_takes_the_steps_torch_sgd_takes(dist_info):
    """optim.name=sgd (GDT, SeLaVi) is plain momentum SGD with decay on weights only: same updates as torch's."""
    optim = OptimConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.01, final_lr_ratio=1.0)  # a flat lr
    engine = _engine(dist_info, optim=optim)
    assert type(engine.optimizer).__name__ == "SGD" and engine.optimizer.param_groups[0]["momentum"] == 0.9
    torch.manual_seed(0)
    ref = Toy()
    decay = [p for p in ref.parameters() if p.ndim >= 2]
    rest = [p for p in ref.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(engine.train_micro_batch_size_per_gpu(), 6, generator=g)
        loss = ref(x).pow(2).mean() + ref(x).sum() * 0.3
        opt.zero_grad()
        loss.backward()
        opt.step()
    _train(engine, 3)
    torch.testing.assert_close(engine.module.lin.weight, ref.lin.weight)
    assert type(_engine(dist_info, optim=OptimConfig(name="adam")).optimizer).__name__ == "Adam"
    with pytest.raises(ValueError, match="momentum"):
        OptimConfig(name="sgd", momentum=1.0)
