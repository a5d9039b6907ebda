"""Shared fixtures: seeding, thread limits, GPU auto-skip, and a tiny synth corpus built into shards once per run."""

from __future__ import annotations

import contextlib
import os

# OpenMP reads this when torch/faiss load, so it must be set before they are imported: idle threads then
# sleep instead of spinning, which matters on a 2-core machine running several processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import random  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)

TINY_SYNTH = dict(videos=8, seed=0, seconds=4.0, width=96, height=72, fps=20)
TINY_BUILD = dict(fps=10, short_side=64, max_seconds=30.0, sample_rate=16000, samples_per_shard=2, workers=2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def synth_corpus(tmp_path_factory):
    """A raw synth corpus (real mp4 + AAC, caption sidecars, manifest): 8 videos of 4 s."""
    from data_prep.synth import make_synth_corpus

    out = tmp_path_factory.mktemp("synth")
    make_synth_corpus(out, **TINY_SYNTH)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(synth_corpus, tmp_path_factory):
    """The synth corpus built into WebDataset shards (4 shards x 2 samples, 64 px short side, 10 fps)."""
    from data_prep.build import build_dataset

    out = tmp_path_factory.mktemp("dataset")
    build_dataset(synth_corpus, out, **TINY_BUILD)
    return out


@pytest.fixture(scope="session")
def export_tiny_model(tiny_dataset, tmp_path_factory):
    """`export_tiny_model(name, **model_fields) -> (export dir, data dir)`: a copy of the tiny dataset with a
    tokenizer, and an untrained tiny model exported for eval. Its BatchNorm statistics are measured on the
    dataset first: with the initial ones a random S3D maps every clip to one vector, and tests that compare
    embeddings of different clips could not fail."""
    import shutil

    from data_prep.tokenizer import train_tokenizer
    from launch.quickstart import calibrate_batchnorm
    from models.towers import ModelConfig, build_model, save_exported
    from pipeline.data_config import DataConfig, DatasetSource
    from pipeline.dataset import load_tokenizer

    def export(name: str, **model_fields):
        root = tmp_path_factory.mktemp(name)
        data = root / "data"
        shutil.copytree(tiny_dataset, data)
        train_tokenizer(data, vocab_size=60)
        cfg = ModelConfig(**model_fields, vocab_size=load_tokenizer(data).get_piece_size())
        torch.manual_seed(0)
        model = build_model(cfg)
        calibrate_batchnorm(model, DataConfig(datasets=[DatasetSource(str(data))], num_workers=0), batches=4)
        save_exported(model, cfg, root / "export")
        return root / "export", data

    return export


@pytest.fixture(scope="session")
def dataset_with_tokenizer(tiny_dataset):
    """The shared tiny dataset with a tokenizer next to its shards (vocab 128, trained once per session)."""
    from data_prep.tokenizer import train_tokenizer

    if not (tiny_dataset / "tokenizer.model").is_file():
        train_tokenizer(tiny_dataset, vocab_size=128)
    return tiny_dataset


LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_ACCELERATOR")


@pytest.fixture
def restore_launcher_env():
    """train() fills in the launcher variables of a one-process run; take them out again after the test."""
    saved = {k: os.environ.get(k) for k in LAUNCHER_VARS}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextlib.contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: two OpenMP threads on a busy 2-core machine spin badly on small ops."""
    with torch_threads(1):
        yield


@pytest.fixture
def two_torch_threads():
    """Two torch threads, e.g. so Sinkhorn-Knopp splits rows over two worker threads (needs >= 2 x 4096 rows)."""
    with torch_threads(2):
        yield
