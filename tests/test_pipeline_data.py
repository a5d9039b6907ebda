"""Streaming loaders on the tiny synth dataset (4 shards x 2 samples): modes, skips, safety, state, determinism."""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from models.contracts import AudioInput, TextInput, VideoInput
from pipeline.config import from_dict
from pipeline.data import make_eval_loader, make_train_loader, shard_weights
from pipeline.data_config import AugmentConfig, DataConfig, DatasetSource, resolve_inputs
from pipeline.stages import TarSamples

VIDEO, AUDIO, TEXT = VideoInput(4, 32, 10.0), AudioInput(16000, 16, 0.5), TextInput(8, 100)


@pytest.fixture(scope="module")
def tokenizer(tiny_dataset, tmp_path_factory):
    from data_prep.tokenizer import train_tokenizer

    d = tmp_path_factory.mktemp("tok")
    (d / "shards").symlink_to(Path(tiny_dataset) / "shards")
    (d / "dataset.json").symlink_to(Path(tiny_dataset) / "dataset.json")
    return str(train_tokenizer(d, vocab_size=100))


def make_cfg(path, tokenizer, **kw) -> DataConfig:
    kw = {"augment": AugmentConfig(enabled=False), "batch_size": 2, "num_workers": 0, "shuffle_buffer": 0, **kw}
    base = DataConfig(datasets=[DatasetSource(str(path))], **kw)
    base = dataclasses.replace(base, text=dataclasses.replace(base.text, tokenizer=tokenizer))
    return resolve_inputs(base, video=VIDEO, audio=AUDIO, text=TEXT)


def idxs(loader) -> list[int]:
    return [int(i) for b in loader for i in b["idx"]]


def copy_dataset(src, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_member(shard: Path, suffix: str, data: bytes | None, extra: dict[str, bytes] | None = None) -> None:
    """Replace the first member ending in `suffix` (None: drop it) and put `extra` members right after it."""
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    out, done = [], False
    for name, body in members:
        if not done and name.endswith(suffix):
            done = True
            out += ([(name, data)] if data is not None else []) + list((extra or {}).items())
        else:
            out.append((name, body))
    with tarfile.open(shard, "w") as tf:
        for name, body in out:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tf.addfile(info, io.BytesIO(body))


def test_exact_mode_covers_each_sample_once_across_2_ranks_x_2_workers(tiny_dataset, tokenizer):
    cfg = make_cfg(tiny_dataset, tokenizer, mode="exact", num_workers=2, views="selflabel")
    seen = []
    for rank in range(2):
        loader = make_train_loader(cfg, rank=rank, world_size=2, seed=0)
        got = idxs(loader)
        assert len(got) == 4
        seen += got
    assert sorted(seen) == list(range(8))


def test_exact_mode_refuses_fewer_shards_than_ranks_x_workers(tiny_dataset, tokenizer):
    cfg = make_cfg(tiny_dataset, tokenizer, mode="exact", num_workers=3)
    with pytest.raises(ValueError, match="2 x 3 shards, found 4"):
        make_train_loader(cfg, rank=0, world_size=2, seed=0)


def test_resampled_mode_gives_equal_batch_counts_per_rank(tiny_dataset, tokenizer):
    # 7 samples over 2 ranks x batch 2 x 1 worker: a split by shard would give ranks different counts.
    cfg = make_cfg(tiny_dataset, tokenizer, views="selflabel", epoch_samples=7, num_workers=1)
    counts = []
    for rank in range(2):
        loader = make_train_loader(cfg, rank=rank, world_size=2, seed=0)
        batches = list(loader)
        counts.append(len(batches))
        assert len(batches) == loader.num_batches
        assert all(len(b["idx"]) == 2 for b in batches)
    assert counts == [2, 2]


def test_corrupt_video_and_truncated_shard_are_skipped_and_counted(tiny_dataset, tokenizer, tmp_path):
    ds = copy_dataset(tiny_dataset, tmp_path / "ds")
    rewrite_member(ds / "shards" / "000000.tar", ".mp4", b"\x00\x00\x00\x18ftypmp42 this is not a video")
    shard = ds / "shards" / "000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    cfg = make_cfg(ds, tokenizer, mode="exact", views="selflabel")
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0)
    got = idxs(loader)
    assert loader.skipped.get("video_decode") == 1
    assert loader.skipped.get("bad_shard", 0) >= 1
    assert 0 not in got and {4, 5, 6, 7} <= set(got)
    assert len(got) + loader.skipped["video_decode"] <= 8


def test_pickle_members_are_never_unpickled(tiny_dataset, tokenizer, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps(Evil())
    ds = copy_dataset(tiny_dataset, tmp_path / "ds")
    key = json.loads(_member(ds / "shards" / "000000.tar", ".json"))["idx"]
    name = Path(_member_name(ds / "shards" / "000000.tar", ".json")).name.split(".")[0]
    extra = {f"{name}.pyd": payload, f"{name}.pickle": payload}
    rewrite_member(ds / "shards" / "000000.tar", ".json", _member(ds / "shards" / "000000.tar", ".json"), extra)
    for views in ("selflabel", "eval"):
        cfg = make_cfg(ds, tokenizer, mode="exact", views=views)
        loader = make_eval_loader(cfg) if views == "eval" else make_train_loader(cfg, rank=0, world_size=1, seed=0)
        assert key in idxs(loader)
    assert not marker.exists()
    # The loader's tar stage itself drops the members: no stage after it ever sees their bytes.
    raw = TarSamples(handler=lambda e: False)(iter([{"url": str(ds / "shards" / "000000.tar")}]))
    keys = {k for sample in raw for k in sample}
    assert "json" in keys and not keys & {"pyd", "pickle"}
    pickle.loads(payload)  # control: unpickling really would have created the marker
    assert marker.exists()


def test_exact_mode_batch_count_matches_what_each_rank_yields_with_unequal_shards(tiny_dataset, tokenizer, tmp_path):
    ds = copy_dataset(tiny_dataset, tmp_path / "ds")
    shard = ds / "shards" / "000000.tar"
    with tarfile.open(shard) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf]
    first = members[0][0].split(".")[0]
    with tarfile.open(shard, "w") as tf:  # keep only the first sample: shards of 1, 2, 2, 2 samples
        for name, body in members:
            if name.split(".")[0] == first:
                info = tarfile.TarInfo(name)
                info.size = len(body)
                tf.addfile(info, io.BytesIO(body))
    meta = json.loads((ds / "dataset.json").read_text())
    meta["shards"][0]["samples"] = 1
    (ds / "dataset.json").write_text(json.dumps(meta))
    cfg = make_cfg(ds, tokenizer, mode="exact", views="selflabel", batch_size=2)
    for seed in range(4):
        for rank in range(2):
            loader = make_train_loader(cfg, rank=rank, world_size=2, seed=seed)
            for _ in range(2):  # the shard order, hence the count, changes with the epoch
                expected = loader.num_batches
                assert len(list(loader)) == expected
    with pytest.raises(ValueError, match="epoch_samples=5 does nothing in exact mode"):
        make_train_loader(dataclasses.replace(cfg, epoch_samples=5), rank=0, world_size=1, seed=0)


@pytest.mark.parametrize("workers", [0, 1])
def test_stream_that_rejects_everything_fails_loudly(tiny_dataset, tokenizer, tmp_path, workers):
    ds = copy_dataset(tiny_dataset, tmp_path / "ds")
    for shard in (ds / "shards").glob("*.tar"):
        for _ in range(2):
            rewrite_member(shard, ".flac", None)
    cfg = make_cfg(ds, tokenizer, views="selflabel", require_audio=True, max_consecutive_rejects=5, num_workers=workers)
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0)
    for _ in range(2):  # with a worker stream, the failed stream is dropped and the retry fails the same way
        with pytest.raises(RuntimeError, match=r"\d+ samples in a row were rejected.*missing_audio"):
            list(loader)


def test_same_seed_same_batches_and_other_seed_differs(tiny_dataset, tokenizer):
    cfg = make_cfg(
        tiny_dataset, tokenizer, views="selflabel", shuffle_buffer=4, epoch_samples=4, augment=AugmentConfig()
    )

    def run(seed):
        return list(make_train_loader(cfg, rank=0, world_size=1, seed=seed))

    a, b, c = run(1), run(1), run(2)
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert any(not torch.equal(x["video"], z["video"]) for x, z in zip(a, c))


def test_batches_are_the_same_for_0_1_2_workers_and_wherever_the_augmentation_runs(tiny_dataset, tokenizer):
    """Exact mode with one batch per shard: per-sample randomness is keyed by the sample, not the worker, and the
    augmentation parameters travel with the batch, so neither the worker count nor the step's place matters."""
    base = make_cfg(tiny_dataset, tokenizer, views="gdt", mode="exact", augment=AugmentConfig())

    def run(workers, where):
        cfg = dataclasses.replace(base, num_workers=workers, augment=AugmentConfig(where=where))
        return list(make_train_loader(cfg, rank=0, world_size=1, seed=4))  # the model's input

    reference = run(0, "device")
    assert len(reference) == 4 and reference[0]["video"].shape == (2, 4, 3, 4, 32, 32)
    assert reference[0]["video"].dtype == torch.float32 and "video_aug" not in reference[0]
    for workers, where in [(1, "device"), (2, "device"), (2, "workers"), (0, "workers")]:
        other = run(workers, where)
        assert [b["idx"].tolist() for b in other] == [b["idx"].tolist() for b in reference]
        for x, y in zip(reference, other):
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    views = reference[0]["video"][0]  # (4, C, T, H, W): base and reversed get their own crops
    assert not torch.allclose(views[1], views[0].flip(1))


def test_loader_hands_uint8_boxes_and_parameters_until_the_device_step(tiny_dataset, tokenizer):
    cfg = make_cfg(tiny_dataset, tokenizer, views="selflabel", epoch_samples=4, augment=AugmentConfig(where="device"))
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0, raw=True)
    batch = next(iter(loader))
    assert batch["video_box"].dtype == torch.uint8 and batch["video_aug"].shape == (2, 1, 8)
    assert batch["audio_aug"].shape == (2, 1, 5)
    h, w = batch["video_aug"][..., 0].max(), batch["video_aug"][..., 1].max()
    assert batch["video_box"].shape[-2:] == (h, w) and h <= 64  # the largest box of the batch, stored pixels
    # Decoded by PyAV (the default for training views): luma and the chroma covering each box, 1.5 bytes a pixel.
    assert batch["video_box"].shape[2] == 1 and batch["video_uv"].shape[:4] == (2, 1, 2, 4)
    assert batch["video_uv"].shape[-2:] == (h // 2 + 1, w // 2 + 1)
    ready = loader.to_device(batch)
    assert ready["video"].shape == (2, 1, 3, 4, 32, 32) and set(ready) == set(batch) - {
        "video_box",
        "video_aug",
        "audio_aug",
        "video_uv",
        "_buffer",
    } | {"video"}
    # Not raw: the loader hands out exactly that, the model's input.
    plain = next(iter(make_train_loader(cfg, rank=0, world_size=1, seed=0)))
    assert plain.keys() == ready.keys() and all(torch.equal(plain[k], ready[k]) for k in ready)


@pytest.mark.parametrize("workers", [0, 1])
def test_video_buffers_are_reused_only_after_to_device_released_them(tiny_dataset, tokenizer, workers):
    cfg = make_cfg(
        tiny_dataset,
        tokenizer,
        views="selflabel",
        epoch_samples=16,
        num_workers=workers,
        augment=AugmentConfig(where="device"),
    )
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=0, raw=True)
    held = [(b, b["video_box"].clone()) for b in loader]  # raw batches kept, never released
    assert len(held) == 8
    assert [b["_buffer"][1].item() for b, _ in held[:3]] == [0, 1, 2] and all("_buffer" not in b for b, _ in held[3:])
    assert all(torch.equal(b["video_box"], copy) for b, copy in held)  # nothing was overwritten
    loader.close()
    slots, fresh = [], make_train_loader(cfg, rank=0, world_size=1, seed=0, raw=True)
    for batch in fresh:  # each batch released before the next is read
        slots.append(batch["_buffer"][1].item())
        fresh.to_device(batch)
    assert len(slots) == 8 and set(slots) <= {0, 1, 2}


def test_state_dict_resume_is_deterministic_and_completes_the_epoch(tiny_dataset, tokenizer):
    cfg = make_cfg(tiny_dataset, tokenizer, views="selflabel", epoch_samples=8)
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=3)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    assert state == {"epoch": 0, "batches_seen": 1, "samples_seen": 2, "seed": 3}

    def resumed():
        other = make_train_loader(cfg, rank=0, world_size=1, seed=3)
        other.load_state_dict(state)
        batches = list(other)
        return batches, other.state_dict()

    (b1, s1), (b2, _) = resumed(), resumed()
    assert len(b1) == loader.num_batches - 1
    assert [x["idx"].tolist() for x in b1] == [x["idx"].tolist() for x in b2]
    assert s1 == {"epoch": 1, "batches_seen": 0, "samples_seen": 8, "seed": 3}


def test_resampled_workers_stream_across_epochs_with_the_batches_of_fresh_epochs(tiny_dataset, tokenizer):
    """One worker pool serves every epoch, and epoch e's batches equal those of a loader started at epoch e."""
    cfg = make_cfg(tiny_dataset, tokenizer, views="selflabel", epoch_samples=8, num_workers=2, shuffle_buffer=4)
    loader = make_train_loader(cfg, rank=0, world_size=1, seed=5)
    streamed, streams = [], []
    for _ in range(3):
        streamed.append([(b["idx"].tolist(), b["video"]) for b in loader])
        streams.append(loader._stream)
    assert streams[0] is not None and streams[0] is streams[1] is streams[2]
    assert loader.state_dict()["epoch"] == 3
    for epoch in range(3):
        fresh = make_train_loader(cfg, rank=0, world_size=1, seed=5)
        fresh.set_epoch(epoch)
        batches = [(b["idx"].tolist(), b["video"]) for b in fresh]
        assert len(batches) == len(streamed[epoch]) == 4
        for (i, v), (j, w) in zip(batches, streamed[epoch]):
            assert i == j and torch.equal(v, w)
    assert [i for i, _ in streamed[0]] != [i for i, _ in streamed[1]]  # epochs do differ


def test_labels_are_indices_into_the_sorted_label_list(tiny_dataset, tokenizer):
    labels = {}
    for shard in sorted((Path(tiny_dataset) / "shards").glob("*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf:
                if m.name.endswith(".json"):
                    meta = json.loads(tf.extractfile(m).read())
                    labels[meta["idx"]] = meta["label"]
    names = sorted(set(labels.values()))
    cfg = make_cfg(tiny_dataset, tokenizer, mode="exact", views="selflabel")
    for b in make_train_loader(cfg, rank=0, world_size=1, seed=0):
        for i, lab in zip(b["idx"].tolist(), b["label"].tolist()):
            assert names[lab] == labels[i]
    only = make_cfg(tiny_dataset, tokenizer, mode="exact", views="selflabel", labels=[names[0]])
    loader = make_train_loader(only, rank=0, world_size=1, seed=0)
    got = {i: lab for b in loader for i, lab in zip(b["idx"].tolist(), b["label"].tolist())}
    assert {lab for lab in got.values()} <= {0, -1} and -1 in got.values()


def test_eval_loader_yields_every_sample_with_meta(tiny_dataset, tokenizer):
    cfg = make_cfg(tiny_dataset, tokenizer, eval_windows=2, with_meta=True, num_workers=2)
    loader = make_eval_loader(cfg)
    batches = list(loader)
    assert len(batches) == loader.num_batches == 4
    assert sorted(int(i) for b in batches for i in b["idx"]) == list(range(8))
    b = batches[0]
    assert b["video"].shape[:2] == (2, 2) and b["captions"].shape == b["captions_mask"].shape
    counts = [len(m["captions"]) for m in b["meta"]]
    assert b["caption_count"].tolist() == counts and len(b["captions"]) == sum(counts)  # flat, no padding rows
    assert [m["idx"] for m in b["meta"]] == b["idx"].tolist()
    assert all(isinstance(c, str) for m in b["meta"] for c in m["captions"])


def test_resolve_inputs_fills_only_unset_values():
    cfg = DataConfig(num_frames=16)
    out = resolve_inputs(cfg, video=VideoInput(8, 64, 10.0), audio=AudioInput(16000, 40, 1.0), text=TextInput(20, 9))
    assert (out.num_frames, out.size, out.fps) == (16, 64, 10.0)
    assert (out.audio.sample_rate, out.audio.num_mel_bins, out.audio.hop_ms, out.text.max_tokens) == (16000, 40, 10, 20)
    assert cfg.size is None  # a copy, not an in-place edit


def test_config_from_yaml_dict_and_unresolved_settings_error(tiny_dataset):
    cfg = from_dict(DataConfig, {"datasets": [{"path": str(tiny_dataset)}], "views": "gdt", "audio": {"seconds": 1}})
    assert cfg.datasets[0].weight is None and cfg.audio.seconds == 1.0
    with pytest.raises(ValueError, match="num_frames"):
        make_train_loader(cfg, rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="views"):
        from_dict(DataConfig, {"views": "clip"})


def test_shard_weights_follow_dataset_weights():
    from pipeline.data import Shard

    shards = [Shard("a0", 10, 0), Shard("a1", 30, 0), Shard("b0", 5, 1)]
    by_size = shard_weights([DatasetSource("a"), DatasetSource("b")], shards)
    assert by_size.tolist() == pytest.approx([10 / 45, 30 / 45, 5 / 45])
    equal = shard_weights([DatasetSource("a", 1.0), DatasetSource("b", 1.0)], shards)
    assert equal.tolist() == pytest.approx([0.125, 0.375, 0.5])


def _member_name(shard: Path, suffix: str) -> str:
    with tarfile.open(shard) as tf:
        return next(m.name for m in tf if m.name.endswith(suffix))


def _member(shard: Path, suffix: str) -> bytes:
    with tarfile.open(shard) as tf:
        return tf.extractfile(_member_name(shard, suffix)).read()


def test_packed_worker_batches_unpack_to_the_same_tensors():
    from pipeline.batch_memory import pack_tensors, unpack_tensors

    batch = {
        "video": torch.randint(0, 255, (2, 1, 3, 4, 8, 8), dtype=torch.uint8).permute(0, 1, 2, 3, 5, 4),
        "idx": torch.tensor([3, 9]),
        "has_audio": torch.tensor([True, False]),
        "text": torch.randint(0, 50, (2, 0, 8)),
        "video_aug": torch.rand(2, 1, 8),
        "meta": [{"a": 1}, {"a": 2}],
    }
    packed = pack_tensors(dict(batch))
    assert [k for k, v in packed.items() if torch.is_tensor(v)] == ["_packed"] and packed["meta"] == batch["meta"]
    assert packed["_packed"].is_shared()
    out = unpack_tensors(packed)
    assert out.keys() == batch.keys()
    for k, v in batch.items():
        assert v == out[k] if k == "meta" else (out[k].dtype == v.dtype and torch.equal(out[k], v))
