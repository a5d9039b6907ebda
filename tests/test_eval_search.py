"""`vatp search`: a real tiny model embeds the query; the planted nearest video (and window) comes back first."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eval.embed import load_model
from eval.search import text_query, video_query
from launch.cli import main

D = 16


@pytest.fixture(scope="module")
def export(export_tiny_model):
    """An exported tiny video+text model and the dataset copy holding its tokenizer."""
    from models.towers import SpaceConfig

    return export_tiny_model(
        "search", video="s3d_tiny", text="text_tiny", spaces=[SpaceConfig("vt", ["video", "text"], dim=D)]
    )


def planted_dir(root, query: np.ndarray, row: int, window: int, n=8, w=3):
    """Random unit video embeddings, except `row` (and its window `window`) which is the query itself."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, D))
    x -= np.outer(x @ query, query)  # orthogonal to the query, so the planted row is the only close one
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    x[row] = query
    windows = np.repeat(x[:, None], w, axis=1) + 0.3 * rng.standard_normal((n, w, D))
    windows[row, window] = query
    windows /= np.linalg.norm(windows, axis=-1, keepdims=True)
    root.mkdir()
    with open(root / "meta.jsonl", "w") as f:
        for i in range(n):
            m = {"row": i, "idx": 100 + i, "id": f"vid{i}", "label": None, "captions": [f"caption {i}"]}
            m["windows"] = [[2.0 * j, 2.0 * j + 1.6] for j in range(w)]
            f.write(json.dumps(m) + "\n")
    np.save(root / "video@vt.npy", x.astype(np.float16))
    np.save(root / "video@vt.windows.npy", windows.astype(np.float16))
    (root / "embed.json").write_text(json.dumps({"rows": n, "windows": w}))
    return root


def run_json(argv, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_text_query_returns_the_planted_video_and_window(export, tmp_path, capsys):
    ckpt, data = export
    model = load_model(ckpt, tokenizer=data / "tokenizer.model")
    q = text_query(model, "the red ball bounces")
    emb = planted_dir(tmp_path / "emb", q, row=5, window=2)
    argv = ["search", "the red ball bounces", "--embeddings", str(emb), "--checkpoint", str(ckpt)]
    hits = run_json([*argv, "--tokenizer", str(data / "tokenizer.model"), "--k", "3", "--json"], capsys)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert hits[0]["idx"] == 105 and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)
    assert hits[0]["window"]["index"] == 2 and hits[0]["window"]["seconds"] == [4.0, 5.6]
    assert hits[1]["score"] < 0.5


def test_video_query_returns_the_planted_video(export, synth_corpus, tmp_path, capsys):
    ckpt, data = export
    clip, other = sorted((synth_corpus / "videos").glob("*.mp4"))[:2]
    q = video_query(load_model(ckpt), clip, windows=3)
    assert float(q @ video_query(load_model(ckpt), other, windows=3)) < 0.999  # the query depends on the video
    emb = planted_dir(tmp_path / "emb", q, row=3, window=0)
    hits = run_json(
        ["search", "--video", str(clip), "--embeddings", str(emb), "--checkpoint", str(ckpt), "--json"], capsys
    )
    assert hits[0]["idx"] == 103 and hits[0]["score"] == pytest.approx(1.0, abs=2e-3)


def test_readable_output_and_bad_queries(export, tmp_path, capsys):
    ckpt, data = export
    model = load_model(ckpt, tokenizer=data / "tokenizer.model")
    emb = planted_dir(tmp_path / "emb", text_query(model, "a cat"), row=0, window=1)
    base = ["search", "--embeddings", str(emb), "--checkpoint", str(ckpt), "--tokenizer", str(data / "tokenizer.model")]
    capsys.readouterr()
    assert main([*base[:1], "a cat", *base[1:]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[:3] == ["1", "1.000", "vid0"] and "2.0-3.6" in table[1]
    assert main(base) == 2  # neither a text query nor --video
    assert "give either" in capsys.readouterr().err
    with pytest.raises(ValueError, match="empty"):
        text_query(model, "  ")


def test_embeddings_of_another_checkpoint_and_a_space_without_text_are_refused(export, tmp_path, capsys):
    from eval.embed_files import checkpoint_fingerprint

    ckpt, data = export
    model = load_model(ckpt, tokenizer=data / "tokenizer.model")
    emb = planted_dir(tmp_path / "emb", text_query(model, "a cat"), row=0, window=1)
    base = ["search", "a cat", "--embeddings", str(emb), "--checkpoint", str(ckpt)]
    base += ["--tokenizer", str(data / "tokenizer.model")]
    (emb / "embed.json").write_text(json.dumps({"rows": 8, "checkpoint": "runs/b/export", "fingerprint": "0" * 16}))
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"with checkpoint runs/b/export (fingerprint {'0' * 16}), not {ckpt}" in err
    assert f"(fingerprint {checkpoint_fingerprint(ckpt)})" in err
    info = {"rows": 8, "checkpoint": str(ckpt), "fingerprint": checkpoint_fingerprint(ckpt), "windows": 3}
    (emb / "embed.json").write_text(json.dumps(info))
    assert main(base) == 0  # the checkpoint that made it
    capsys.readouterr()
    assert main([*base, "--space", "va"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--space va:" in err and "(spaces with both: vt)" in err
