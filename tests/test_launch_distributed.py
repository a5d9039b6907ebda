"""Real multi-process launches on localhost over gloo: two node ranks under torchrun, SIGKILL and resume, SIGUSR1.

Each test starts `python -m launch.cli train` (the entry point every launcher uses) in fresh processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import META, latest_tag
from pipeline.engine import fp32_state_dict
from pipeline.train import EXIT_STOPPED, tensors_checksum

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def dataset(dataset_with_tokenizer):
    return dataset_with_tokenizer


def _env() -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    }
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(dataset: Path, runs: Path, *extra: str) -> list[str]:
    sets = [
        f"data.datasets=[{{path: {dataset}}}]",
        f"run.runs_dir={runs}",
        "run.batch_size=4",
        "data.num_workers=0",
        "run.tensorboard=false",
        "run.trace_samples=true",
        "run.name=dist",
        *extra,
    ]
    return ["-m", "launch.cli", "train", "quickstart_tiny", *[a for s in sets for a in ("--set", s)]]


def _torchrun_two_nodes(args: list[str], timeout: float = 240) -> None:
    """Two torchrun agents, --nnodes 2 --node-rank 0/1, one process each, rendezvous on localhost."""
    port = _port()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--node-rank",
                str(node),
                "--nproc-per-node",
                "1",
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                str(port),
                *args,
            ],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in (0, 1)
    ]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            p.kill()
    for p, text in zip(procs, outputs):
        assert p.returncode == 0, text[-4000:]


def _trace(run_dir: Path, rank: int) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "trace" / f"rank{rank}.jsonl").read_text().splitlines()]


def test_two_node_ranks_split_data_agree_on_weights_and_resume(dataset, tmp_path):
    _torchrun_two_nodes(_train_args(dataset, tmp_path, "run.steps=2", "run.ckpt_every=2"))
    run_dir = tmp_path / "dist"
    assert latest_tag(run_dir) == "step_00000002"
    traces = [_trace(run_dir, r) for r in (0, 1)]
    idx = [[tuple(t["idx"]) for t in tr if "idx" in t] for tr in traces]
    assert len(idx[0]) == len(idx[1]) == 2 and all(len(b) == 2 for b in idx[0])
    assert idx[0] != idx[1]  # each rank drew its own samples
    finals = [[t["param_checksum"] for t in tr if "final_step" in t] for tr in traces]
    assert finals[0] == finals[1]  # and both hold the same weights
    saved = fp32_state_dict(run_dir / "checkpoints", "step_00000002")
    assert _params_checksum(saved) == finals[0][0]

    _torchrun_two_nodes(_train_args(dataset, tmp_path, "run.steps=3", "run.ckpt_every=2") + ["--resume"])
    traces = [_trace(run_dir, r) for r in (0, 1)]
    starts = [[t for t in tr if "start_step" in t][-1] for tr in traces]
    assert [s["start_step"] for s in starts] == [2, 2]
    assert starts[0]["param_checksum"] == starts[1]["param_checksum"] == finals[0][0]
    assert latest_tag(run_dir) == "step_00000003"


def test_sigkill_mid_training_then_resume_continues(dataset, tmp_path):
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        *_train_args(dataset, tmp_path, "run.steps=200", "run.ckpt_every=1", "run.keep_ckpts=2"),
    ]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "dist"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and _latest_step(run_dir) < 3:
            time.sleep(0.2)
        assert _latest_step(run_dir) >= 3, "the run never reached step 3"
    finally:
        # torchrun starts each worker in its own session: kill the agent and every descendant at once.
        for pid in [proc.pid, *_descendants(proc.pid)]:
            _kill(pid)
        proc.wait(timeout=30)
    tag = latest_tag(run_dir)
    assert (run_dir / "checkpoints" / tag / META).is_file()
    killed_at = int(tag.split("_")[1])
    checksum = _params_checksum(fp32_state_dict(run_dir / "checkpoints", tag))
    losses_before = {m["step"]: m["loss"] for m in _metrics(run_dir)}

    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *_train_args(dataset, tmp_path, f"run.steps={killed_at + 2}", "run.ckpt_every=1"),
            "--resume",
        ],
        cwd=REPO,
        env=_env(),
        check=True,
        timeout=240,
        capture_output=True,
    )
    start = [t for t in _trace(run_dir, 0) if "start_step" in t][-1]
    assert start["start_step"] == killed_at and start["param_checksum"] == checksum
    after = [m for m in _metrics(run_dir) if m["step"] > killed_at][-2:]
    assert [m["step"] for m in after] == [killed_at + 1, killed_at + 2]
    scale = max(abs(v) for v in losses_before.values())
    assert all(abs(m["loss"]) < 2 * scale for m in after)  # the loss picks up where it was, not from a blow-up
    assert latest_tag(run_dir) == f"step_{killed_at + 2:08d}"


def test_sigusr1_checkpoints_and_exits_for_requeue(dataset, tmp_path):
    args = [sys.executable, *_train_args(dataset, tmp_path, "run.steps=500", "run.ckpt_every=1000")]
    proc = subprocess.Popen(args, cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "dist"
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not _metrics(run_dir):
            time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_STOPPED, err[-3000:]
    step = _latest_step(run_dir)
    assert 1 <= step < 500  # saved where it stopped, long before ckpt_every
    assert "received SIGUSR1" in err


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (from /proc), children first."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        kids = [p for p, pp in parents.items() if pp in frontier]
        out += kids
        frontier = kids
    return out


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _latest_step(run_dir: Path) -> int:
    try:
        tag = latest_tag(run_dir)
    except (ValueError, OSError):
        return -1
    return int(tag.split("_")[1]) if tag else -1


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _params_checksum(state: dict) -> str:
    """The trace's checksum of a saved state dict: parameters only (BatchNorm statistics are per rank)."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return tensors_checksum({k: v for k, v in state.items() if not k.endswith(buffers)})
