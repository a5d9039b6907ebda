"""Embedding extraction on the tiny real dataset: files round-trip, every sample once, resume, and 2 gloo ranks."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from eval.embed import embed_dataset, load_model, read_embeddings

WINDOWS = 2


@pytest.fixture(scope="module")
def setup(tiny_dataset, tmp_path_factory):
    """A copy of the tiny dataset with a tokenizer, and an exported tiny video/audio/text model with heads."""
    from data_prep.tokenizer import load_tokenizer, train_tokenizer
    from models.towers import ModelConfig, SpaceConfig, build_model, save_exported

    root = tmp_path_factory.mktemp("embed")
    data = root / "data"
    shutil.copytree(tiny_dataset, data)
    train_tokenizer(data, vocab_size=60)
    cfg = ModelConfig(
        video="s3d_tiny",
        audio="audio_tiny",
        text="text_tiny",
        spaces=[SpaceConfig("va", ["video", "audio"], dim=16), SpaceConfig("vt", ["video", "text"], dim=16)],
        selflabel_heads=2,
        selflabel_clusters=3,
        vocab_size=load_tokenizer(data).get_piece_size(),
    )
    torch.manual_seed(0)
    save_exported(build_model(cfg).eval(), cfg, root / "export")
    return data, root / "export"


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
    assert all(m["label"] is not None and m["id"] for m in single.meta)


def test_caption_rows_follow_meta(single):
    counts = [len(m["captions"]) for m in single.meta]
    assert sum(counts) > 8
    assert single.arrays["text@vt"].shape == (sum(counts), 16)
    np.testing.assert_array_equal(single.caption_video, np.repeat(np.arange(8), counts))


def test_rows_equal_a_direct_forward_of_the_model(setup, single):
    from pipeline.data import DataConfig, DatasetSource, make_eval_loader, resolve_inputs

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
    first_caption = out["text@vt"][0, 0]
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
