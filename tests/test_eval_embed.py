"""Embedding extraction on the tiny real dataset: files round-trip, every sample once, resume, and 2 gloo ranks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from eval.embed import embed_dataset, load_model, read_embeddings

WINDOWS = 2


@pytest.fixture(scope="module")
def setup(export_tiny_model):
    """A copy of the tiny dataset with a tokenizer, and an exported tiny video/audio/text model with heads."""
    from models.towers import SpaceConfig

    export, data = export_tiny_model(
        "embed",
        video="s3d_tiny",
        audio="audio_tiny",
        text="text_tiny",
        spaces=[SpaceConfig("va", ["video", "audio"], dim=16), SpaceConfig("vt", ["video", "text"], dim=16)],
        selflabel_heads=2,
        selflabel_clusters=3,
    )
    return data, export


def embed(setup, out, **kw):
    data, export = setup
    model = load_model(export, tokenizer=data / "tokenizer.model")
    return embed_dataset(model, data, out, windows=WINDOWS, batch_size=3, num_workers=0, **kw)


@pytest.fixture(scope="module")
def single(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    embed(setup, out)
    return read_embeddings(out)


def test_every_sample_once_with_all_files(single):
    assert [m["idx"] for m in single.meta] == list(range(8))
    assert [m["row"] for m in single.meta] == list(range(8))
    for name in ("video@va", "audio@va", "video@vt"):
        a = single.arrays[name]
        assert a.dtype == np.float16 and a.shape == (8, 16)
        np.testing.assert_allclose(np.linalg.norm(single.get(name), axis=1), 1.0, atol=2e-3)
    assert single.arrays["video@vt.windows"].shape == (8, WINDOWS, 16)
    assert single.arrays["video_logits"].shape == (2, 8, 3)
    assert single.arrays["video_feat"].shape[0] == single.arrays["audio_feat"].shape[0] == 8
    assert all(m["label"] is not None and m["id"] for m in single.meta)


def test_caption_rows_follow_meta(single):
    counts = [len(m["captions"]) for m in single.meta]
    assert sum(counts) > 8
    assert single.arrays["text@vt"].shape == (sum(counts), 16)
    np.testing.assert_array_equal(single.caption_video, np.repeat(np.arange(8), counts))


def test_rows_equal_a_direct_forward_of_the_model(setup, single):
    from pipeline.data import make_eval_loader
    from pipeline.data_config import DataConfig, DatasetSource, resolve_inputs

    data, export = setup
    model = load_model(export, tokenizer=data / "tokenizer.model")
    c = model.contracts
    cfg = DataConfig(datasets=[DatasetSource(str(data))], batch_size=8, num_workers=0, eval_windows=WINDOWS)
    cfg = resolve_inputs(cfg, video=c["video"], audio=c["audio"], text=c["text"])
    batch = next(iter(make_eval_loader(cfg)))
    with torch.no_grad():
        out = model.module({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    z = torch.nn.functional.normalize(out["video@va"], dim=-1).mean(1)  # (B, D) mean of normalised windows
    z = torch.nn.functional.normalize(z, dim=-1).numpy()
    rows = batch["idx"].numpy()
    np.testing.assert_allclose(single.get("video@va")[rows], z, atol=2e-3)
    for m in ("video", "audio"):  # backbone features: the windows' mean, as the model computed them
        feat = out[f"{m}/feat"].float().reshape(len(rows), WINDOWS, -1).mean(1).numpy()
        np.testing.assert_allclose(single.get(f"{m}_feat")[rows], feat, rtol=2e-3, atol=2e-3)
    first = {"text": batch["captions"][:1, None], "text_mask": batch["captions_mask"][:1, None]}  # (1, 1, L)
    with torch.no_grad():
        first_caption = model.module(first)["text@vt"][0, 0]
    np.testing.assert_allclose(
        single.get("text@vt")[np.flatnonzero(single.caption_video == rows[0])[0]],
        torch.nn.functional.normalize(first_caption, dim=-1).numpy(),
        atol=2e-3,
    )


def test_interrupted_run_resumes_without_recomputing(setup, single, tmp_path, monkeypatch):
    import eval.embed as E

    real = E._embed_batch
    calls = {"n": 0}

    def crash_after_two(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(E, "_embed_batch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        _embed_flush1(setup, tmp_path)
    assert not (tmp_path / "embed.json").exists() and len(list((tmp_path / "parts").glob("*.npz"))) == 2
    monkeypatch.setattr(E, "_embed_batch", real)
    summary = _embed_flush1(setup, tmp_path)
    assert summary["resumed"] == 6 and summary["embedded"] == 2
    again = read_embeddings(tmp_path)
    for name in ("video@va", "audio@va", "text@vt"):
        np.testing.assert_array_equal(again.arrays[name], single.arrays[name])
    assert not (tmp_path / "parts").exists()


def _embed_flush1(setup, out):
    import eval.embed as E

    real = E.extract_embeddings

    def flush1(*args, **kw):
        return real(*args, **{**kw, "flush_every": 1})

    E.extract_embeddings = flush1
    try:
        return embed(setup, out)
    finally:
        E.extract_embeddings = real


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="not a complete embedding directory"):
        read_embeddings(tmp_path)


@pytest.mark.parametrize("value", [999, -1])
def test_a_caption_pointing_outside_the_videos_is_one_line_naming_file_row_value(single, tmp_path, value):
    damaged = tmp_path / "emb"
    shutil.copytree(single.root, damaged)
    rows = np.load(damaged / "caption_video.npy")
    rows[3] = value
    np.save(damaged / "caption_video.npy", rows)
    with pytest.raises(ValueError, match=rf"caption_video\.npy: row 3 names video {value}, outside 0\.\.7"):
        read_embeddings(damaged)


def _rank_main(rank, world, setup, out, init):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        summary = embed(setup, out, rank=rank, world_size=world)
        (out.parent / f"summary{rank}.json").write_text(json.dumps(summary))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_two_gloo_ranks_cover_each_sample_once_and_match_one_process(setup, single, tmp_path):
    out = tmp_path / "emb"
    mp.spawn(_rank_main, args=(2, setup, out, f"file://{tmp_path}/rdzv"), nprocs=2, join=True)
    summaries = [json.loads((tmp_path / f"summary{r}.json").read_text()) for r in range(2)]
    assert sum(s["embedded"] for s in summaries) == 8 and all(s["embedded"] > 0 for s in summaries)
    assert summaries[0]["duplicates"] == 0
    two = read_embeddings(out)
    assert [m["idx"] for m in two.meta] == list(range(8))
    for name in ("video@va", "audio@va", "video@vt", "text@vt", "video_logits"):
        np.testing.assert_allclose(two.get(name), single.get(name), atol=2e-3)
    np.testing.assert_array_equal(two.caption_video, single.caption_video)


def test_released_s3d_checkpoint_embeds_video_and_word_list_captions(setup, tmp_path):
    """A width-1/8 stand-in for s3d_howto100m.pth (same key layout) with its word2vec text tower."""
    from models.s3d import S3D, Word2VecText

    data, _ = setup
    torch.manual_seed(0)
    words = np.array(["the", "red", "yellow", "gem", "circles", "box", "slides", "ball"])
    video, text = S3D(space_to_depth=True, width=0.125, embed_dim=512), Word2VecText(words)
    state = {**video.state_dict(), **{f"text_module.{k}": v for k, v in text.state_dict().items()}}
    torch.save(state, tmp_path / "s3d.pth")
    np.save(tmp_path / "dict.npy", words)
    model = load_model(tmp_path / "s3d.pth", dict_path=tmp_path / "dict.npy")
    embed_dataset(model, data, tmp_path / "emb", windows=1, batch_size=4, num_workers=0)
    emb = read_embeddings(tmp_path / "emb")
    assert emb.arrays["video@vt"].shape == (8, 512)
    counts = [len(m["captions"]) for m in emb.meta]
    assert emb.arrays["text@vt"].shape == (sum(counts), 512)
    np.testing.assert_array_equal(emb.caption_video, np.repeat(np.arange(8), counts))
    assert emb.meta[0]["windows"] == [[0.0, 3.2]]  # one 32-frame window at 10 fps from the start


def _rows(idx, captions, d=4, h=2, k=3, seed=0):
    """One batch of embedded rows as `_embed_batch` returns them (float32), with `captions[i]` caption rows."""
    rng = np.random.default_rng(seed)
    n = len(idx)
    return {
        "idx": np.asarray(idx, dtype=np.int64),
        "meta": [
            {"idx": int(i), "id": f"v{i}", "captions": [f"c{j}" for j in range(c)]} for i, c in zip(idx, captions)
        ],
        "video@vt": rng.standard_normal((n, d)).astype(np.float32),
        "video@vt.windows": rng.standard_normal((n, 2, d)).astype(np.float32),
        "text@vt": rng.standard_normal((int(sum(captions)), d)).astype(np.float32),
        "text_count": np.asarray(captions, dtype=np.int64),
        "video_logits": rng.standard_normal((h, n, k)).astype(np.float32),
    }


def test_parts_are_float16_and_merge_part_by_part_equals_a_naive_merge(tmp_path):
    from eval.embed_files import merge_parts, write_part

    parts = tmp_path / "parts"
    parts.mkdir()
    batches = [  # rank 0 and rank 1; idx 4 was embedded twice (the first copy, in rank0, is kept)
        ("rank0-00000", [_rows([5, 1], [2, 0], seed=1), _rows([4], [1], seed=2)]),
        ("rank0-00001", [_rows([0, 7], [1, 3], seed=3)]),
        ("rank1-00000", [_rows([4, 2, 6, 3], [2, 1, 1, 0], seed=4)]),
    ]
    for stem, rows in batches:
        write_part(parts / stem, rows)
    with np.load(parts / "rank0-00000.npz", allow_pickle=False) as z:
        assert z["video@vt"].dtype == np.float16 and z["idx"].dtype == np.int64
    summary = merge_parts(tmp_path, expected=8)
    assert summary["rows"] == 8 and summary["duplicates"] == 1 and not parts.exists()
    emb = read_embeddings(tmp_path)

    # the naive merge: every row of every batch, first copy of each idx, sorted by idx
    first: dict[int, tuple[dict, int, int]] = {}
    for _, rows in batches:
        for r in rows:
            starts = np.concatenate([[0], np.cumsum(r["text_count"])])
            for j, i in enumerate(r["idx"].tolist()):
                first.setdefault(i, (r, j, int(starts[j])))
    assert [m["idx"] for m in emb.meta] == sorted(first) == list(range(8))
    text, owner = [], []
    for row, i in enumerate(sorted(first)):
        r, j, s = first[i]
        assert emb.meta[row]["id"] == f"v{i}" and emb.meta[row]["row"] == row
        np.testing.assert_array_equal(emb.arrays["video@vt"][row], r["video@vt"][j].astype(np.float16))
        np.testing.assert_array_equal(emb.arrays["video@vt.windows"][row], r["video@vt.windows"][j].astype(np.float16))
        np.testing.assert_array_equal(emb.arrays["video_logits"][:, row], r["video_logits"][:, j].astype(np.float16))
        text.append(r["text@vt"][s : s + r["text_count"][j]])
        owner += [row] * int(r["text_count"][j])
    np.testing.assert_array_equal(emb.arrays["text@vt"], np.concatenate(text).astype(np.float16))
    np.testing.assert_array_equal(emb.caption_video, owner)
    assert all(a.dtype == np.float16 for a in emb.arrays.values())
    assert not list(tmp_path.glob(".*.tmp"))


def test_metadata_runs_merge_in_rounds_into_row_order(tmp_path):
    """merge_parts streams each part's metadata through sorted run files; more runs than the fan-in merge in rounds."""
    from eval.embed_files import _merge_meta_runs

    rng = np.random.default_rng(0)
    rows = rng.permutation(23)
    runs = []
    for k, chunk in enumerate(np.array_split(rows, 5)):  # 5 runs, each sorted, interleaving with the others
        runs.append(tmp_path / f"meta-{k}.run")
        runs[-1].write_text("".join(f"{r}\t{json.dumps({'row': int(r), 'id': f'v{r}'})}\n" for r in sorted(chunk)))
    _merge_meta_runs(runs, tmp_path / "meta.jsonl", fan_in=2)
    merged = [json.loads(line) for line in (tmp_path / "meta.jsonl").read_text().splitlines()]
    assert [m["row"] for m in merged] == list(range(23)) and merged[7]["id"] == "v7"
    assert len(list(tmp_path.glob("merge1-*.run"))) == 2  # 5 runs -> 3 -> 2, then the final merge


def test_done_set_is_a_sorted_array_with_searchsorted_lookup(tmp_path):
    from eval.embed_files import done_idx, is_done, write_part

    assert done_idx(tmp_path).size == 0 and not is_done(np.array([1, 2]), done_idx(tmp_path)).any()
    write_part(tmp_path / "rank0-00000", [_rows([9, 3], [1, 1])])
    write_part(tmp_path / "rank1-00000", [_rows([3, 12], [0, 1])])
    done = done_idx(tmp_path)
    assert done.tolist() == [3, 9, 12]
    assert is_done(np.array([0, 3, 4, 9, 12, 13, 100]), done).tolist() == [False, True, False, True, True, False, False]


def test_missing_dataset_is_named_before_the_loader_runs(tmp_path):
    from eval.embed import LoadedModel

    model = LoadedModel(torch.nn.Identity(), {}, None, "exported")
    (tmp_path / "empty").mkdir()
    for missing in (tmp_path / "nope", tmp_path / "empty"):
        with pytest.raises(ValueError, match=f"dataset not found: {missing} has no dataset.json and no shards/"):
            embed_dataset(model, missing, tmp_path / "out", num_workers=0)
    assert not (tmp_path / "out").exists()


def test_window_times_use_the_loader_formula():
    from pipeline.views import eval_window_starts

    assert eval_window_starts(10.0, 3.2, 4) == pytest.approx([0.0, 6.8 / 3, 2 * 6.8 / 3, 6.8])
    assert eval_window_starts(2.0, 3.2, 3) == [0.0, 0.0, 0.0]  # shorter than a clip: every window at 0
    assert eval_window_starts(10.0, 3.2, 0) == [0.0]  # one clip over the whole video


def test_truncated_shard_embeds_the_rest_and_says_so_everywhere(setup, tmp_path, caplog):
    data, export = setup
    broken = tmp_path / "data"
    shutil.copytree(data, broken)
    shard = sorted((broken / "shards").glob("*.tar"))[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    model = load_model(export, tokenizer=broken / "tokenizer.model")
    summary = embed_dataset(model, broken, tmp_path / "emb", windows=WINDOWS, batch_size=3, num_workers=0)
    assert summary["skipped"] == {"bad_shard": 1}
    info = json.loads((tmp_path / "emb" / "embed.json").read_text())
    assert info["expected"] == 8 and 6 <= info["rows"] < 8 and info["skipped"] == {"bad_shard": 1}
    with caplog.at_level("WARNING"):
        emb = read_embeddings(tmp_path / "emb")
    assert f"covers {len(emb.meta)} of the 8 samples" in caplog.text and "bad_shard" in caplog.text
    assert all("windows" in m for m in emb.meta)


def test_a_failure_after_the_merge_leaves_no_complete_marker_and_a_rerun_finishes(setup, single, tmp_path, monkeypatch):
    import eval.embed as E

    def broken(*args, **kw):
        raise OSError("disk full")

    monkeypatch.setattr(E, "add_window_times", broken)
    with pytest.raises(OSError, match="disk full"):
        embed(setup, tmp_path)
    assert not (tmp_path / "embed.json").exists()
    with pytest.raises(ValueError, match="not a complete embedding directory"):
        read_embeddings(tmp_path)
    monkeypatch.undo()
    summary = embed(setup, tmp_path)
    assert summary["embedded"] == 0  # the merged arrays were kept; only the last steps ran again
    again = read_embeddings(tmp_path)
    np.testing.assert_array_equal(again.arrays["video@va"], single.arrays["video@va"])
    assert again.meta == single.meta


@pytest.mark.distributed
@pytest.mark.timeout(300)
def test_vatp_embed_under_srun_maps_slurm_variables_like_training(setup, single, tmp_path):
    """Two `vatp embed` processes started as srun starts them (SLURM_PROCID/LOCALID/NTASKS, MASTER_* from the
    sbatch script, no RANK): they form one group, split the shards and merge what one process writes."""
    import socket
    import subprocess
    import sys

    data, export = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    cmd = [
        sys.executable,
        "-m",
        "launch.cli",
        "embed",
        "--checkpoint",
        str(export),
        "--data",
        str(data),
        "--out",
        str(tmp_path / "emb"),
        "--device",
        "cpu",
        "--set",
        f"windows={WINDOWS}",
        "--set",
        "batch_size=3",
        "--set",
        "workers=0",
    ]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=Path(__file__).resolve().parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env={
                **base,
                "SLURM_PROCID": str(r),
                "SLURM_LOCALID": str(r),
                "SLURM_NTASKS": "2",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            },
        )
        for r in range(2)
    ]
    outs = [p.communicate(timeout=240)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    emb = read_embeddings(tmp_path / "emb")
    assert emb.info["world_size"] == 2 and [m["idx"] for m in emb.meta] == [m["idx"] for m in single.meta]
    np.testing.assert_allclose(emb.get("video@va"), single.get("video@va"), atol=2e-3)


def test_a_dot_product_space_is_stored_unnormalised_and_ranked_by_the_dot_product(export_tiny_model, tmp_path):
    from eval.retrieval import evaluate_retrieval
    from models.towers import SpaceConfig
    from pipeline.data import make_eval_loader
    from pipeline.data_config import DataConfig, DatasetSource, data_config_for

    export, data = export_tiny_model(
        "dot",
        video="s3d_tiny",
        text="text_tiny",
        spaces=[SpaceConfig("vt", ["video", "text"], dim=16, normalize=False)],
    )
    model = load_model(export, tokenizer=data / "tokenizer.model")
    embed_dataset(model, data, tmp_path / "emb", windows=WINDOWS, batch_size=8, num_workers=0)
    emb = read_embeddings(tmp_path / "emb")
    assert emb.info["dot_product_spaces"] == ["vt"]
    cfg = DataConfig(datasets=[DatasetSource(str(data))], batch_size=8, num_workers=0, eval_windows=WINDOWS)
    batch = next(iter(make_eval_loader(data_config_for(cfg, model.contracts))))
    with torch.no_grad():
        out = model.module({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
    rows = batch["idx"].numpy()
    np.testing.assert_allclose(emb.get("video@vt")[rows], out["video@vt"].float().mean(1).numpy(), rtol=1e-2, atol=1e-3)
    assert not np.allclose(np.linalg.norm(emb.get("text@vt"), axis=1), 1.0, atol=1e-2)  # captions kept raw too
    assert evaluate_retrieval(emb)["text->video@vt"]["similarity"] == "dot"
    assert evaluate_retrieval(read_embeddings(tmp_path / "emb"))["video->text@vt"]["similarity"] == "dot"


def test_a_sample_with_thousands_of_captions_is_embedded_in_chunks_and_pads_no_other_row(setup, tmp_path):
    """A broken subtitle file can give one sample tens of thousands of cues: every one is embedded, the text tower
    sees at most TEXT_CHUNK of them at a time, and no other row of the batch is padded to as many."""
    from data_prep.shards import write_shard
    from eval.embed import TEXT_CHUNK, LoadedModel
    from pipeline.dataset import iter_samples, shard_paths

    data, export = setup
    ds = tmp_path / "data"
    shutil.copytree(data, ds)
    shard = shard_paths(ds)[0]
    with open(shard, "rb") as f:
        samples = list(iter_samples(f))
    meta = json.loads(samples[0][1]["json"])
    cues = 3 * TEXT_CHUNK + 7
    meta["captions"] = [{"start": 0.0, "end": 0.1, "text": f"a red ball bounces {i % 7}"} for i in range(cues)]
    samples[0][1]["json"] = json.dumps(meta).encode()
    write_shard(str(shard), samples)

    model = load_model(export, tokenizer=ds / "tokenizer.model")
    text_rows = []

    class CountingModel(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.dot_product_spaces = inner, inner.dot_product_spaces

        def forward(self, batch):
            if "text" in batch:
                text_rows.append(batch["text"].shape[0] * batch["text"].shape[1])
            return self.inner(batch)

    counting = LoadedModel(
        CountingModel(model.module), model.contracts, model.tokenize, model.source, model.path, model.tokenizer
    )
    embed_dataset(counting, ds, tmp_path / "emb", windows=1, batch_size=8, num_workers=0)
    emb = read_embeddings(tmp_path / "emb")
    counts = np.bincount(emb.caption_video, minlength=len(emb.meta))
    assert counts[0] == cues and counts.tolist() == [len(m["captions"]) for m in emb.meta]
    assert emb.get("text@vt").shape[0] == counts.sum()
    assert max(text_rows) <= TEXT_CHUNK  # the flat captions go through the text tower in chunks
    others = emb.get("text@vt")[counts[0] :]
    single = read_embeddings(tmp_path / "emb")
    assert np.isfinite(others).all() and single.meta[1]["captions"] == [c for c in single.meta[1]["captions"]]


def _reexport(export: Path, dest: Path, shift: float = 0.05) -> Path:
    """`export`'s model with its first weight shifted by `shift`, exported to `dest`: another checkpoint."""
    from models.towers import load_exported, save_exported

    module, cfg = load_exported(export)
    with torch.no_grad():
        next(module.parameters()).add_(shift)
    save_exported(module, cfg, dest)
    return dest


def test_the_fingerprint_follows_the_content_and_is_hashed_once_per_file_version(setup, tmp_path):
    from eval.embed_files import checkpoint_fingerprint, file_digest

    _, export = setup
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    assert checkpoint_fingerprint(copy) == checkpoint_fingerprint(export)  # a copy is the same checkpoint
    assert checkpoint_fingerprint(copy / "model.safetensors") == checkpoint_fingerprint(copy)
    before = checkpoint_fingerprint(copy)
    _reexport(export, copy)  # re-exported to the same path
    assert checkpoint_fingerprint(copy) != before
    weights = copy / "model.safetensors"
    digest, st = file_digest(weights), weights.stat()
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 1
    with open(weights, "r+b") as f:  # same inode, size and mtime: the cached digest is used, nothing is read
        f.write(raw)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert file_digest(weights) == digest
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # a new mtime: hashed again
    assert file_digest(weights) != digest


def test_a_folder_made_by_another_checkpoint_or_protocol_is_refused_complete_or_partial(
    setup, single, tmp_path, caplog
):
    import re

    import eval.embed as E
    from eval.embed_files import checkpoint_fingerprint

    data, export = setup
    other = _reexport(export, tmp_path / "other")
    a, b = checkpoint_fingerprint(export), checkpoint_fingerprint(other)
    assert single.info["fingerprint"] == a and single.info["protocol"]["windows"] == WINDOWS
    model_b = load_model(other, tokenizer=data / "tokenizer.model")
    done = tmp_path / "done"
    shutil.copytree(single.root, done)
    refusal = f"{done} was made with checkpoint {export} (fingerprint {a}), not {other} (fingerprint {b}): "
    with pytest.raises(ValueError, match=re.escape(refusal + "choose another --out or delete it")):
        embed_dataset(model_b, data, done, windows=WINDOWS, batch_size=3, num_workers=0)
    with pytest.raises(ValueError, match=f"{done} was made with windows={WINDOWS}, not windows=1: choose another"):
        embed_dataset(load_model(export, tokenizer=data / "tokenizer.model"), data, done, windows=1, num_workers=0)

    # Partial: the fingerprint is recorded before the first part, so a resume with another checkpoint is refused.
    partial = tmp_path / "partial"
    real = E._embed_batch
    calls = {"n": 0}

    def crash_after_two(*args, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    E._embed_batch = crash_after_two
    try:
        with pytest.raises(KeyboardInterrupt):
            _embed_flush1(setup, partial)
    finally:
        E._embed_batch = real
    assert json.loads((partial / "embed.started.json").read_text())["fingerprint"] == a
    parts = sorted(p.name for p in (partial / "parts").glob("*.npz"))
    assert len(parts) == 2
    with pytest.raises(ValueError, match=re.escape(f"{partial} was made with checkpoint {export} (fingerprint {a})")):
        embed_dataset(model_b, data, partial, windows=WINDOWS, batch_size=3, num_workers=0)
    assert sorted(p.name for p in (partial / "parts").glob("*.npz")) == parts  # nothing of B's was added
    assert embed(setup, partial)["embedded"] == 2  # the checkpoint that started it finishes it
    np.testing.assert_array_equal(read_embeddings(partial).arrays["video@va"], single.arrays["video@va"])
    assert not (partial / "embed.started.json").exists()

    # A folder written before fingerprints were recorded: a warning, and it is used as it is.
    info = json.loads((done / "embed.json").read_text())
    del info["fingerprint"], info["protocol"]
    (done / "embed.json").write_text(json.dumps(info))
    with caplog.at_level("WARNING"):
        assert embed_dataset(model_b, data, done, windows=WINDOWS, num_workers=0)["embedded"] == 0
    assert f"cannot check that {other} made it" in caplog.text


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 4 workers on a 2-core machine, on purpose
def test_loader_workers_are_capped_at_the_shards_and_out_parents_are_created(setup, tmp_path, caplog):
    data, export = setup
    model = load_model(export, tokenizer=data / "tokenizer.model")
    out = tmp_path / "not" / "yet" / "emb"
    with caplog.at_level("INFO", logger="eval.embed"):
        embed_dataset(model, data, out, windows=1, batch_size=4, num_workers=6)
    assert "4 shard(s), so 4 loader worker(s) per rank instead of 6" in caplog.text
    assert [m["idx"] for m in read_embeddings(out).meta] == list(range(8))


def _wait_for_lock(lock: Path, proc, timeout: float = 120.0) -> None:
    """Until `proc` has written its pid into `lock` (it holds the output), or fail with its output."""
    import time

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if lock.is_file() and lock.read_text().strip() == str(proc.pid):
            return
        if proc.poll() is not None:
            pytest.fail(f"the first process ended before it held {lock}: {proc.communicate()[0].decode()}")
        time.sleep(0.02)
    pytest.fail(f"no pid in {lock} after {timeout} s")


@pytest.mark.timeout(300)
def test_two_embeds_into_one_folder_at_once_the_second_is_refused_the_first_finishes(setup, single, tmp_path):
    """Two real `vatp embed` processes: the second finds the output locked (the first is held still while it
    tries), exits 2 with one line naming the first's pid, and the first's embeddings are complete and right."""
    import signal
    import subprocess
    import sys

    data, export = setup
    out = tmp_path / "emb"
    cmd = [sys.executable, "-m", "launch.cli", "embed", "--checkpoint", str(export), "--data", str(data)]
    cmd += ["--out", str(out), "--device", "cpu", "--set", f"windows={WINDOWS}", "--set", "batch_size=1"]
    cmd += ["--set", "workers=0"]
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS")
    env = {**{k: v for k, v in os.environ.items() if k not in drop}, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    first = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for_lock(out / ".lock", first)
        os.kill(first.pid, signal.SIGSTOP)
        second = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, timeout=120)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    output = first.communicate(timeout=240)[0].decode()
    err = second.stderr.decode().strip().splitlines()
    assert second.returncode == 2 and first.returncode == 0, output
    assert err[-1] == (
        f"vatp embed: error: {out} is being written by another vatp process (pid {first.pid}): "
        "wait for it or choose another --out"
    )
    emb = read_embeddings(out)
    assert [m["idx"] for m in emb.meta] == list(range(8))
    np.testing.assert_allclose(emb.get("video@va"), single.get("video@va"), atol=2e-3)
    assert (out / ".lock").read_text() == ""  # released: nobody holds it
