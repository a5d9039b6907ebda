"""pipeline/batch_memory.py: a /dev/shm too small for the loader's batches ends in one line that says what is needed.

The small /dev/shm is a real 16 MB tmpfs mounted in a private mount namespace (`unshare -m`, as root); where that
is not allowed the tests skip and say why.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from models.contracts import TextInput, VideoInput
from pipeline.batch_memory import batch_bytes, shared_memory_needed
from pipeline.data_config import DataConfig, DatasetSource, resolve_inputs

ROOT = Path(__file__).resolve().parents[1]
VIDEO = VideoInput(num_frames=16, size=112, fps=10.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _small_shm_command(argv: list[str], mb: int = 16) -> list[str]:
    """`argv` run with a private `mb` MB /dev/shm."""
    inner = f'mount -t tmpfs -o size={mb}m tmpfs /dev/shm && exec "$@"'
    return ["unshare", "-m", "sh", "-c", inner, "sh", *argv]


@pytest.fixture(scope="module")
def small_shm():
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a private 16 MB /dev/shm")
    probe = subprocess.run(_small_shm_command(["true"]), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private /dev/shm here: {probe.stderr.strip()[-200:]}")
    return _small_shm_command


def _cfg(dataset, **kw) -> DataConfig:
    cfg = DataConfig(datasets=[DatasetSource(str(dataset))], **{"batch_size": 16, "num_workers": 1, **kw})
    cfg.audio.enabled = False
    return resolve_inputs(cfg, video=VIDEO, audio=None, text=TextInput(vocab_size=100, max_tokens=16))


def test_the_estimate_follows_where_the_batch_is_augmented(tiny_dataset):
    cfg = _cfg(tiny_dataset)
    augmented = batch_bytes(cfg, augmented=True)
    assert augmented == 16 * 1 * 16 * 112 * 112 * 3 * 4  # float32 clips at the model's size
    raw = batch_bytes(cfg, augmented=False)  # YUV boxes of the stored 64-pixel-high frames
    assert raw == 16 * 16 * int(64 * 64 * 16 / 9 * 1.5)
    assert shared_memory_needed(cfg, augmented=True) == (augmented, 3 * augmented)
    assert shared_memory_needed(_cfg(tiny_dataset, num_workers=0), augmented=True) is None


def test_training_with_a_16_mb_dev_shm_ends_with_one_line_saying_what_is_needed(
    dataset_with_tokenizer, tmp_path, small_shm
):
    vatp = [sys.executable, "-m", "launch.cli", "train", "quickstart"]
    settings = [
        f"data.datasets=[{{path: {dataset_with_tokenizer}}}]", f"run.runs_dir={tmp_path}", "run.steps=2",
        "optim.warmup_steps=1", "data.num_workers=1", "run.batch_size=16", "model.size=112", "model.num_frames=16",
        "run.tensorboard=false",
    ]  # fmt: skip
    argv = vatp + [arg for s in settings for arg in ("--set", s)]
    done = subprocess.run(small_shm(argv), capture_output=True, text=True, cwd=ROOT, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2, done.stderr[-2000:]
    assert last.startswith("vatp train: error: the loader's batches do not fit in shared memory")
    assert "need at least 37 MB" in last and "/dev/shm has 16 MB free" in last and "--shm-size" in last


def test_a_worker_that_runs_out_of_shared_memory_is_recognised(small_shm):
    """The error torch raises when shared memory runs out, produced for real in a 16 MB /dev/shm."""
    code = (
        "import torch\n"
        "from pipeline.batch_memory import is_shared_memory_failure\n"
        "try:\n"
        "    torch.UntypedStorage._new_shared(64 << 20)\n"
        "except RuntimeError as e:\n"
        "    print('recognised' if is_shared_memory_failure(e) else f'not recognised: {e}')\n"
    )
    done = subprocess.run(small_shm([sys.executable, "-c", code]), capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.strip() == "recognised", done.stdout + done.stderr
